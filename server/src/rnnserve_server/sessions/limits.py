"""The server's size limits on models and corpora (every one a setting, see config.py), and
the sentence that names the setting which raises a limit."""

from __future__ import annotations

from rnnserve_server.config import Settings
from rnnserve_server.engine.model_config import ModelConfig
from rnnserve_server.errors import LimitExceededError


def limit_message(what: str, value: int, limit: int, setting: str) -> str:
    """A RESOURCE_EXHAUSTED sentence naming the limit and the setting that raises it."""
    env = "RNNSERVE_" + setting.upper()
    flag = "--" + setting.replace("_", "-")
    return (
        f"{what} ({value}) exceeds the server limit of {limit}; "
        f"the operator can raise it with {flag} or {env}"
    )


def limit_error(what: str, value: int, limit: int, setting: str) -> LimitExceededError:
    """LimitExceededError with ``limit_message``'s sentence and the details' fields."""
    return LimitExceededError(
        limit_message(what, value, limit, setting), setting=setting, limit=limit, value=value
    )


def check_config_limits(s: Settings, config: ModelConfig) -> None:
    """LimitExceededError when a hyperparameter is over its server limit."""
    for field, limit_name in (
        ("hidden_size", "max_hidden_size"),
        ("batch_size", "max_batch_size"),
        ("seq_length", "max_seq_length"),
        ("num_layers", "max_num_layers"),
    ):
        value, limit = getattr(config, field), getattr(s, limit_name)
        if value > limit:
            raise limit_error(field, value, limit, limit_name)
    if config.recurrent_weights > s.max_recurrent_weights:
        raise limit_error(
            "recurrent weights (num_layers x gates x hidden_size^2, x2 above layer 1)",
            config.recurrent_weights,
            s.max_recurrent_weights,
            "max_recurrent_weights",
        )
    window = config.batch_size * config.seq_length
    if window > s.max_window_chars:
        raise limit_error("batch_size x seq_length", window, s.max_window_chars, "max_window_chars")


def check_alphabet_size(s: Settings, size: int) -> None:
    """LimitExceededError for an alphabet over max_alphabet_size."""
    if size > s.max_alphabet_size:
        raise limit_error("the alphabet size", size, s.max_alphabet_size, "max_alphabet_size")


def check_corpus_limits(s: Settings, session_bytes: int, added: int, all_bytes: int) -> None:
    """LimitExceededError when a corpus of ``session_bytes`` (UTF-8) growing by ``added``
    would outgrow max_corpus_bytes, or all corpora (``all_bytes`` now) max_total_corpus_bytes."""
    if session_bytes + added > s.max_corpus_bytes:
        raise limit_error(
            "the session's corpus in UTF-8 bytes",
            session_bytes + added,
            s.max_corpus_bytes,
            "max_corpus_bytes",
        )
    total = all_bytes + added
    if total > s.max_total_corpus_bytes:
        raise limit_error(
            "the corpus bytes of all sessions",
            total,
            s.max_total_corpus_bytes,
            "max_total_corpus_bytes",
        )
