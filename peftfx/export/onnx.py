"""``export_onnx``: merge → fold → torch.onnx (dynamo) → check → verify in ONNX Runtime → rename into place.

Guarantees: the file at ``path`` is only ever a verified model — it is written into a temporary folder beside
``path`` and renamed into place after ``onnx.checker`` passes and ONNX Runtime reproduces PyTorch on several input
shapes (batch 1 and batch > 1, short and long sequences; for ``kv_cache=True`` a prefill and a one-token decode
step against the PyTorch model's own full-sequence logits). The temporary folder (``.peftfx-export-p<pid>-…``) is
removed on every exit; one left by a killed process is removed by the next export or save into the same folder
(:mod:`peftfx._fs`).

Tolerance, per output: max |ORT − PyTorch| ≤ tol · max(1, max |ref|), tol = 1e-4 for float32 and 1e-2 for
float16 (float16 rounds at 2⁻¹¹ ≈ 5e-4 relative per operation; the models in the tests measure 2e-4 – 4e-4).
Dynamic axes follow the trace, per input: a dimension is dynamic only where the trace made it symbolic (Whisper's
mel bins stay fixed), and inputs share an axis name only where they share a symbol: ``batch``, ``sequence``,
``decoder_sequence`` (an encoder-decoder's source and target lengths are separate), ``past_sequence`` for the
cache. Input and output names are unique (an output named like an input gets the prefix ``out_``). The opset
is 18 unless asked otherwise and is recorded in the file's metadata with the peftfx version, dtype and layout.
Models over 2 GB get an external ``.onnx.data`` file. float16 files keep float32/int64 inputs and outputs.

The graph handed to torch.onnx is the traced one (:func:`~peftfx.export._build.program_from_graph`: the merged
graph's weights lifted to placeholders, its fake values and the trace's ranges), not a second ``torch.export``; and
where every op has an ONNX translation (after :func:`~peftfx.export._build.rewrite_untranslatable`) the exporter's
whole-graph decomposition re-trace is skipped (:func:`_to_onnx`). A graph either step cannot take goes today's way
(a fresh ``torch.export`` of the model, the exporter's decompositions), with the reason logged; ``stages`` says
which ran (``"program from graph"`` or ``"torch.export"``). ``PEFTFX_EXPORT_REUSE=0`` forces today's way.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .._errors import ExportError
from .._fs import make_temp_dir
from .._version import __version__
from ..apply import fold, merge, unmerge
from ..model import PeftModel
from ..passes.cleanup import _mutates
from ._build import (BATCH, FlatModule, NotReusable, dim_renamer, drop_identity_reshapes, dynamic_axes, export_program,
                     flatten_outputs, keep_modes, program_from_graph, rename_dims, rewrite_untranslatable,
                     tensor_inputs, traced_axes, unique_output_names)
from ._moe import grouped_mm_translations

__all__ = ["export_onnx", "ExportReport", "DEFAULT_OPSET", "TOLERANCE"]

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2}
DTYPES = ("float32", "float16", "bfloat16", "int8")   # int8: verified in float32 first, then peftfx.export.quantize
_TWO_GB = 2_000_000_000


@dataclass
class ExportReport:
    """What was written and how well it matched PyTorch."""

    path: str
    data_path: str | None
    opset: int
    dtype: str
    inputs: dict[str, list]
    outputs: dict[str, list]
    size_bytes: int
    tolerance: float
    checks: list[dict] = field(default_factory=list)   # per case and output: max_abs, max_rel
    providers: list[str] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage ("onnx …": parts of "onnx")
    kv_cache: dict | None = None
    adapter_inputs: list[str] = field(default_factory=list)
    optimize: dict = field(default_factory=dict)          # level, target, pipeline, fused op counts (optimize.py)
    quantization: dict | None = None                      # int8: mode, max_abs, max_rel, argmax_agreement

    @property
    def max_abs(self) -> float:
        return max((c["max_abs"] for c in self.checks), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((c["max_rel"] for c in self.checks), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"max_abs": self.max_abs, "max_rel": self.max_rel}

    def __str__(self) -> str:
        size = f"{self.size_bytes / 1e6:.2f} MB" + (" (+ external data)" if self.data_path else "")
        lines = [f"{self.path}  {size}  opset {self.opset}  {self.dtype}",
                 "  inputs:  " + ", ".join(f"{k} {v}" for k, v in self.inputs.items() if k not in self.adapter_inputs),
                 "  outputs: " + ", ".join(f"{k} {v}" for k, v in list(self.outputs.items())[:4])
                 + (f", … {len(self.outputs) - 4} more" if len(self.outputs) > 4 else "")]
        if self.adapter_inputs:
            lines.append(f"  adapter inputs: {len(self.adapter_inputs)} (default zeros = base model)")
        if self.checks:
            lines.append(f"  parity vs PyTorch: max abs {self.max_abs:.2e}, max rel {self.max_rel:.2e} over "
                         f"{len(self.checks)} checks (tolerance {self.tolerance:g}) on {', '.join(self.providers)}")
        if self.optimize.get("fused"):
            lines.append(f"  optimize={self.optimize['level']} ({self.optimize['target']}): "
                         + ", ".join(f"{k} {v}" for k, v in self.optimize["fused"].items()))
        if self.quantization and self.quantization.get("max_abs") is not None:
            q = self.quantization
            lines.append(f"  int8 ({q['mode']}) vs PyTorch: max abs {q['max_abs']:.2e}, max rel {q['max_rel']:.2e}, "
                         f"argmax agreement {q['argmax_agreement']}")
        return "\n".join(lines)


def _fold(pm):
    """Run :func:`peftfx.fold` (input-independent adapter compute → constants)."""
    return fold(pm)


def _inputs_of(pm: PeftModel, example_inputs: Any) -> dict[str, torch.Tensor]:
    names = pm.peft_info.input_names
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        example_inputs = dict(zip(names, example_inputs))
    if not isinstance(example_inputs, dict) or not tensor_inputs(example_inputs):
        raise ExportError("export_onnx needs example_inputs: a dict of tensors such as {'input_ids': ids} "
                          f"(the model takes {names}).")
    unknown = [k for k in example_inputs if k not in names]
    if unknown:
        raise ExportError(f"example_inputs has {unknown}, which the traced model does not take; it takes {names}.")
    return tensor_inputs(example_inputs)


def _check_args(model, path, dtype, kv_cache, source, opset) -> str:
    if not isinstance(model, nn.Module):
        raise ExportError(f"export_onnx takes a model (PeftModel or nn.Module), got {type(model).__name__}.")
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {DTYPES}, got {dtype!r}.")
    if not isinstance(opset, int) or opset < 18:
        raise ExportError(f"opset must be an int ≥ 18 (the torch.onnx dynamo exporter's minimum), got {opset!r}.")
    if kv_cache not in (False, True, None, "padded"):
        raise ExportError(f"kv_cache must be False, True or 'padded' (the decode step also takes attention_mask and "
                          f"position_ids, for left-padded batches), got {kv_cache!r}.")
    if kv_cache and isinstance(model, PeftModel) and source is None:
        raise ExportError("kv_cache=True needs source=<the Hugging Face model the PeftModel was traced from>: "
                          "the cache graph is traced from its code and receives the PeftModel's weights and adapters.")
    path = os.fspath(path)
    if not path.endswith(".onnx"):
        raise ExportError(f"the output path must end with .onnx, got {path!r}.")
    if os.path.isdir(path):
        raise ExportError(f"{path} is a folder; give a file path ending with .onnx.")
    return path


def export_onnx(model: nn.Module, path: str | os.PathLike, example_inputs: Any = None, *, dtype: str = "float32",
                opset: int = DEFAULT_OPSET, kv_cache: bool | str = False, source: nn.Module | None = None,
                adapter_inputs: bool = False, verify: bool = True, tolerance: float | None = None,
                external_data: bool | None = None, device: str | None = None,
                metadata: dict[str, str] | None = None, optimize: str | None = None,
                quantization: Any = None) -> ExportReport:
    """Export ``model`` (a PeftModel, or any module peftfx can trace) to a verified ONNX file at ``path``.

    Mergeable adapters are merged and ``peftfx.fold`` (when available) folds input-independent adapter compute
    first, so the graph is the base graph with updated weights. ``kv_cache=True`` exports the decode-step graph of
    a causal LM (``source`` = the Hugging Face model the PeftModel came from) for :meth:`Runtime.generate`;
    ``kv_cache="padded"``: that step also takes ``attention_mask`` and ``position_ids`` (left-padded batches).
    ``adapter_inputs=True`` keeps adapters unmerged with their parameters as named graph inputs (see
    :mod:`peftfx.export.adapters`). Raises :class:`peftfx.ExportError` — and leaves nothing at ``path`` — if any
    step or the verification fails. ``device`` picks the ONNX Runtime device for verification (default: auto);
    ``metadata`` adds string entries to the file's metadata. ``optimize`` (``"none"``/``"basic"``/``"all"``,
    default automatic): ONNX Runtime fusions, :mod:`peftfx.export.optimize`. ``dtype="int8"`` quantizes the verified
    float32 file (``quantization``: :class:`peftfx.export.quantize.Int8` or a dict of its fields) and checks its
    accuracy; ``dtype="bfloat16"`` needs the CUDA provider (:mod:`peftfx.export.quantize`).
    """
    path = _check_args(model, path, dtype, kv_cache, source, opset)
    from .quantize import serving_args, set_dtype, to_int8

    level, target, qcfg = serving_args(dtype, optimize, device, quantization, kv_cache, adapter_inputs)
    fdtype = {"int8": "float32", "bfloat16": "float16"}.get(dtype, dtype)      # the dtype the exporter writes
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    pm = model if isinstance(model, PeftModel) else _trace(model, example_inputs)
    if not isinstance(model, PeftModel):
        source = model if kv_cache else source
    inputs = _inputs_of(pm, example_inputs)
    stages["trace"] = time.perf_counter() - t0
    tmpdir = make_temp_dir(path, "export", ExportError, "the ONNX model")   # cleans stale ones there (peftfx._fs)
    try:
        plan = _prepare(pm, inputs, kv_cache, source, adapter_inputs, stages)
        plan["metadata"] = {str(k): str(v) for k, v in (metadata or {}).items()} | {"peftfx.optimize": level}
        plan["optimize"] = (level, target, optimize is not None)      # the default falls back; an asked level raises
        tmp = os.path.join(tmpdir, os.path.basename(path))
        big = external_data if external_data is not None else _param_bytes(plan["model"]) > _TWO_GB
        report = _write(plan, tmp, fdtype, opset, big, stages)
        report.optimize = plan["optimized"]
        if dtype == "bfloat16":
            from .quantize import to_bfloat16

            to_bfloat16(tmp)
            set_dtype(tmp, report, dtype)
        if verify:
            from ._verify import verify_export

            t = time.perf_counter()
            report.tolerance = TOLERANCE[report.dtype] if tolerance is None else float(tolerance)
            report.checks, report.providers = verify_export(tmp, pm, plan, report.tolerance, device)
            stages["verify"] = time.perf_counter() - t
        if qcfg is not None:
            to_int8(tmp, pm, plan, qcfg, report, verify, stages)
        _move_into_place(tmpdir, tmp, path, report)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    stages["total"] = time.perf_counter() - t0
    report.stages = stages
    log.info("exported %s (%.1fs): %s", path, stages["total"], report)
    return report


def _trace(model: nn.Module, example_inputs: Any) -> PeftModel:
    from ..trace import trace

    if example_inputs is None:
        raise ExportError("export_onnx needs example_inputs, e.g. {'input_ids': ids}, to trace the model.")
    return trace(model, example_inputs)


def _prepare(pm: PeftModel, inputs: dict, kv_cache: bool, source, adapter_inputs: bool, stages: dict) -> dict:
    """Merge/fold (or keep adapters as inputs) and build the flat module to export, with its inputs and axes."""
    from .adapters import adapter_inputs as list_adapter_inputs

    t = time.perf_counter()
    work = pm
    if adapter_inputs and pm.peft_info.multi.get("adapters"):
        raise ExportError("adapter_inputs=True exports one adapter layout; this model holds several named adapters. "
                          "Export a model with one adapter (peftfx.load_adapter) and write each named adapter with "
                          "write_onnx_adapter(model, path, adapter=name).")
    if (kv_cache or adapter_inputs) and any(r.merged for r in pm.peft_info.adapters.values()):
        work = unmerge(pm)
    plan: dict[str, Any] = {"kv": None, "entries": [], "prefix": ""}
    if kv_cache:
        from ._kv import MASK_INPUTS, PREFIX, build_step_model, past_names

        if "input_ids" not in inputs:
            raise ExportError("kv_cache=True needs example_inputs with 'input_ids'.")
        work, inputs, layout = build_step_model(work, source, inputs["input_ids"], padded=kv_cache == "padded")
        plan.update(kv=layout, prefix=PREFIX + ".", kv_config=getattr(source, "config", None))
        names = ["input_ids"] + (list(MASK_INPUTS) if layout.padded else []) + past_names(layout.layers)
        stages["cache graph"] = time.perf_counter() - t
        t = time.perf_counter()
    else:
        names = list(inputs)
    if not adapter_inputs:
        work = merge(work)
    stages["merge"] = time.perf_counter() - t
    t = time.perf_counter()
    work = _fold(work)
    stages["fold"] = time.perf_counter() - t
    if adapter_inputs:
        plan["entries"] = list_adapter_inputs(work, plan["prefix"])
    # dynamic axes follow what the trace proved, per input (a size the trace fixed stays fixed); the cache graph
    # and a model traced with dynamic=False take the default batch/sequence axes
    axes = None if kv_cache else traced_axes(pm, inputs)
    if axes is None:
        axes = dynamic_axes(dict(zip(names, inputs.values())), past=past_names(plan["kv"].layers) if kv_cache else ())
        if "attention_mask" in axes and kv_cache:
            TOTAL = "total_sequence"        # the mask covers past + new tokens
            axes["attention_mask"] = {0: BATCH, 1: TOTAL}
    plan.update(model=work, inputs=inputs, names=names, axes=axes)
    return plan


def _param_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _single_graph(work, inputs=None):
    """A fork of ``work`` that runs one graph only: with ``inputs``, the graph it runs for them in eval mode (a model
    traced in train mode keeps BatchNorm's batch statistics, stochastic depth and every ``if self.training:``
    branch on their train side; the eval-mode variant has them as the original module has in eval)."""
    if getattr(work, "peft_variants", None) is None:
        return work
    if inputs is not None:
        from ..variants import variant_for

        variant = variant_for(work, dict(inputs), training=False)
        if variant is not work:          # a graph of its own, built for this export (merged adapters are weights)
            variant.__dict__.pop("_peftfx_variants", None)
            return variant
    out = work.fork()
    out.__dict__.pop("_peftfx_variants", None)
    return out


def _write(plan: dict, tmp: str, dtype: str, opset: int, big: bool, stages: dict) -> ExportReport:
    inputs, entries = plan["inputs"], plan["entries"]
    work = _single_graph(plan["model"], None if entries else inputs)
    t = time.perf_counter()
    flat = FlatModule(work, list(inputs), [e.path for e in entries])
    args = tuple(inputs.values()) + tuple(work.get_parameter(e.path).detach() for e in entries)
    axes = [plan["axes"][n] for n in plan["names"]] + [{} for _ in entries]
    with keep_modes(work), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        work.eval()
        with torch.no_grad():
            out_keys = [n for n, _ in flatten_outputs(work(**inputs))]
        io_names = plan["names"] + [e.name for e in entries]
        out_names = unique_output_names(out_keys, io_names)
        translations = grouped_mm_translations(work)
        program = None
        if not entries and os.environ.get("PEFTFX_EXPORT_REUSE", "1") != "0":
            try:        # the traced graph as it is: no second torch.export
                ep, plan["limits"] = program_from_graph(work, inputs, plan["names"], axes, len(out_keys))
                stages["program from graph"] = time.perf_counter() - t
                plan["reuse"] = {"graph": True}
                t = time.perf_counter()
                program = _to_onnx(ep, opset, io_names, out_names, translations, plan, stages)
            except NotReusable as e:
                log.info("export_onnx: a fresh torch.export, the traced graph cannot be reused: %s", e)
                plan["reuse"] = {"graph": False, "reason": str(e)}
            except Exception as e:  # noqa: BLE001 - the exporter refused the reused graph: today's route decides
                log.warning("export_onnx: the reused graph did not translate (%s); exporting with a fresh "
                            "torch.export instead", _first_line(e))
                plan["reuse"] = {"graph": False, "reason": f"translation failed: {_first_line(e)}"}
        if program is None:
            t = time.perf_counter()
            ep, plan["limits"] = export_program(flat.eval(), args, axes)
            stages["torch.export"] = time.perf_counter() - t
            t = time.perf_counter()
            try:
                program = _to_onnx(ep, opset, io_names, out_names, translations, plan, stages)
            except Exception as e:  # the exporter raises its own error types; name the op when it says which
                raise ExportError(f"torch.onnx could not translate the graph to ONNX: {_first_line(e)}") from e
        _drop_stack_traces(program.model)
        # a float32 file without adapter inputs or cache: axis names and metadata set in memory, before the one
        # write (the fusions keep both); otherwise _postprocess reads the file back to set them
        if dtype == "float32" and not entries and plan["kv"] is None:
            plan["io"] = _name_in_memory(program.model, plan, out_names, dtype, opset)
        try:
            ts = time.perf_counter()
            program.save(tmp, external_data=big)
            stages["onnx save"] = time.perf_counter() - ts
        except Exception as e:  # a write error of the exporter's own types
            raise ExportError(f"torch.onnx could not write the ONNX file: {_first_line(e)}") from e
    plan["out_names"], plan["out_keys"] = out_names, out_keys
    stages["onnx"] = time.perf_counter() - t
    from .optimize import optimize_file

    level, target, strict = plan.get("optimize", ("none", "cpu", True))
    plan["optimized"] = optimize_file(tmp, level, target, strict=strict)
    if plan["kv"] is not None:
        from ._kv import past_names
        from .optimize import optimize_kv_attention

        plan["kv"] = optimize_kv_attention(tmp, plan["optimized"], plan["kv"], plan.get("kv_config"))
        if plan["kv"].order == "bnsh":          # the past sequence axis moved from 1 to 2
            pasts = set(past_names(plan["kv"].layers))
            plan["axes"] = {n: ({0: a[0], 2: a[1]} if n in pasts and 1 in a else a)
                            for n, a in plan["axes"].items()}
    stages["optimize"] = plan["optimized"]["seconds"]
    t = time.perf_counter()
    _postprocess(tmp, plan, dtype, opset, big)
    stages["onnx postprocess"] = time.perf_counter() - t
    stages["onnx"] += stages["onnx postprocess"]
    return _report(tmp, plan, dtype, opset, big)


def _to_onnx(ep, opset: int, input_names: list, output_names: list, translations: dict, plan: dict,
             stages: dict):
    """``torch.onnx.export(ep, dynamo=True, optimize=True)``, without its decomposition step where that step could
    change nothing: every node of ``ep`` is an op with an ONNX translation in the exporter's registry and none
    mutates its inputs (the exporter decomposes exactly the ops it cannot translate, and its re-trace of a
    functional graph returns the same graph). Then the exporter's own remaining steps run as it runs them: explicit
    type promotion, assertion nodes removed, translation, opset conversion, onnxscript's optimiser, input and output
    names. ``plan["reuse"]["decompositions"]`` says which path ran (and why the full one, logged)."""
    reuse = plan.setdefault("reuse", {"graph": False})
    reason = "PEFTFX_EXPORT_REUSE=0" if os.environ.get("PEFTFX_EXPORT_REUSE", "1") == "0" else None
    registry = None
    try:
        from torch.onnx._internal._lazy_import import onnxscript_apis
        from torch.onnx._internal.exporter import (
            _constants,
            _core,
            _flags,
            _fx_passes,
            _ir_passes,
            _registration,
        )
    except ImportError as e:            # another torch: the public route
        reason = reason or f"torch.onnx internals not found ({e})"
    if reason is None:
        t = time.perf_counter()
        registry = _registry(_registration, max(opset, _constants.TORCHLIB_OPSET), translations)
        stages["onnx registry"] = time.perf_counter() - t
        t = time.perf_counter()
        ep._graph_module = _fx_passes.remove_assertion_nodes(ep.graph_module)   # as the exporter does, first
        rewritten = rewrite_untranslatable(ep.graph_module, registry.is_registered)
        reuse["identity reshapes dropped"] = drop_identity_reshapes(ep.graph_module)
        reason = _needs_decomposition(ep, registry)
        reuse["rewritten"] = rewritten
        stages["onnx rewrite"] = time.perf_counter() - t
    if reason is not None:
        reuse["decompositions"] = f"ran: {reason}"
        log.info("export_onnx: the exporter's decompositions run: %s", reason)
        if registry is not None:        # what torch.onnx.export does for a program, with the table built above
            return _core.export(ep, registry=registry, input_names=input_names, output_names=output_names,
                                opset_version=opset, optimize=True, verbose=False)
        return torch.onnx.export(ep, (), dynamo=True, opset_version=opset, verbose=False, optimize=True,
                                 input_names=input_names, output_names=output_names,
                                 custom_translation_table=translations)
    reuse["decompositions"] = "skipped: every op has an ONNX translation"

    @_flags.set_onnx_exporting_flag
    def translate():
        t = time.perf_counter()
        with torch.fx.experimental._config.patch(backed_size_oblivious=True):
            gm = ep.graph_module
            _fx_passes.insert_type_promotion_nodes(gm)
            ep._graph_module = _fx_passes.remove_assertion_nodes(gm)
        program = _core._exported_program_to_onnx_program(ep, registry=registry)
        program.model = onnxscript_apis.convert_version(program.model, opset)
        stages["onnx translate"] = time.perf_counter() - t
        t = time.perf_counter()
        program.optimize()
        stages["onnx onnxscript optimizer"] = time.perf_counter() - t
        _ir_passes.rename_inputs(program.model, input_names)
        _ir_passes.rename_outputs(program.model, output_names)
        return program

    return translate()


def _drop_stack_traces(model) -> None:
    """The exporter records each node's Python stack trace in the file (``pkg.torch.onnx.stack_trace``): absolute
    paths of this machine, and different text for one graph depending on where it was traced (a trace-cache hit, a
    replicated block), so equal models gave files of different sizes. Dropped; the other node metadata stays."""
    graphs = [model.graph, *model.functions.values()]
    for graph in graphs:
        for node in graph.all_nodes():
            node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)


_REGISTRIES: dict[int, Any] = {}


def _registry(registration, opset: int, translations: dict | None):
    """The exporter's table of ONNX translations for ``opset`` (torchlib's; built once per process — 1–3 s — and
    only read), or a fresh one with ``translations`` added."""
    if translations:
        registry = registration.ONNXRegistry.from_torchlib(opset_version=opset)
        for op, fn in translations.items():
            registry.register_op(op, fn, is_complex=False)
        return registry
    if opset not in _REGISTRIES:
        _REGISTRIES[opset] = registration.ONNXRegistry.from_torchlib(opset_version=opset)
    return _REGISTRIES[opset]


def _needs_decomposition(ep, registry) -> str | None:
    """Why the exporter's decomposition step could change ``ep``'s graph, or None when it could not."""
    import operator

    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if target is operator.getitem:
            continue
        if not registry.is_registered(target):
            return f"{target} has no ONNX translation of its own"
        if _mutates(node):
            return f"{target} mutates its input"
    return None


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith(("[", "#", "- "))]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def _metadata(plan: dict, dtype: str, opset: int, out_names: list) -> dict[str, str]:
    meta = {"peftfx.version": __version__, "peftfx.opset": str(opset), "peftfx.dtype": dtype,
            "peftfx.inputs": json.dumps(plan["names"]), "peftfx.outputs": json.dumps(out_names)}
    if plan["kv"] is not None:
        meta["peftfx.kv_cache"] = json.dumps(plan["kv"].to_dict())
    meta.update(plan.get("metadata", {}))
    return meta


def _name_in_memory(model, plan: dict, out_names: list, dtype: str, opset: int) -> dict[str, dict[str, list]]:
    """:func:`rename_dims` and the metadata of :func:`_postprocess` on the exporter's in-memory onnx_ir model;
    returns the named input and output shapes for the report (the fusion stage keeps a file's inputs and
    outputs as they are)."""
    import onnx_ir as ir

    def texts(value) -> list:
        return [d.value if isinstance(d, ir.SymbolicDim) else None for d in (value.shape or ())]

    rename = dim_renamer(plan["axes"], ((v.name, texts(v)) for v in model.graph.inputs))
    if rename is not None:
        values = list(model.graph.inputs) + list(model.graph.outputs)
        values += [v for node in ir.traversal.RecursiveGraphIterator(model.graph) for v in node.outputs]
        for v in values:
            if v.shape is not None and any(isinstance(d, ir.SymbolicDim) and d.value for d in v.shape):
                v.shape = ir.Shape([ir.SymbolicDim(rename(d.value)) if isinstance(d, ir.SymbolicDim) and d.value
                                    else d for d in v.shape])
    for k, v in _metadata(plan, dtype, opset, out_names).items():
        model.metadata_props[k] = v

    def dims(value) -> list:
        return [d.value if isinstance(d, ir.SymbolicDim) else int(d) for d in (value.shape or ())]

    return {"inputs": {v.name: dims(v) for v in model.graph.inputs},
            "outputs": {v.name: dims(v) for v in model.graph.outputs}}


def _postprocess(tmp: str, plan: dict, dtype: str, opset: int, big: bool) -> None:
    """Name the dynamic axes, convert to float16, add adapter defaults and metadata, and check the model."""
    import onnx

    from .adapters import _set_meta, zero_defaults

    if plan.get("io") is not None:  # named in memory before the write (_name_in_memory): the check alone
        _check(tmp, plan)
        return
    proto = onnx.load(tmp, load_external_data=(dtype == "float16"))
    rename_dims(proto, plan["axes"])
    if dtype == "float16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            proto = convert_float_to_float16(proto, keep_io_types=True)
        _toposort(proto.graph)
    if plan["entries"]:
        zero_defaults(proto, plan["entries"], "float32")
    for k, v in _metadata(plan, dtype, opset, plan["out_names"]).items():
        _set_meta(proto, k, v)
    data = tmp + ".data"
    if dtype == "float16" and os.path.exists(data):
        os.remove(data)
    if big and dtype == "float16":
        onnx.save(proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=os.path.basename(data))
    else:
        onnx.save(proto, tmp)
    _check(tmp, plan)


def _check(tmp: str, plan: dict) -> None:
    import onnx

    try:
        onnx.checker.check_model(tmp)
    except onnx.checker.ValidationError as e:
        if plan.get("optimized", {}).get("fused") and "No Op registered for" in str(e):
            return      # ONNX Runtime's own ops (fused file: checked before fusing, loaded and verified in ORT)
        raise ExportError(f"onnx.checker rejected the exported model: {str(e).splitlines()[0][:300]}") from None


def _toposort(graph) -> None:
    """Order nodes so each comes after the producers of its inputs (the float16 converter may append its casts)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, order = list(graph.node), []
    while pending:
        rest = [n for n in pending if not all(i in ready for i in n.input)]
        done = [n for n in pending if all(i in ready for i in n.input)]
        if not done:
            raise ExportError(f"the float16 graph has a cycle or a missing tensor at node {rest[0].name!r}.")
        for n in done:
            ready.update(n.output)
        order += done
        pending = rest
    del graph.node[:]
    graph.node.extend(order)


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _report(tmp: str, plan: dict, dtype: str, opset: int, big: bool) -> ExportReport:
    import onnx

    data = tmp + ".data"
    if plan.get("io") is not None:      # the file's inputs and outputs as named in memory (_name_in_memory)
        inputs, outputs = plan["io"]["inputs"], plan["io"]["outputs"]
    else:
        proto = onnx.load(tmp, load_external_data=False)
        inputs = {i.name: _dims(i) for i in proto.graph.input}
        outputs = {o.name: _dims(o) for o in proto.graph.output}
    return ExportReport(path=tmp, data_path=data if os.path.exists(data) else None, opset=opset, dtype=dtype,
                        inputs=inputs, outputs=outputs,
                        size_bytes=os.path.getsize(tmp) + (os.path.getsize(data) if os.path.exists(data) else 0),
                        tolerance=TOLERANCE[dtype], kv_cache=None if plan["kv"] is None else plan["kv"].to_dict(),
                        adapter_inputs=[e.name for e in plan["entries"]])


def _move_into_place(tmpdir: str, tmp: str, path: str, report: ExportReport) -> None:
    data = tmp + ".data"
    if os.path.exists(data):
        os.replace(data, path + ".data")
        report.data_path = path + ".data"
    elif os.path.exists(path + ".data"):
        os.remove(path + ".data")       # a stale companion of an older export at this path
    os.replace(tmp, path)
    report.path = path
