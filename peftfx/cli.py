"""The ``peftfx`` command.

    peftfx inspect MODEL [--rules RULES.json|yaml]        sites (and what each rule would take)
    peftfx merge-export MODEL --adapter DIR -o OUT.onnx   merge, export, verify in ONNX Runtime
    peftfx run OUT.onnx --text "..." | --ids "1 2 3"      feed an exported model (--generate N for causal LMs;
                                                          --output logits.npy; timings per stage)
    peftfx bench OUT.onnx --shape 1x128 --shape 8x128     time the file in ONNX Runtime against PyTorch eager
    peftfx quickstart                                     LoRA-tune MiniLM offline, export, verify, compare

MODEL is a local Hugging Face model folder (config.json + weights) or ``package.module:factory`` — a callable
returning a module, ``(module, tokenizer)`` or ``{"model": …, "tokenizer": …, "example_inputs": {...}}``.
Every error is one line on stderr and a non-zero exit code; exports are written only once they verify.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

from ._errors import PeftfxError

__all__ = ["main", "load_model"]

EXIT_ERROR = 2


@dataclass
class Loaded:
    model: Any
    tokenizer: Any = None
    example_inputs: dict | None = None
    folder: str | None = None


def _fail(message: str) -> PeftfxError:
    return PeftfxError(message)


def load_model(spec: str, recorded: dict | None = None) -> Loaded:
    """A local Hugging Face folder or ``package.module:factory`` → :class:`Loaded`. ``recorded``: what an adapter
    folder says about its model (:func:`recorded_model`); a folder is then loaded as that class / task."""
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - a plain torch factory does not need transformers
        pass
    if os.path.isdir(spec):
        return _load_folder(spec, recorded or {})
    if ":" in spec and not os.path.exists(spec):
        return _load_factory(spec)
    raise _fail(f"model {spec!r} is neither a folder (with config.json) nor package.module:factory.")


#: HF PEFT task_type → the transformers Auto class that loads that head
_TASK_AUTO = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
              "TOKEN_CLS": "AutoModelForTokenClassification", "QUESTION_ANS": "AutoModelForQuestionAnswering",
              "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "FEATURE_EXTRACTION": "AutoModel"}


def recorded_model(adapters: list[str]) -> dict:
    """The model class and task the first adapter folder recorded (``auto_mapping.base_model_class``,
    ``task_type``; both formats), or {} when it recorded none (older folders)."""
    for folder in adapters[:1]:
        try:
            with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):
            return {}
        if not isinstance(config, dict):
            return {}
        mapping = config.get("auto_mapping") if isinstance(config.get("auto_mapping"), dict) else {}
        return {k: v for k, v in (("class", mapping.get("base_model_class")), ("task", config.get("task_type")))
                if isinstance(v, str) and v}
    return {}


def _model_class(config, recorded: dict):
    """The class to load a folder with: the adapter's recorded class, else its task's Auto class, else the
    folder's own ``architectures[0]``, else ``AutoModel``."""
    import transformers

    name = recorded.get("class")
    cls = getattr(transformers, name, None) if name else None
    if cls is None and recorded.get("task") in _TASK_AUTO:
        cls = getattr(transformers, _TASK_AUTO[recorded["task"]])
    if cls is None:
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
    return cls or transformers.AutoModel


def _load_folder(folder: str, recorded: dict | None = None) -> Loaded:
    import transformers

    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise _fail(f"{folder} has no config.json; give a Hugging Face model folder or package.module:factory.")
    transformers.logging.set_verbosity_error()
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    cls = _model_class(config, recorded or {})
    try:
        model = cls.from_pretrained(folder, local_files_only=True).eval()
    except OSError as e:
        raise _fail(f"cannot load the model weights from {folder}: {str(e).splitlines()[0]}") from None
    tokenizer = None
    if any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return Loaded(model, tokenizer, None, os.path.abspath(folder))


