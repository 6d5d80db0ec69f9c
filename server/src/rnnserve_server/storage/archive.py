"""Session archives: what ExportSession streams and ImportSession reads.

Format ``rnnserve.archive`` version 1 (a whole session): an uncompressed numpy ``.npz`` (a
zip of ``.npy`` files, written with ``allow_pickle=False`` and read the same way, so no code
ever runs):

- ``meta``: uint8, the UTF-8 bytes of a JSON object ``{"format": "rnnserve.archive",
  "version": 1, "session_id", "create_time", "update_time" (unix seconds), "step", "loss",
  "smoothed_loss", "validation": [[step, loss], ...], "trainer": {"format", "config",
  "alphabet", "step_count", "windows", "optim"}}``; ``trainer.config`` holds every
  hyperparameter (hidden_size, optimizer, validation_fraction, ...);
- ``loss_history``: float64, ``loss_history[i]`` is the loss of step ``i + 1``;
- ``corpus``: int32 character ids (indices into ``trainer.alphabet``);
- ``trainer.<name>``: every other array of the engine's state, by name: the weights
  (``trainer.Wxh``, ``trainer.Whh``, ``trainer.Why``, ``trainer.bh``, ``trainer.by`` for the
  tanh RNN; other cells add their own names), the optimizer state (``trainer.optim.*``), the
  carried hidden states and the strand cursors.

Version 2 adds the meta key ``weights_only``. A weights-only archive (ExportSession with
``weights_only``) holds ``meta`` = ``{"format", "version": 2, "weights_only": true,
"session_id", "trainer": {"config", "alphabet"}}`` and the weights ``trainer.<name>`` (every
array of ``model_shapes(config, len(alphabet))``, in ``config.dtype``), nothing else; it
imports as a new session at step 0 with no text. A whole session is still written as
version 1, so older servers import it.

Versioning (docs/client.md, "Versions"): ``version`` grows whenever the format gains anything a
reader must understand (an entry, a key, a meaning); a reader refuses a newer version, naming
both, and within a version it reads refuses every entry or key that version does not have
(state it can't restore is never dropped silently).

Reading is hostile-input-proof: the caller bounds the archive's size; every entry's name,
compression and ``.npy`` header (dtype, shape) is checked before its data is read, a header
must describe exactly the bytes present (no allocation beyond the archive's size), object
dtypes are refused, every string in ``meta`` must be text UTF-8 can encode, and ``check`` (the
server's limits on the config, alphabet and corpus) runs before any array is read; the engine
(``Trainer.from_state``) then refuses arrays, trainer keys and ``trainer.optim`` keys its
model does not have. Every problem is an ``InvalidArgumentError`` naming it, raised before
anything is written.
"""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
import zlib
from collections.abc import Callable
from typing import Any, cast

import numpy as np

from rnnserve_server.engine.model_config import EngineError, ModelConfig
from rnnserve_server.engine.trainer import Trainer, model_shapes
from rnnserve_server.engine.vocab import Vocab
from rnnserve_server.errors import InvalidArgumentError
from rnnserve_server.storage.checkpoint import Checkpoint, meta_problem, validate_session_id

FORMAT = "rnnserve.archive"
VERSION = 2  # the newest version this server reads, and writes for weights-only archives
WHOLE_VERSION = 1  # what a whole session is written as (older servers read it)
MAX_ENTRIES = 256  # far more arrays than any engine state has
MAX_META_BYTES = 64 * 1024 * 1024  # the JSON (mostly the validation history)
_NAME_RE = re.compile(r"(meta|loss_history|corpus|trainer\.[A-Za-z0-9_.]{1,100})\.npy", re.ASCII)
_NUMERIC_KINDS = "iuf"
# The keys of version 1's meta object; within a version, any other is refused.
_META_KEYS = frozenset(
    {
        "format",
        "version",
        "session_id",
        "create_time",
        "update_time",
        "step",
        "loss",
        "smoothed_loss",
        "validation",
        "trainer",
    }
)
# A weights-only archive's meta keys (version 2), and its trainer's.
_WEIGHTS_META_KEYS = frozenset({"format", "version", "weights_only", "session_id", "trainer"})
_WEIGHTS_TRAINER_KEYS = frozenset({"config", "alphabet"})

