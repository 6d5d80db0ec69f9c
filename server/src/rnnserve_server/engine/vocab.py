"""Text <-> integer ids for a character-level model.

The vocabulary is an ordered alphabet: ``sorted(set(text))`` by default (the notebook's
``list(set(text))`` changes order between runs, which would scramble a saved model), or an
explicit alphabet whose order is kept as given.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

__all__ = ["UnknownCharactersError", "Vocab", "utf8_size"]

# Code points below this are looked up in a dense table (at most 16 KiB per vocabulary, covering
# Latin, Greek and Cyrillic); rarer ones by binary search, so that an emoji in the text does not
# cost every resident session a 512 KiB table (4 bytes per code point up to U+1F600).
_DENSE_CODES = 1 << 12


def utf8_size(text: str) -> int:
    """Bytes of ``text`` in UTF-8: what corpus limits count."""
    return len(text.encode("utf-8", "surrogatepass"))


class UnknownCharactersError(ValueError):
    """Text contains characters outside the vocabulary; ``characters`` lists them, sorted."""

    def __init__(self, characters: Sequence[str], alphabet_size: int) -> None:
        self.characters = list(characters)
        shown = ", ".join(repr(c) for c in self.characters[:20])
        more = f" and {len(self.characters) - 20} more" if len(self.characters) > 20 else ""
        super().__init__(
            f"text contains {len(self.characters)} character(s) outside the session's "
            f"{alphabet_size}-character alphabet: {shown}{more}; remove them from the text, "
            "or create the session with an alphabet that includes them"
        )


class Vocab:
    """An ordered alphabet; character ``alphabet[i]`` has id ``i``."""

    def __init__(self, alphabet: str) -> None:
        """Use ``alphabet`` in the given order. ValueError if empty, if it repeats a character
        or holds a lone surrogate."""
        if not alphabet:
            raise ValueError("alphabet is empty: give at least one character")
        try:
            alphabet.encode("utf-8")
        except UnicodeEncodeError as exc:  # JSON can spell one ("\\ud800"); no reply could carry it
            bad = alphabet[exc.start]
            raise ValueError(
                f"alphabet holds {bad!r} (U+{ord(bad):04X}) at character {exc.start}, a lone "
                "surrogate: not a character, and UTF-8 can't encode it"
            ) from None
        if len(set(alphabet)) != len(alphabet):
            dups = sorted(c for c, n in Counter(alphabet).items() if n > 1)
            raise ValueError(
                f"alphabet repeats {', '.join(repr(c) for c in dups)}: list each character once"
            )
        self.alphabet: str = alphabet
        self.size: int = len(alphabet)
        codes = np.array([ord(c) for c in alphabet], dtype=np.uint32)  # (size,)
        ids = np.arange(self.size, dtype=np.int32)  # (size,)
        dense = codes < _DENSE_CODES
        # Code point -> id for fast vectorised encoding (-1 = unknown): a table for the low
        # code points, the others sorted for np.searchsorted.
        self._table = np.full(int(codes[dense].max(initial=0)) + 1, -1, dtype=np.int32)
        self._table[codes[dense]] = ids[dense]
        order = np.argsort(codes[~dense])
        self._high_codes = codes[~dense][order]  # (k,) sorted
        self._high_ids = ids[~dense][order]  # (k,)

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        """The alphabet ``sorted(set(text))``. ValueError if ``text`` is empty."""
        if not text:
            raise ValueError("text is empty: the vocabulary is built from its characters")
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> np.ndarray:
        """Ids of ``text`` as an int32 array of shape (len(text),).

        Raises UnknownCharactersError naming every character not in the alphabet.
        """
        if not text:
            return np.zeros(0, dtype=np.int32)
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # (n,)
        inside = codes < self._table.shape[0]
        ids = np.full(codes.shape[0], -1, dtype=np.int32)  # (n,)
        ids[inside] = self._table[codes[inside]]
        if self._high_codes.size and not inside.all():
            high = codes[~inside]  # (m,)
            pos = np.searchsorted(self._high_codes, high)
            np.minimum(pos, self._high_codes.size - 1, out=pos)
            found = self._high_codes[pos] == high
            ids[~inside] = np.where(found, self._high_ids[pos], -1)
        if (ids < 0).any():
            bad = sorted({chr(int(c)) for c in np.unique(codes[ids < 0])})
            raise UnknownCharactersError(bad, self.size)
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of ``ids``. ValueError for an id outside [0, size)."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)  # (n,)
        if arr.size and (arr.min() < 0 or arr.max() >= self.size):
            raise ValueError(f"id outside the vocabulary [0, {self.size})")
        a = self.alphabet
        return "".join([a[i] for i in arr.tolist()])

    def utf8_size(self, ids: np.ndarray) -> int:
        """Bytes in UTF-8 of the text whose ids are ``ids``, without decoding it."""
        widths = np.array([utf8_size(c) for c in self.alphabet], dtype=np.int64)  # (size,)
        return int(widths[ids].sum())

    def __len__(self) -> int:
        return self.size

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and other.alphabet == self.alphabet

    def __hash__(self) -> int:
        return hash(self.alphabet)

    def __repr__(self) -> str:
        return f"Vocab({self.alphabet!r})"