def _load_factory(spec: str) -> Loaded:
    from torch import nn

    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise _fail(f"cannot import {module_name!r} for model {spec!r}: {e}") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise _fail(f"{module_name} has no {attr!r} (model {spec!r}).")
    try:
        made = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    except Exception as e:          # the user's own code failed: say so, in one line
        raise _fail(f"model factory {spec} raised {type(e).__name__}: {_one_line(e)[:300]}") from None
    if isinstance(made, dict):
        loaded = Loaded(made.get("model"), made.get("tokenizer"), made.get("example_inputs"))
    elif isinstance(made, tuple) and len(made) == 2:
        loaded = Loaded(*made)
    else:
        loaded = Loaded(made)
    if not isinstance(loaded.model, nn.Module):
        raise _fail(f"{spec} returned {type(loaded.model).__name__}, not a torch module.")
    return loaded


def example_inputs(loaded: Loaded, batch: int, seq: int, ids_only: bool = False) -> dict:
    """The factory's example inputs, else tokenizer output, else random token ids (or pixels) from the config."""
    import inspect as pyinspect

    import torch

    if loaded.example_inputs is not None:
        ex = dict(loaded.example_inputs)
        return {"input_ids": ex["input_ids"]} if ids_only and "input_ids" in ex else ex
    model, tok = loaded.model, loaded.tokenizer
    params = pyinspect.signature(model.forward).parameters
    if tok is not None:
        enc = tok(["peftfx example input"] * batch, padding="max_length", max_length=seq, truncation=True,
                  return_tensors="pt")
        keys = ("input_ids",) if ids_only else ("input_ids", "attention_mask", "token_type_ids")
        return {k: enc[k] for k in keys if k in enc and k in params}
    cfg = getattr(model, "config", None)
    gen = torch.Generator().manual_seed(0)
    if getattr(cfg, "vocab_size", None):
        return {"input_ids": torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)}
    if getattr(cfg, "image_size", None) and getattr(cfg, "num_channels", None):
        size = cfg.image_size
        return {"pixel_values": torch.randn(batch, cfg.num_channels, size, size, generator=gen)}
    raise _fail(f"cannot make example inputs for {type(model).__name__}; return "
                "{'model': m, 'example_inputs': {...}} from the factory.")


