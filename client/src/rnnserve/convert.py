"""``rnnserve convert``: a session archive (whole or weights-only) as an ONNX model.

Needs the ``onnx`` extra (``pip install 'rnnserve[onnx]'``: onnx and numpy); the rest of the
client never imports this module. docs/model-format.md documents the arrays this reads and
the graph it writes:

    inputs   ids (T, B) int64 character ids, h0 (L, B, H) [, c0 (L, B, H) for lstm]
    outputs  logits (T, B, V), log_probs (T, B, V), h (L, B, H) [, c (L, B, H)]

The graph is one ONNX Scan over time whose body steps every layer with MatMul, Tanh and
Sigmoid: exactly the server's equations in the model's own dtype (float32 or float64), so no
gate order has to be remapped onto the ONNX RNN/LSTM/GRU operators. The alphabet and the
config ride along in the model's metadata.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rnnserve._requests import write_file
from rnnserve.errors import InvalidArgument

__all__ = ["Model", "read_archive", "to_onnx"]

OPSET = 17  # Scan, LogSoftmax(axis=-1), Split into equal parts without a split input
GATES = {"rnn": 1, "lstm": 4, "gru": 3}
_ARCHIVE_VERSIONS = (1, 2)


@dataclass(frozen=True)
class Model:
    """An archive's model in row-vector form (what docs/model-format.md calls ``w``).

    ``weights``: ``Wx{l}`` (V or H, G*H), ``Wh{l}`` (H, G*H), ``b{l}`` (G*H,), ``bn{l}`` (H,)
    for gru, ``Wy`` (H, V), ``by`` (V,); the one-layer tanh RNN's ``Wxh, Whh, Why, bh`` are
    transposed into ``Wx0, Wh0, Wy, b0``.
    """

    cell: str  # "rnn" | "lstm" | "gru"
    num_layers: int
    hidden_size: int
    alphabet: str
    config: dict[str, Any]
    weights: dict[str, np.ndarray]

    @property
    def dtype(self) -> np.dtype:
        return self.weights["Wy"].dtype


def _bad(path: str, reason: str) -> InvalidArgument:
    return InvalidArgument(
        f"{path}: {reason}; give an archive made by `rnnserve export` (whole or --weights-only)"
    )


def read_archive(path: str | os.PathLike[str]) -> Model:
    """The config, alphabet and weights of an archive file; InvalidArgument naming what is
    wrong when it is not one (OSError when it can't be read at all)."""
    name = os.fspath(path)
    with open(name, "rb") as f:
        data = f.read()
    if not zipfile.is_zipfile(io.BytesIO(data)):  # np.load would call it "pickled data"
        raise _bad(name, "not an archive (an .npz, which is a zip file)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode("utf-8"))
            arrays = {n[len("trainer.") :]: z[n] for n in z.files if n.startswith("trainer.")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise _bad(name, f"not an rnnserve archive ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != "rnnserve.archive":
        raise _bad(name, "its meta has no format tag 'rnnserve.archive'")
    if meta.get("version") not in _ARCHIVE_VERSIONS:
        raise _bad(name, f"archive version {meta.get('version')!r} is not one this reads (1, 2)")
    try:
        config, alphabet = meta["trainer"]["config"], meta["trainer"]["alphabet"]
        cell, layers, H = config["cell"], config["num_layers"], config["hidden_size"]
        dtype = np.dtype(config["dtype"])
    except (KeyError, TypeError):
        raise _bad(name, "its meta has no trainer config or alphabet") from None
    if not (
        cell in GATES
        and all(isinstance(n, int) and n >= 1 for n in (layers, H))
        and dtype in (np.float32, np.float64)
        and isinstance(alphabet, str)
        and alphabet
    ):
        raise _bad(name, "its cell, num_layers, hidden_size, dtype or alphabet is not valid")
    seed = cell == "rnn" and layers == 1  # the seed's tanh RNN: column-vector form
    V = len(alphabet)
    shapes = _shapes(cell, layers, H, V)
    if seed:
        shapes = {"Wxh": (H, V), "Whh": (H, H), "Why": (V, H), "bh": (H,), "by": (V,)}
    for key, shape in shapes.items():
        value = arrays.get(key)
        if value is None or value.shape != shape or value.dtype.kind != "f":
            got = "missing" if value is None else f"{value.dtype}{value.shape}"
            raise _bad(name, f"weight {key!r} is {got}, its config needs {shape}")
    if seed:
        arrays = {
            "Wx0": arrays["Wxh"].T,
            "Wh0": arrays["Whh"].T,
            "b0": arrays["bh"],
            "Wy": arrays["Why"].T,
            "by": arrays["by"],
        }
    weights = {
        key: np.ascontiguousarray(arrays[key], dtype=dtype) for key in _shapes(cell, layers, H, V)
    }
    return Model(cell, layers, H, alphabet, config, weights)


def _shapes(cell: str, layers: int, H: int, V: int) -> dict[str, tuple[int, ...]]:
    """Row-vector shapes of every weight of a model (cells/spec.py's Spec.shapes)."""
    G = GATES[cell] * H
    shapes: dict[str, tuple[int, ...]] = {}
    for li in range(layers):
        shapes.update({f"Wx{li}": (V if li == 0 else H, G), f"Wh{li}": (H, G), f"b{li}": (G,)})
        if cell == "gru":
            shapes[f"bn{li}"] = (H,)
    shapes.update(Wy=(H, V), by=(V,))
    return shapes


def _layer_step(
    model: Model, li: int, xp: str, h: str, c: str, nodes: list[onnx.NodeProto]
) -> dict[str, str]:
    """Nodes of one step of layer ``li`` (in the Scan body): ``xp`` = input @ Wx + b (B, G),
    ``h`` and ``c`` (lstm) the layer's state (B, H); returns the new state's names by kind."""

    def op(kind: str, *inputs: str, outputs: int = 1, **attrs: Any) -> list[str]:
        names = [f"L{li}_{kind}{len(nodes)}_{k}" for k in range(outputs)]
        nodes.append(helper.make_node(kind, list(inputs), names, **attrs))
        return names

    gh = op("MatMul", h, f"Wh{li}")[0]  # (B, G): h @ Wh
    if model.cell == "rnn":
        return {"h": op("Tanh", op("Add", xp, gh)[0])[0]}
    if model.cell == "lstm":
        g, i, f, o = op("Split", op("Add", xp, gh)[0], outputs=4, axis=1)
        g = op("Tanh", g)[0]
        i, f, o = (op("Sigmoid", gate)[0] for gate in (i, f, o))
        c_new = op("Add", op("Mul", f, c)[0], op("Mul", i, g)[0])[0]
        return {"h": op("Mul", o, op("Tanh", c_new)[0])[0], "c": c_new}
    xr, xz, xn = op("Split", xp, outputs=3, axis=1)
    hr, hz, hn = op("Split", gh, outputs=3, axis=1)
    r = op("Sigmoid", op("Add", xr, hr)[0])[0]
    z = op("Sigmoid", op("Add", xz, hz)[0])[0]
    n = op("Tanh", op("Add", xn, op("Mul", r, op("Add", hn, f"bn{li}")[0])[0])[0])[0]
    return {"h": op("Add", n, op("Mul", z, op("Sub", h, n)[0])[0])[0]}  # (1 - z) n + z h


def _scan_body(model: Model, states: list[str], elem: int) -> onnx.GraphProto:
    """One time step of every layer. Inputs: each state ``{s}_t`` (B, H), then ``xp0``, the
    step's row of Wx0 plus b0 (B, G). Outputs: each new state ``{s}_next``, then ``top``, the
    top layer's new h (the scan output). Weights are the outer graph's initializers."""
    nodes: list[onnx.NodeProto] = []
    new: dict[str, str] = {}
    inp = "xp0"
    for li in range(model.num_layers):
        xp = inp
        if li > 0:
            xp = f"xp{li}"
            nodes.append(helper.make_node("MatMul", [inp, f"Wx{li}"], [f"xw{li}"]))
            nodes.append(helper.make_node("Add", [f"xw{li}", f"b{li}"], [xp]))
        step = _layer_step(model, li, xp, f"h{li}_t", f"c{li}_t", nodes)
        new.update({f"{kind}{li}": name for kind, name in step.items()})
        inp = step["h"]
    for s in states:
        nodes.append(helper.make_node("Identity", [new[s]], [f"{s}_next"]))
    nodes.append(helper.make_node("Identity", [inp], ["top"]))
    H, G = model.hidden_size, GATES[model.cell] * model.hidden_size

    def info(name: str, width: int) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, elem, ["B", width])

    return helper.make_graph(
        nodes,
        "step",
        [*(info(f"{s}_t", H) for s in states), info("xp0", G)],
        [*(info(f"{s}_next", H) for s in states), info("top", H)],
    )


def build_onnx(model: Model) -> onnx.ModelProto:
    """The ONNX model of ``model`` (checked by onnx.checker); see the module docstring."""
    L, H, V = model.num_layers, model.hidden_size, len(model.alphabet)
    kinds = ("h", "c") if model.cell == "lstm" else ("h",)
    states = [f"{kind}{li}" for kind in kinds for li in range(L)]  # h0.., then c0.. (lstm)
    elem = helper.np_dtype_to_tensor_dtype(model.dtype)
    inits = [numpy_helper.from_array(w, name) for name, w in model.weights.items()]
    indices = {f"layer{li}": np.array(li, dtype=np.int64) for li in range(L)}
    indices["axis0"] = np.array([0], dtype=np.int64)
    inits += [numpy_helper.from_array(value, name) for name, value in indices.items()]
    nodes = [
        helper.make_node("Gather", ["Wx0", "ids"], ["x_rows"], axis=0),  # (T, B, G)
        helper.make_node("Add", ["x_rows", "b0"], ["xs"]),
    ]
    for kind in kinds:  # the state input (L, B, H) -> one (B, H) per layer
        nodes += [
            helper.make_node("Gather", [f"{kind}0", f"layer{li}"], [f"{kind}{li}_in"])
            for li in range(L)
        ]
    nodes.append(
        helper.make_node(
            "Scan",
            [f"{s}_in" for s in states] + ["xs"],
            [f"{s}_last" for s in states] + ["tops"],  # tops: (T, B, H)
            body=_scan_body(model, states, elem),
            num_scan_inputs=1,
        )
    )
    for kind in kinds:  # the layers' final states -> one (L, B, H) output
        nodes += [
            helper.make_node("Unsqueeze", [f"{kind}{li}_last", "axis0"], [f"{kind}{li}_1"])
            for li in range(L)
        ]
        layers = [f"{kind}{li}_1" for li in range(L)]
        nodes.append(helper.make_node("Concat", layers, [kind], axis=0))  # (L, B, H)
    nodes += [
        helper.make_node("MatMul", ["tops", "Wy"], ["tops_Wy"]),  # (T, B, V)
        helper.make_node("Add", ["tops_Wy", "by"], ["logits"]),
        helper.make_node("LogSoftmax", ["logits"], ["log_probs"], axis=-1),
    ]
    state_shape: list[str | int | None] = [L, "B", H]
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["T", "B"])]
    inputs += [helper.make_tensor_value_info(f"{k}0", elem, state_shape) for k in kinds]
    outputs = [
        helper.make_tensor_value_info(name, elem, ["T", "B", V]) for name in ("logits", "log_probs")
    ]
    outputs += [helper.make_tensor_value_info(k, elem, state_shape) for k in kinds]
    graph = helper.make_graph(nodes, f"rnnserve_{model.cell}", inputs, outputs, inits)
    onnx_model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="rnnserve",
        doc_string=(
            f"{L}-layer {model.cell}, hidden {H}, {V} characters: log_probs[t, b] is the "
            "distribution of the character after ids[t, b], from the state h0 (and c0)"
        ),
    )
    helper.set_model_props(
        onnx_model,
        {
            "alphabet": model.alphabet,
            "cell": model.cell,
            "num_layers": str(L),
            "hidden_size": str(H),
            "config": json.dumps(model.config),
        },
    )
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


def to_onnx(
    archive: str | os.PathLike[str], output: str | os.PathLike[str] | None = None
) -> onnx.ModelProto:
    """Convert an archive file to an ONNX model; also written to ``output`` if given
    (atomically: a temporary file renamed into place once complete)."""
    onnx_model = build_onnx(read_archive(archive))
    if output is not None:
        write_file(output, onnx_model.SerializeToString())
    return onnx_model
