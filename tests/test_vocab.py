"""Vocabulary: ordering, round trips, and errors that name the offending characters."""

from __future__ import annotations

import numpy as np
import pytest
from rnnserve_server.engine.vocab import UnknownCharactersError, Vocab, utf8_size


def test_from_text_is_sorted_set() -> None:
    v = Vocab.from_text("Hallo")
    assert v.alphabet == "Halo" and v.size == 4 and len(v) == 4
    assert Vocab.from_text("Hallo") == Vocab.from_text("oallH")


def test_explicit_alphabet_keeps_order() -> None:
    v = Vocab("zyx")
    assert v.encode("xyz").tolist() == [2, 1, 0]


def test_round_trip_including_non_bmp() -> None:
    text = "Grüße, 世界! 🙂\n\t"
    v = Vocab.from_text(text)
    ids = v.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    assert v.decode(ids) == text
    assert v.decode(ids.tolist()) == text
    assert v.encode("").shape == (0,) and v.decode([]) == ""


def test_rare_code_points_encode_without_a_huge_table() -> None:
    alphabet = "🙂z世\x00aé\U0010ffffЖ"  # explicit order, low and high code points mixed
    v = Vocab(alphabet)
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list(alphabet), 5000))
    ids = v.encode(text)
    assert ids.tolist() == [alphabet.index(c) for c in text] and v.decode(ids) == text
    assert sum(a.nbytes for a in vars(v).values() if isinstance(a, np.ndarray)) < 16 * 1024
    with pytest.raises(UnknownCharactersError) as info:
        v.encode("a🙃世\U0010fffe")  # neighbours of known high code points
    assert info.value.characters == ["🙃", "\U0010fffe"]
    only_high = Vocab("世界")
    assert only_high.encode("界世界").tolist() == [1, 0, 1]
    with pytest.raises(UnknownCharactersError):
        only_high.encode("\x00")


def test_unknown_characters_are_named() -> None:
    v = Vocab.from_text("abc")
    with pytest.raises(UnknownCharactersError) as info:
        v.encode("abxcy\U0001f642")
    assert info.value.characters == ["x", "y", "\U0001f642"]
    assert "'x'" in str(info.value) and "'y'" in str(info.value)
    assert "alphabet" in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("alphabet", ["", "abca"])
def test_bad_alphabets(alphabet: str) -> None:
    with pytest.raises(ValueError):
        Vocab(alphabet)


def test_duplicate_is_named() -> None:
    with pytest.raises(ValueError, match="'a'"):
        Vocab("abca")


@pytest.mark.parametrize("alphabet", ["ab\ud800", "\udfff", "x\udbff\udc00\udc00"])
def test_a_lone_surrogate_is_not_a_character(alphabet: str) -> None:
    """JSON can spell one (an archive's or a checkpoint's alphabet); no reply could carry it."""
    with pytest.raises(ValueError, match="lone surrogate"):
        Vocab(alphabet)


def test_empty_text_has_no_vocabulary() -> None:
    with pytest.raises(ValueError, match="empty"):
        Vocab.from_text("")


def test_decode_rejects_out_of_range() -> None:
    v = Vocab("ab")
    with pytest.raises(ValueError):
        v.decode([0, 2])
    with pytest.raises(ValueError):
        v.decode([-1])


def test_utf8_size_counts_bytes_from_text_and_from_ids() -> None:
    text = "aé€😀"  # 1 + 2 + 3 + 4 bytes
    assert utf8_size(text) == 10
    vocab = Vocab.from_text(text)
    assert vocab.utf8_size(vocab.encode(text * 3)) == 30