class _Stages:
    """Prints ``name … 1.23s`` per stage and keeps the timings."""

    def __init__(self, quiet: bool = False):
        self.times: dict[str, float] = {}
        self.quiet = quiet

    def run(self, name: str, fn, *args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        self.times[name] = time.perf_counter() - t
        if not self.quiet:
            print(f"  {name:<28} {self.times[name]:7.2f}s", flush=True)
        return out


# ------------------------------------------------------------------------------------------------ commands
def cmd_inspect(args) -> int:
    from .apply import inspect

    rules = _rules(args.rules) if args.rules else None
    loaded = load_model(args.model)
    report = inspect(loaded.model, rules, example_inputs(loaded, args.batch, args.seq))
    print(json.dumps(report.to_dict(), indent=2, default=str) if args.json else str(report))
    return 0


def _rules(path: str):
    from .methods import rules_from_data

    if os.path.isdir(path):
        raise _fail(f"rules file {path!r} is a folder; give a .json or .yaml file with a list of rules.")
    if not os.path.isfile(path):
        raise _fail(f"rules file {path!r} not found (a .json or .yaml file with a list of rules).")
    return rules_from_data(path)        # every problem in the file is a RuleError naming it


def cmd_merge_export(args) -> int:
    from .export import adapter_inputs, export_onnx, write_onnx_adapter
    from .io.checkpoint import load_adapter

    if len(args.adapter) > 1 and not args.adapter_inputs:
        raise _fail("several --adapter folders need --adapter-inputs (one ONNX model, one adapter file each).")
    for a in args.adapter:
        if not os.path.isdir(a):
            raise _fail(f"adapter folder {a!r} not found.")
    if os.path.isdir(args.output) or not args.output.endswith(".onnx"):
        raise _fail(f"--output must be a file path ending with .onnx, got {args.output!r}.")
    st = _Stages(args.json)
    loaded = st.run("load model", load_model, args.model, recorded_model(args.adapter))
    ex = example_inputs(loaded, args.batch, args.seq, ids_only=args.kv_cache)
    models = [st.run(f"load adapter {os.path.basename(os.path.normpath(a))}", load_adapter, loaded.model, a, ex)
              for a in args.adapter]
    if args.adapter_inputs:
        layouts = [[(e.name, e.shape) for e in adapter_inputs(m)] for m in models]
        for a, lay in zip(args.adapter[1:], layouts[1:]):
            if lay != layouts[0]:
                raise _fail(f"adapter {a} has other sites or shapes than {args.adapter[0]}; one ONNX model serves "
                            "only adapters trained with the same rules on the same model.")
    carry = loaded.folder is not None or loaded.tokenizer is not None
    meta = {"peftfx.tokenizer": "."} if carry and loaded.tokenizer is not None else {}
    report = st.run("merge, export, verify", export_onnx, models[0], args.output, ex, dtype=args.dtype,
                    opset=args.opset, kv_cache=args.kv_cache, source=loaded.model, adapter_inputs=args.adapter_inputs,
                    device=args.device, metadata=meta, optimize=args.optimize,
                    quantization=_int8_options(args, ex))
    if carry:
        st.run("write tokenizer and config", _write_beside, loaded, args.output)
    files = []
    if args.adapter_inputs:
        out_dir = os.path.dirname(os.path.abspath(args.output))
        for a, m in zip(args.adapter, models):
            name = os.path.basename(os.path.normpath(a)) + ".onnx_adapter"
            files.append(st.run(f"write {name}", write_onnx_adapter, m, os.path.join(out_dir, name),
                                model=args.output))
    _summary(report, st, files, args.json)
    return 0


def _write_beside(loaded: Loaded, onnx_path: str) -> list[str]:
    """The model's config and tokenizer beside the exported file (``run --text`` finds them there; nothing records
    an absolute path)."""
    from ._fs import write_files_into

    def write(tmp: str) -> str:
        config = getattr(loaded.model, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(tmp)
        if loaded.tokenizer is not None and hasattr(loaded.tokenizer, "save_pretrained"):
            loaded.tokenizer.save_pretrained(tmp)
        return tmp

    return write_files_into(os.path.dirname(os.path.abspath(onnx_path)), write, ".peftfx-files-")


def _int8_options(args, ex) -> dict | None:
    """``--dtype int8``: dynamic, or static calibrated on the example inputs (``--int8 static``)."""
    if args.dtype != "int8":
        if args.int8 or args.int8_min_agreement is not None:
            raise _fail("--int8 and --int8-min-agreement apply to --dtype int8 only.")
        return None
    out: dict[str, Any] = {}
    if args.int8 == "static":
        out["calibration"] = [ex]
    if args.int8_min_agreement is not None:
        out["min_agreement"] = args.int8_min_agreement
    return out


def _summary(report, st: _Stages, files: list[str], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.to_dict() | {"cli_stages": st.times, "adapter_files": files}, indent=2, default=str))
        return
    print("  export stages: " + ", ".join(f"{k} {v:.2f}s" for k, v in report.stages.items()))
    print(str(report))
    for f in files:
        print(f"  adapter file {f}  {os.path.getsize(f) / 1e3:.1f} kB")


def _kv_mode(value: str) -> str:
    if value != "padded":
        raise argparse.ArgumentTypeError(f"--kv-cache takes no value or 'padded', got {value!r}")
    return value


def _parse_ids(texts: list[str], ragged: bool):
    """``(ids, mask)``: the rows left-padded to the longest (``ragged``: rows may differ in length; otherwise they
    must not), the mask 0 at padding."""
    import numpy as np

    rows = []
    for t in texts:
        try:
            rows.append([int(x) for x in t.replace(",", " ").split()])
        except ValueError:
            raise _fail(f"--ids takes integers separated by spaces or commas, got {t!r}.") from None
    if not rows or any(not r or (len(r) != len(rows[0]) and not ragged) for r in rows):
        raise _fail("every --ids row must be non-empty and of the same length (rows of different lengths need "
                    "--generate with a file exported with --kv-cache padded).")
    if any(not 0 <= x < 2**63 for r in rows for x in r):
        raise _fail("--ids takes token ids ≥ 0 that fit in 64 bits.")
    width = max(len(r) for r in rows)          # left padding, as generate takes a decoder's batch
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return ids, mask


def _tokenizer(args, rt):
    """``--tokenizer DIR``, else the tokenizer exported beside the model (``peftfx.tokenizer`` is a path relative
    to the model's folder; older exports recorded ``peftfx.source``). Needed for ``--text`` only: with ``--ids``
    a missing or unreadable tokenizer is no error (``--generate`` then decodes no text)."""
    recorded = rt.metadata.get("peftfx.tokenizer")
    folder = args.tokenizer or (os.path.join(os.path.dirname(os.path.abspath(args.onnx)), recorded) if recorded
                                else rt.metadata.get("peftfx.source"))
    if not folder:
        return None
    if not os.path.isdir(folder):
        if args.text and args.tokenizer:
            raise _fail(f"tokenizer folder {folder!r} not found; pass --tokenizer DIR.")
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        if args.text:
            raise _fail(f"cannot load the tokenizer from {folder}: {_one_line(e)[:200]}; pass --tokenizer DIR.") from None
        return None


def cmd_run(args) -> int:
    import numpy as np

    from .export import Runtime
    from .export._kv_fusion import cache_shape

    if args.output and not args.output.endswith((".npy", ".npz")):
        raise _fail(f"--output must end with .npy (logits) or .npz (every output), got {args.output!r}.")
    times: dict[str, float] = {}
    t = time.perf_counter()
    rt = Runtime(args.onnx, device=args.device)
    rt.vocab            # the token-range check reads the embedding sizes from the file once: part of loading
    times["load + session"] = time.perf_counter() - t
    times["session create"] = rt.session_seconds
    t = time.perf_counter()
    tok = _tokenizer(args, rt) if args.text or args.generate else None     # --ids alone needs no tokenizer
    if args.text:
        if tok is None:
            raise _fail("--text needs a tokenizer: pass --tokenizer DIR (a Hugging Face folder) or use --ids.")
        if args.generate:
            tok.padding_side = "left"      # a decoder's batch is left-padded, as Hugging Face generate takes it
        enc = tok(args.text, padding=True, return_tensors="np")
        feeds = {k: enc[k] for k in rt.inputs if k in enc}
        prompt_mask = enc.get("attention_mask")
    else:
        ids, prompt_mask = _parse_ids(args.ids, ragged=bool(args.generate))
        feeds = {"input_ids": ids}
        for name in ("attention_mask", "token_type_ids"):
            if name in rt.inputs:
                feeds[name] = np.ones_like(ids) if name == "attention_mask" else np.zeros_like(ids)
    adapter = None
    if args.adapter:
        rt.load_adapter("cli", args.adapter)
        adapter = "cli"
    times["inputs"] = time.perf_counter() - t
    t = time.perf_counter()
    if args.generate:
        out = rt.generate(feeds["input_ids"], args.generate, adapter=adapter, attention_mask=prompt_mask,
                          eos_token_id=getattr(tok, "eos_token_id", None) if tok is not None else None)
        times["run"] = time.perf_counter() - t
        outs = {"tokens": out}
        result = {"tokens": out.tolist()}
        if tok is not None:
            result["text"] = tok.batch_decode(out, skip_special_tokens=True)
    else:
        past = (rt.kv or {}).get("inputs", [])
        for name in past:
            feeds[name] = np.zeros(cache_shape(rt.kv, feeds["input_ids"].shape[0], 0), rt.input_dtype(name))
        outs = rt.run(feeds, adapter=adapter)
        times["run"] = time.perf_counter() - t
        result = {k: _describe(v) for k, v in outs.items() if not k.startswith("present.")}
    result["providers"] = rt.providers
    result["provider_reason"] = rt.provider_reason
    result["timings_s"] = {k: round(v, 6) for k, v in times.items()}
    if args.output:
        result["output"] = _save_outputs(args.output, outs)
    print(json.dumps(result, indent=None if not args.json else 2))
    if not args.json:
        print("  " + "  ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times.items()) + f"  ({rt.provider})",
              file=sys.stderr)
    return 0


def _save_outputs(path: str, outs: dict) -> str:
    """``.npy``: ``logits`` (or ``tokens``, or the only/first output); ``.npz``: every output. Written to a temporary
    name beside ``path`` and renamed into place."""
    import numpy as np

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise _fail(f"--output folder {folder} does not exist.")
    tmp = os.path.join(folder, f".{os.path.basename(path)}.peftfx-{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            if path.endswith(".npz"):
                np.savez(f, **{k: np.asarray(v) for k, v in outs.items()})
                what = ", ".join(outs)
            else:
                what = next((k for k in ("logits", "tokens") if k in outs), next(iter(outs)))
                np.save(f, np.asarray(outs[what]))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return f"{path} ({what})"


def _describe(v) -> dict:
    import numpy as np

    d: dict[str, Any] = {"shape": list(v.shape)}
    if v.dtype.kind == "f" and v.ndim >= 2:
        last = v[:, -1] if v.ndim == 3 else v
        e = np.exp(last - last.max(-1, keepdims=True))
        probs = e / e.sum(-1, keepdims=True)
        d["argmax"] = last.argmax(-1).tolist()
        d["prob"] = [round(float(p[i]), 4) for p, i in zip(probs, last.argmax(-1))]
    elif v.size <= 64:
        d["values"] = v.tolist()
    return d


def _parse_shape(text: str) -> tuple[int, int]:
    try:
        b, s = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise _fail(f"--shape takes BATCHxSEQUENCE such as 1x128, got {text!r}.") from None
    if b < 1 or s < 1:
        raise _fail(f"--shape sizes must be ≥ 1, got {text!r}.")
    return b, s


def _bench_feeds(rt, batch: int, seq: int):
    """Random token ids in the model's vocabulary, an all-ones mask, zero token types; an empty past."""
    import numpy as np

    from .export._kv_fusion import cache_shape

    gen = np.random.default_rng(batch * 1000 + seq)
    feeds: dict[str, Any] = {}
    for name in rt.inputs:
        if name in (rt.kv or {}).get("inputs", []):
            feeds[name] = np.zeros(cache_shape(rt.kv, batch, 0), rt.input_dtype(name))
        elif name == "input_ids":
            feeds[name] = gen.integers(0, rt.vocab.get(name, 100), (batch, seq), dtype=np.int64)
        elif name in ("attention_mask", "token_type_ids", "position_ids"):
            feeds[name] = np.ones((batch, seq), np.int64) if name == "attention_mask" else \
                (np.zeros((batch, seq), np.int64) if name == "token_type_ids" else np.tile(np.arange(seq), (batch, 1)))
        else:
            raise _fail(f"peftfx bench feeds token models (input_ids, masks); {rt.path} also takes {name!r}.")
    return feeds


def cmd_bench(args) -> int:
    """Median latency of the ONNX file per shape; beside it PyTorch eager of the source model when one is known."""
    import inspect
    import statistics

    import torch

    from .export import Runtime

    shapes = [_parse_shape(s) for s in args.shape or ["1x128"]]
    torch.set_num_threads(args.threads)
    rt = Runtime(args.onnx, device=args.device, threads=args.threads, spin=False)
    source = args.model or rt.metadata.get("peftfx.source")
    eager = None
    if source and not args.no_eager:
        eager = load_model(source).model.eval()
    rows = []
    for b, s in shapes:
        feeds = _bench_feeds(rt, b, s)
        fns = {"onnxruntime": lambda feeds=feeds: rt.run(feeds)}
        if eager is not None:
            tf = {k: torch.from_numpy(v) for k, v in feeds.items() if k in ("input_ids", "attention_mask",
                                                                               "token_type_ids", "position_ids")}
            if "use_cache" in inspect.signature(eager.forward).parameters:
                tf["use_cache"] = False          # the exported file computes no cache either
            fns["pytorch_eager"] = lambda tf=tf: eager(**tf)
        times: dict[str, list[float]] = {k: [] for k in fns}
        with torch.inference_mode():
            for f in fns.values():          # warm-up
                f()
            order = list(fns.items())
            for i in range(args.repeats):   # interleaved, alternating order
                for k, f in (order if i % 2 == 0 else order[::-1]):
                    t = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"shape": f"{b}x{s}", "median_ms": {k: v * 1e3 for k, v in med.items()}}
        if "pytorch_eager" in med:
            row["ort/eager"] = med["onnxruntime"] / med["pytorch_eager"]
        rows.append(row)
    result = {"file": args.onnx, "provider": rt.provider, "provider_reason": rt.provider_reason,
              "threads": args.threads, "repeats": args.repeats, "eager_source": source if eager is not None else None,
              "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.onnx}  {rt.provider}  threads {args.threads}  median of {args.repeats} interleaved runs")
    if eager is None:
        print("  (no PyTorch reference: the file records no source model folder; pass --model DIR)")
    for row in rows:
        ms = row["median_ms"]
        line = f"  {row['shape']:>10}  onnxruntime {ms['onnxruntime']:8.2f} ms"
        if "pytorch_eager" in ms:
            line += f"   pytorch eager {ms['pytorch_eager']:8.2f} ms   ratio {row['ort/eager']:.3f}"
        print(line)
    return 0


def cmd_quickstart(args) -> int:
    from .quickstart import run_quickstart

    run_quickstart(steps=args.steps, out=args.out, threads=args.threads, progress=not args.no_progress)
    return 0


# ------------------------------------------------------------------------------------------------ main
def _count(minimum: int):
    """An argparse type: an int ≥ ``minimum`` (a bad value is a usage error, exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    parse.__name__ = "int"
    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peftfx", description="Parameter-efficient fine-tuning as graph passes.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("inspect", help="list the sites a rules file would take on a model")
    i.add_argument("model", help="Hugging Face model folder or package.module:factory")
    i.add_argument("--rules", help="rules as a .json or .yaml file (omit: list every site and its roles)")
    m = sub.add_parser("merge-export", help="model + adapter → merged, verified ONNX")
    m.add_argument("model", help="Hugging Face model folder or package.module:factory")
    m.add_argument("--adapter", action="append", required=True, help="adapter folder (peftfx or Hugging Face PEFT)")
    m.add_argument("-o", "--output", required=True, help="output .onnx path")
    m.add_argument("--dtype", choices=("float32", "float16", "bfloat16", "int8"), default="float32",
                   help="int8: quantized for CPU after float32 verification; bfloat16: CUDA only")
    m.add_argument("--optimize", choices=("none", "basic", "all"), default=None,
                   help="ONNX Runtime fusions (default: all; none for float16 on CPU)")
    m.add_argument("--int8", choices=("dynamic", "static"), default=None,
                   help="int8 mode (static: calibrated on the example inputs); default dynamic")
    m.add_argument("--int8-min-agreement", type=float, default=None,
                   help="least argmax agreement with PyTorch the int8 file must keep (default 0.95)")
    m.add_argument("--opset", type=_count(7), default=18)
    m.add_argument("--kv-cache", nargs="?", const=True, default=False, type=_kv_mode, metavar="padded",
                   help="export the decode step with key/value cache I/O; '--kv-cache padded' also takes "
                        "attention_mask and position_ids, so `run --generate` serves prompts of different lengths")
    m.add_argument("--adapter-inputs", action="store_true",
                   help="keep adapters unmerged as graph inputs; write one .onnx_adapter per --adapter")
    m.add_argument("--device", choices=("cpu", "cuda"), default=None, help="ONNX Runtime device for verification")
    r = sub.add_parser("run", help="feed text or token ids to an exported model")
    r.add_argument("onnx", help="exported .onnx file")
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--text", nargs="+", help="text(s) to tokenize (needs a tokenizer)")
    g.add_argument("--ids", action="append", help="token ids, e.g. '1 2 3' (repeat for a batch)")
    r.add_argument("--tokenizer", help="Hugging Face folder with the tokenizer (default: the exported model's)")
    r.add_argument("--generate", type=_count(0), default=0, help="greedy-generate N tokens (kv-cache exports)")
    r.add_argument("--adapter", help=".onnx_adapter file to activate (adapter-input exports)")
    r.add_argument("--device", choices=("cpu", "cuda"), default=None)
    r.add_argument("--output", help="save outputs: .npy (logits, or generated tokens) or .npz (every output)")
    b = sub.add_parser("bench", help="time an exported file in ONNX Runtime against PyTorch eager")
    b.add_argument("onnx", help="exported .onnx file")
    b.add_argument("--shape", action="append", help="BATCHxSEQUENCE, e.g. 1x128 (repeatable; default 1x128)")
    b.add_argument("--model", help="PyTorch reference (default: the source folder recorded in the file)")
    b.add_argument("--no-eager", action="store_true", help="time the file alone")
    b.add_argument("--threads", type=_count(1), default=1, help="threads for ONNX Runtime and PyTorch (default 1)")
    b.add_argument("--repeats", type=_count(1), default=20)
    b.add_argument("--device", choices=("cpu", "cuda"), default=None)
    q = sub.add_parser("quickstart", help="LoRA-tune MiniLM offline, merge, export, verify, compare latency")
    q.add_argument("--steps", type=_count(1), default=60)
    q.add_argument("--out", default="peftfx-quickstart", help="output folder")
    q.add_argument("--threads", type=_count(1), default=1, help="threads for PyTorch and ONNX Runtime (default 1)")
    q.add_argument("--no-progress", action="store_true")
    for sp in (i, m):
        sp.add_argument("--batch", type=_count(1), default=2, help="example batch (≥ 2 keeps the batch axis dynamic)")
        sp.add_argument("--seq", type=_count(1), default=16, help="example sequence length")
    for sp in (i, m, r, b):
        sp.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _one_line(e: BaseException) -> str:
    text = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
    return text or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)     # "torchvision is not installed" notices
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    commands = {"inspect": cmd_inspect, "merge-export": cmd_merge_export, "run": cmd_run, "bench": cmd_bench,
                "quickstart": cmd_quickstart}
    try:
        return commands[args.command](args)
    except PeftfxError as e:
        if args.debug:
            raise
        print(f"peftfx: error: {_one_line(e)}", file=sys.stderr)
    except (OSError, ImportError, ValueError) as e:
        if args.debug:
            raise
        print(f"peftfx: error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
    except KeyboardInterrupt:
        print("peftfx: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # anything else is a bug; still one line unless --debug
        if args.debug:
            raise
        print(f"peftfx: error: unexpected {type(e).__name__}: {_one_line(e)[:500]} (run with --debug for the "
              "traceback)", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