# check(config, alphabet, corpus_length): raise for a config, alphabet or corpus over a limit.
Check = Callable[[ModelConfig, str, int], None]


def write(ckpt: Checkpoint, weights_only: bool = False) -> bytes:
    """The archive of a checkpoint whose ``trainer_arrays`` hold the corpus: the whole
    session (version 1), or only its config, alphabet and weights (version 2)."""
    if weights_only:
        trainer = {key: ckpt.trainer_meta[key] for key in ("config", "alphabet")}
        meta: dict[str, Any] = {"format": FORMAT, "version": VERSION, "weights_only": True}
        meta.update(session_id=ckpt.session_id, trainer=trainer)
        config = ModelConfig.from_dict(dict(trainer["config"]))
        names = list(model_shapes(config, len(trainer["alphabet"])))
    else:
        meta = dict(ckpt.meta)
        meta.update(format=FORMAT, version=WHOLE_VERSION, session_id=ckpt.session_id)
        meta["trainer"] = ckpt.trainer_meta
        names = [name for name in ckpt.trainer_arrays if name != "corpus"]
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)}
    if not weights_only:
        arrays["loss_history"] = np.asarray(ckpt.loss_history, dtype="<f8")
        arrays["corpus"] = np.asarray(ckpt.trainer_arrays["corpus"], dtype="<i4")
    arrays.update(("trainer." + name, np.asarray(ckpt.trainer_arrays[name])) for name in names)
    buffer = io.BytesIO()
    cast(Any, np.savez)(buffer, **arrays)
    return buffer.getvalue()


def _bad(reason: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"the archive is not a valid rnnserve session archive: {reason}; use a file made by "
        "ExportSession (rnnserve export)"
    )


def _header(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[np.dtype, tuple[int, ...]]:
    """An entry's .npy dtype and shape, read from its header only, checked against the
    entry's size: the data must be exactly what the header says."""
    with zf.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"npy format version {version}")
        except ValueError as exc:
            raise _bad(f"{info.filename}: bad .npy header ({exc})") from None
        offset = f.tell()
    if dtype.hasobject or dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None:
        raise _bad(f"{info.filename}: dtype {dtype} is not a plain number type")
    if fortran:
        raise _bad(f"{info.filename}: Fortran-ordered arrays are not used")
    count = 1
    for n in shape:
        if not isinstance(n, int) or n < 0:
            raise _bad(f"{info.filename}: bad shape {shape}")
        count *= n
    if offset + count * dtype.itemsize != info.file_size:
        raise _bad(
            f"{info.filename}: its header declares {dtype}{shape}, which does not match the "
            f"{info.file_size - offset} bytes of data present"
        )
    return dtype, tuple(shape)


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    with zf.open(info) as f:
        try:
            array: np.ndarray = np.lib.format.read_array(f, allow_pickle=False)
            return array
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise _bad(f"{info.filename}: unreadable ({exc})") from None


# What zipfile, zlib and numpy raise on corrupt input (found by fuzzing: bad CRCs, headers
# that disagree with the directory, "encrypted" flags, unknown zip versions, bad offsets).
_CORRUPT = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    EOFError,
    OSError,
    ValueError,
    RuntimeError,
    NotImplementedError,
    OverflowError,
    KeyError,
    IndexError,
)


def read(data: bytes, check: Check) -> Checkpoint:
    """Parse and check an archive; the Checkpoint has the corpus in ``trainer_arrays``.

    ``data`` is already bounded by the caller (max_import_bytes). The arrays' shapes are
    checked against the config by the engine when the session is built from it. Any
    corruption is an InvalidArgumentError.
    """
    try:
        return _read_archive(data, check)
    except _CORRUPT as exc:
        raise _bad(f"it is corrupt ({type(exc).__name__}: {str(exc)[:200]})") from None


