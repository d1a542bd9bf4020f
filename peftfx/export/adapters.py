"""One base, many adapters: an ONNX model whose adapter parameters are named graph inputs, and one ONNX Runtime
adapter file (``.onnx_adapter``) per trained adapter.

Both sides are generated from one list, :func:`adapter_inputs`, built from the PeftModel's site list
(``peft_info.adapters``): the graph input of a parameter, its key in a peftfx checkpoint, its ``state_dict`` key and
its name in the adapter file are the same string (``model.layers.0.self_attn.q_proj.lora.lora_A``), and every
adapter file carries a fingerprint of the (name, shape) list that the model records too, so a file written for
other rules or another model is refused when it is loaded instead of being silently misapplied.

Each adapter input has a default value (an initializer of the same name) of zeros, so a run with no adapter active
is the base model: with LoRA, W₀x + s·B·A·x = W₀x when A = B = 0 (export verifies this against the base graph).
Serve with :class:`peftfx.export.Runtime`: ``rt.load_adapter("support", "support.onnx_adapter")`` then
``rt.run(inputs, adapter="support")`` — switching per request, without re-export or a new session.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from .._errors import CheckpointError, ExportError

__all__ = ["AdapterInput", "adapter_inputs", "fingerprint", "write_onnx_adapter", "read_onnx_adapter",
           "check_adapter_fits", "ADAPTER_SUFFIX"]

ADAPTER_SUFFIX = ".onnx_adapter"
META_INPUTS = "peftfx.adapter_inputs"
META_FINGERPRINT = "peftfx.adapter_fingerprint"


@dataclass(frozen=True)
class AdapterInput:
    name: str                 # graph input = checkpoint key = adapter-file parameter name
    path: str                 # parameter path inside the module that is exported (may carry a wrapper prefix)
    shape: tuple[int, ...]


def adapter_inputs(pm, prefix: str = "") -> list[AdapterInput]:
    """The parameters of every unmerged adapter of ``pm``, in site-list order. ``prefix`` is the path of the
    adapters inside ``pm`` when ``pm`` wraps the model (the key/value-cache step graph); names drop it."""
    out, seen = [], set()
    for name, rec in pm.peft_info.adapters.items():
        if rec.merged:
            continue
        for pname, p in pm.get_submodule(name).named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            public = f"{name}.{pname}"
            public = public[len(prefix):] if prefix and public.startswith(prefix) else public
            out.append(AdapterInput(public, f"{name}.{pname}", tuple(p.shape)))
    if not out:
        raise ExportError("adapter_inputs=True needs a model with at least one unmerged adapter (peftfx.apply()).")
    return out


def fingerprint(layout: list[tuple[str, tuple[int, ...]]] | list[AdapterInput]) -> int:
    """A 31-bit number identifying the (name, shape) list; stored as the adapter file's model version."""
    pairs = sorted((e.name, tuple(e.shape)) if isinstance(e, AdapterInput) else (e[0], tuple(e[1])) for e in layout)
    text = ";".join(f"{n}:{'x'.join(map(str, s))}" for n, s in pairs)
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def _tensors_of(source: Any, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """Adapter tensors by name from a PeftModel (``adapter``: one of its named adapters, :mod:`peftfx.multi`),
    a peftfx adapter folder, or a name → tensor mapping."""
    from ..model import PeftModel

    if isinstance(source, PeftModel) and (adapter is not None or source.peft_info.multi.get("adapters")):
        from ..multi import adapter_view

        view = adapter_view(source, adapter)
        return {f"{rec}.{n}": p.detach() for rec in view.peft_info.adapters
                for n, p in view.get_submodule(rec).named_parameters()}
    if isinstance(source, PeftModel):
        return {e.name: source.get_parameter(e.path).detach() for e in adapter_inputs(source)}
    if isinstance(source, (str, os.PathLike)):
        from ..io.peftfx_format import read_adapter

        return dict(read_adapter(source)[1])
    if isinstance(source, Mapping):
        return {str(k): torch.as_tensor(v) for k, v in source.items()}
    raise CheckpointError(f"write_onnx_adapter takes a PeftModel, a peftfx adapter folder or a dict of tensors, "
                          f"got {type(source).__name__}.")


def model_layout(model: Any) -> list[tuple[str, tuple[int, ...]]] | None:
    """The adapter-input layout recorded in an exported model (a path or a Runtime), or None."""
    if model is None:
        return None
    meta = getattr(model, "metadata", None)
    if meta is None:
        import onnx

        proto = onnx.load(os.fspath(model), load_external_data=False)
        meta = {p.key: p.value for p in proto.metadata_props}
    raw = meta.get(META_INPUTS)
    if raw is None:
        raise ExportError(f"{model} was not exported with adapter_inputs=True; it has no adapter inputs to feed.")
    data = json.loads(raw) if isinstance(raw, str) else raw
    return [(n, tuple(s)) for n, s in data]


def check_adapter_fits(names_shapes: Mapping[str, tuple[int, ...]], layout: list[tuple[str, tuple[int, ...]]],
                       source: str) -> None:
    """Same names and shapes as the model's adapter inputs, else one error listing every difference."""
    want = dict(layout)
    problems = [f"missing {n} {list(s)}" for n, s in want.items() if n not in names_shapes]
    problems += [f"{n}: adapter shape {list(names_shapes[n])}, model needs {list(s)}"
                 for n, s in want.items() if n in names_shapes and tuple(names_shapes[n]) != tuple(s)]
    problems += [f"unexpected {n}" for n in names_shapes if n not in want]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; … {len(problems) - 6} more" if len(problems) > 6 else "")
        raise CheckpointError(f"the adapter {source} does not fit this model ({shown}). It was trained with other "
                              "rules or on another model; export the adapter from a model built with the same rules.")


def write_onnx_adapter(source: Any, path: str | os.PathLike, *, model: Any = None, adapter: str | None = None,
                       dtype: str = "float32") -> str:
    """Write ``source``'s adapter (a PeftModel — ``adapter`` names one of several named adapters —, a peftfx
    adapter folder, or a dict of tensors) as an ONNX Runtime adapter file. With ``model`` (the exported .onnx path
    or a Runtime) its names and shapes are checked against the model's adapter inputs first. Written under a
    temporary name and renamed into place; returns the path."""
    import onnxruntime as ort

    tensors = _tensors_of(source, adapter)
    layout = model_layout(model)
    label = os.fspath(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
    if layout is not None:
        check_adapter_fits({k: tuple(v.shape) for k, v in tensors.items()}, layout, label)
        tensors = {n: tensors[n] for n, _ in layout}
    np_dtype = np.float16 if dtype == "float16" else np.float32
    arrays = {k: np.ascontiguousarray(v.detach().cpu().float().numpy().astype(np_dtype)) for k, v in tensors.items()}
    # OrtValues wrap the arrays' memory: ``arrays`` must stay alive until the file is written
    values = {k: ort.OrtValue.ortvalue_from_numpy(a) for k, a in arrays.items()}
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(fingerprint([(k, a.shape) for k, a in arrays.items()]))
    fmt.set_parameters(values)
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".peftfx-adapter-", suffix=ADAPTER_SUFFIX, dir=parent)
    os.close(fd)
    try:
        fmt.export_adapter(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)       # mkstemp creates 0600; an adapter file is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    del arrays
    return path


def read_onnx_adapter(path: str | os.PathLike) -> tuple[int, dict[str, np.ndarray]]:
    """(model-version fingerprint, parameters as numpy arrays) of an ONNX Runtime adapter file."""
    import onnxruntime as ort

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"no ONNX Runtime adapter file at {path!r}.")
    try:
        fmt = ort.AdapterFormat.read_adapter(path)
    except Exception as e:  # ORT raises its own Fail/InvalidArgument types
        raise CheckpointError(f"{path} is not an ONNX Runtime adapter file ({str(e).splitlines()[0][:200]}).") from None
    params = {k: np.array(v.numpy()) for k, v in fmt.get_parameters().items()}
    return fmt.get_model_version(), params


def zero_defaults(model_proto, entries: list[AdapterInput], dtype: str) -> None:
    """Give every adapter input a zero initializer (no adapter = base model) and record the layout."""
    from onnx import numpy_helper

    np_dtype = np.float16 if dtype == "float16" else np.float32
    for e in entries:
        model_proto.graph.initializer.append(numpy_helper.from_array(np.zeros(e.shape, np_dtype), e.name))
    layout = [[e.name, list(e.shape)] for e in entries]
    _set_meta(model_proto, META_INPUTS, json.dumps(layout))
    _set_meta(model_proto, META_FINGERPRINT, str(fingerprint(entries)))


def _set_meta(model_proto, key: str, value: str) -> None:
    for p in model_proto.metadata_props:
        if p.key == key:
            p.value = value
            return
    entry = model_proto.metadata_props.add()
    entry.key, entry.value = key, value
