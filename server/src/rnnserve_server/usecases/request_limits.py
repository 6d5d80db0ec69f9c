"""What one request may ask for: text lengths, counts, and the working memory of a call on a
session's model under --max-request-bytes (engine/budget.py estimates it)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from rnnserve_server.config import Settings
from rnnserve_server.engine import budget
from rnnserve_server.engine.model_config import ModelConfig
from rnnserve_server.engine.vocab import UnknownCharactersError
from rnnserve_server.errors import InvalidArgumentError, LimitExceededError
from rnnserve_server.sessions.limits import limit_error
from rnnserve_server.sessions.session import Session


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n:,} bytes"


def _describe(config: ModelConfig, vocab: int) -> str:
    """The model's sizes the estimate grows with, as the refusal names them."""
    cell = "" if not config.stacked else f"{config.num_layers}-layer {config.cell}, "
    return f"{cell}hidden {config.hidden_size}, alphabet {vocab}, {config.dtype}"


@functools.lru_cache(maxsize=1024)
def _train_need(model: budget.Model, seq: int, batch: int, sample_length: int) -> int:
    """budget.train_bytes for a model, memoised (a few sizes per server, asked every Step)."""
    return budget.train_bytes(model, seq, batch, sample_length)


def encode(session: Session, text: str, field: str) -> np.ndarray:
    """``text`` as the session's ids; InvalidArgumentError naming ``field`` for unknown
    characters."""
    try:
        ids: np.ndarray = session.require_trainer().vocab.encode(text)
    except UnknownCharactersError as exc:
        raise InvalidArgumentError(f"{field}: {exc}") from None
    return ids


class RequestLimits:
    """The per-request checks, against one server's settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def check_text(self, text: str, field: str, min_chars: int = 2) -> None:
        if len(text) < min_chars:
            raise InvalidArgumentError(
                f"{field} must have at least {min_chars} characters, it has {len(text)}"
            )
        limit = self.settings.max_text_chars
        if len(text) > limit:
            raise limit_error(f"{field} length", len(text), limit, "max_text_chars")

    @staticmethod
    def check_count(field: str, value: int, minimum: int, limit: int, setting: str) -> None:
        """INVALID_ARGUMENT below ``minimum``; RESOURCE_EXHAUSTED above ``limit``, naming the
        ``setting`` that raises it."""
        if value < minimum:
            raise InvalidArgumentError(f"{field} must be >= {minimum}, not {value}")
        if value > limit:
            raise limit_error(field, value, limit, setting)

    def check_memory(
        self,
        session: Session,
        what: str,
        estimate: Callable[[int, budget.Model], int],
        chars: int = 0,
        fix: str = "",
    ) -> None:
        """RESOURCE_EXHAUSTED when the call's working memory, ``estimate(chars, model)`` on
        this session's model (engine/budget.py), is over
        --max-request-bytes. With ``chars`` the message says how many characters would fit;
        else ``fix`` says what smaller request would."""
        config = session.require_trainer().config
        vocab = len(session.summary.alphabet)
        model = budget.Model.of(config, vocab)
        limit = self.settings.max_request_bytes
        need = estimate(chars, model)
        if need <= limit:
            return
        if chars:
            most = budget.most_chars(lambda c: estimate(c, model), limit, chars)
            fix = (
                f"send at most {most} characters, or "
                if most >= 2
                else "use a session with a smaller hidden_size or alphabet, or "
            )
        raise LimitExceededError(
            f"{what} needs about {_mib(need)} of working memory on this session's model "
            f"({_describe(config, vocab)}), over the server "
            f"limit of {_mib(limit)}; {fix}the operator can raise the limit with "
            "--max-request-bytes or RNNSERVE_MAX_REQUEST_BYTES",
            setting="max_request_bytes",
            limit=limit,
            value=need,
        )

    def check_update_memory(self, session: Session, what: str, sample_length: int) -> None:
        """check_memory for training updates on the corpus (Step, Train)."""
        config = session.require_trainer().config
        seq, batch = config.seq_length, config.batch_size
        need = _train_need(
            budget.Model.of(config, len(session.summary.alphabet)), seq, batch, sample_length
        )
        if need <= self.settings.max_request_bytes:
            return  # the common case, cached: this is on Step's hot path
        self.check_memory(
            session,
            f"{what} (batch_size {batch} x seq_length {seq}"
            + (f", sample_length {sample_length})" if sample_length else ")"),
            lambda _, model: budget.train_bytes(model, seq, batch, sample_length),
            fix="use a session with a smaller batch_size, seq_length, hidden_size or "
            "num_layers, or ",
        )

    def check_create_memory(self, config: ModelConfig, text: str, alphabet: str) -> None:
        """Refuse a session that could never train under --max-request-bytes (one update of
        batch_size x seq_length on its model), rather than create one every Step refuses."""
        limit = self.settings.max_request_bytes

        def need(vocab: int) -> int:
            return budget.update_bytes(
                budget.Model.of(config, vocab), config.seq_length, config.batch_size
            )

        # The alphabet size is at most the text's length: count it only when that matters.
        if need(min(len(alphabet or text), self.settings.max_alphabet_size)) <= limit:
            return
        vocab = len(set(alphabet or text))
        if need(vocab) > limit:
            raise LimitExceededError(
                f"training this session (batch_size {config.batch_size} x seq_length "
                f"{config.seq_length}, {_describe(config, vocab)}) needs about "
                f"{_mib(need(vocab))} of working memory per update, over the server limit of "
                f"{_mib(limit)}; use a smaller batch_size, seq_length, hidden_size or "
                "num_layers, or the operator can raise the limit with --max-request-bytes "
                "or RNNSERVE_MAX_REQUEST_BYTES",
                setting="max_request_bytes",
                limit=limit,
                value=need(vocab),
            )