def _read_archive(data: bytes, check: Check) -> Checkpoint:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise _bad(f"not a zip/npz file ({exc})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ENTRIES:
            raise _bad(f"{len(infos)} entries (at most {MAX_ENTRIES})")
        entries: dict[str, zipfile.ZipInfo] = {}
        total = 0
        for info in infos:
            if not _NAME_RE.fullmatch(info.filename):
                raise _bad(f"unexpected entry {info.filename[:100]!r}")
            if info.filename in entries:
                raise _bad(f"entry {info.filename!r} appears twice")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise _bad(f"{info.filename}: unsupported compression {info.compress_type}")
            total += info.file_size
            entries[info.filename] = info
        # Deflated entries could expand far beyond the archive: bound what they declare
        # (zipfile stops at the declared size, so the declaration is what is read).
        if total > max(len(data), 1) * 2 + 1_000_000:
            raise _bad(f"its entries declare {total} bytes, far more than the archive holds")
        if "meta.npy" not in entries:
            raise _bad("the 'meta' entry is missing")
        headers = {name: _header(zf, info) for name, info in entries.items()}

        dtype, shape = headers["meta.npy"]
        if dtype != np.uint8 or len(shape) != 1 or shape[0] > MAX_META_BYTES:
            raise _bad("'meta' is not a UTF-8 JSON byte array of a sane size")
        try:
            text = _read(zf, entries["meta.npy"]).tobytes().decode("utf-8")
            meta = json.loads(text)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise _bad(f"'meta' is not valid UTF-8 JSON ({type(exc).__name__})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise _bad(f"'meta' has no format tag {FORMAT!r}")
        _check_version(meta.get("version"))
        problem = meta_problem(meta, text)
        if problem is not None:
            raise _bad(f"'meta' {problem}")
        weights_only = meta.get("weights_only", False)
        if not isinstance(weights_only, bool):
            raise _bad("'meta'.weights_only is not true or false")
        kind, keys = f"version {meta['version']}", _META_KEYS  # version 1
        if meta["version"] > 1:
            keys = _META_KEYS | {"weights_only"}
            if weights_only:
                kind, keys = "a weights-only archive", _WEIGHTS_META_KEYS
        unknown = set(meta) - keys
        if unknown:
            shown = ", ".join(sorted(repr(k) for k in unknown))
            raise _bad(f"'meta' has key(s) {shown}, which {kind} does not have")
        trainer_meta = meta.pop("trainer", None)
        if not isinstance(trainer_meta, dict) or not isinstance(trainer_meta.get("config"), dict):
            raise _bad("'meta' has no trainer config")
        alphabet = trainer_meta.get("alphabet")
        if not isinstance(alphabet, str):
            raise _bad("'meta' has no alphabet")
        try:
            config = ModelConfig.from_dict(dict(trainer_meta["config"]))
        except EngineError as exc:
            raise _bad(f"its config is invalid ({exc})") from None
        if weights_only:
            return _weights_checkpoint(zf, entries, headers, meta, trainer_meta, config, check)

        for name in ("loss_history", "corpus"):
            if name + ".npy" not in entries:
                raise _bad(f"the {name!r} entry is missing")
        dtype, shape = headers["corpus.npy"]
        if dtype.kind not in "iu" or len(shape) != 1:
            raise _bad("'corpus' is not a 1-D array of character ids")
        check(config, alphabet, shape[0])  # limits, before any large array is read
        dtype, shape = headers["loss_history.npy"]
        step = meta.get("step")
        if dtype.kind != "f" or len(shape) != 1 or not isinstance(step, int) or shape[0] != step:
            raise _bad(f"'loss_history' does not hold one loss per step (step {step!r})")

        history = _read(zf, entries["loss_history.npy"]).astype(np.float64)
        arrays = {"corpus": _read(zf, entries["corpus.npy"])}
        for name, info in entries.items():
            if name.startswith("trainer."):
                arrays[name[len("trainer.") : -len(".npy")]] = _read(zf, info)
    for name, arr in arrays.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise _bad(f"array {name!r} holds NaN or infinite values")
    if not np.isfinite(history).all():
        raise _bad("'loss_history' holds NaN or infinite values")
    session_meta: dict[str, Any] = {
        key: float(meta.get(key, 0.0))  # finite numbers (meta_problem)
        for key in ("create_time", "update_time", "loss", "smoothed_loss")
    }
    session_meta["step"] = step
    session_meta["validation"] = _validation(meta.get("validation", []), step)
    return Checkpoint(
        _session_id(meta.get("session_id", "")), session_meta, arrays, trainer_meta, history
    )


def _weights_checkpoint(
    zf: zipfile.ZipFile,
    entries: dict[str, zipfile.ZipInfo],
    headers: dict[str, tuple[np.dtype, tuple[int, ...]]],
    meta: dict[str, Any],
    trainer_meta: dict[str, Any],
    config: ModelConfig,
    check: Check,
) -> Checkpoint:
    """A weights-only archive as the checkpoint of a new session: step 0, no text, a fresh
    optimizer. Every weight of the config's model must be there in its shape and dtype, and
    nothing else, checked before any array is read."""
    unknown = set(trainer_meta) - _WEIGHTS_TRAINER_KEYS
    if unknown:
        shown = ", ".join(sorted(repr(k) for k in unknown))
        raise _bad(f"'meta'.trainer has key(s) {shown}, which a weights-only archive does not have")
    alphabet = trainer_meta["alphabet"]
    try:
        vocab = Vocab(alphabet)
    except ValueError as exc:
        raise _bad(f"its alphabet is invalid ({exc})") from None
    check(config, alphabet, 0)  # limits, before any array is read
    model = f"{config.num_layers}-layer {config.cell} model"
    shapes = model_shapes(config, len(alphabet))
    expected = {f"trainer.{name}.npy": shape for name, shape in shapes.items()}
    for name in entries:
        if name != "meta.npy" and name not in expected:
            raise _bad(
                f"entry {name[:-4]!r} is not a weight of its {model} (a weights-only archive "
                "holds 'meta' and the weights only)"
            )
    dtype = np.dtype(config.dtype)
    for name, shape in expected.items():
        if name not in headers:
            raise _bad(f"the weight {name[:-4]!r} of its {model} is missing")
        if headers[name] != (dtype, shape):
            got_dtype, got_shape = headers[name]
            raise _bad(f"{name[:-4]!r} is {got_dtype}{got_shape}, its config needs {dtype}{shape}")
    trainer = Trainer(config, vocab, np.empty(0, dtype=np.int32))  # checked: can't fail
    for name, weight in trainer.params.items():
        value = _read(zf, entries[f"trainer.{name}.npy"])
        if not np.isfinite(value).all():
            raise _bad(f"array {name!r} holds NaN or infinite values")
        np.copyto(weight, value)
    arrays, fresh_meta = trainer.state_dict()
    session_meta: dict[str, Any] = dict.fromkeys(
        ("create_time", "update_time", "loss", "smoothed_loss"), 0.0
    )
    session_meta.update(step=0, validation=[])
    return Checkpoint(
        _session_id(meta.get("session_id", "")),
        session_meta,
        arrays,
        fresh_meta,
        np.empty(0, dtype=np.float64),
    )


def _check_version(version: object) -> None:
    """The versioning rule (docs/client.md, "Versions"): a newer version is refused, naming both."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _bad(f"'meta'.version {version!r} is not a format version (1, 2, ...)")
    if version > VERSION:
        raise InvalidArgumentError(
            f"the archive is format version {version}, newer than this server reads (version "
            f"{VERSION}): import it into a newer rnnserve, or export the session again from "
            f"a server that writes version {VERSION}"
        )


def _session_id(value: object) -> str:
    """The archive's own session id ("" if it names none); refused unless a valid id."""
    if not isinstance(value, str):
        raise _bad("'meta'.session_id is not a string")
    if value:
        try:
            validate_session_id(value)
        except InvalidArgumentError as exc:
            raise _bad(f"'meta'.{exc}") from None
    return value


def _validation(value: object, step: int) -> list[list[float]]:
    """The validation history ``[[step, loss], ...]``: every step within the loss history,
    every loss a finite number."""
    if isinstance(value, list) and all(
        isinstance(item, list)
        and len(item) == 2
        and not isinstance(item[0], bool)
        and isinstance(item[0], int)
        and 0 < item[0] <= step
        and not isinstance(item[1], bool)
        and isinstance(item[1], int | float)
        and math.isfinite(item[1])
        for item in value
    ):
        return value
    raise _bad(
        f"'meta'.validation is not a list of [step, loss] pairs with steps from 1 to {step} "
        "and finite losses"
    )
