"""Shared benchmark helpers: interleaved timing with medians, JSON + markdown output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Callable

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


#: Source the subprocess snippets that apply peftfx to the 7B-shaped Llama on ``meta`` start from (after their own
#: imports and settings): its config ``cfg``, and ``hwm_mb()``, the peak RSS of that process image (VmHWM;
#: ru_maxrss would carry the parent's peak across fork+exec).
LLAMA_7B_META = r"""
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000)
def hwm_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
"""


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 15, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call for each fn, run A B C, C B A, A B C … so machine noise hits all alike and no
    function always runs first (caches and frequency boosts favour the first of a round)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns.items())
    for i in range(repeats):
        for k, f in (order if i % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def environment() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count()}


def write(name: str, results: dict, table: list[tuple]) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    tmp = os.path.join(RESULTS, f".{name}.json.tmp")
    with open(tmp, "w") as f:
        json.dump({"env": environment(), "results": results}, f, indent=2)
    os.replace(tmp, os.path.join(RESULTS, f"{name}.json"))
    md = ["| " + " | ".join(str(c) for c in table[0]) + " |", "|" + "---|" * len(table[0])]
    md += ["| " + " | ".join(str(c) for c in row) + " |" for row in table[1:]]
    text = "\n".join(md)
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(f"threads={torch.get_num_threads()} torch={torch.__version__}\n\n{text}\n")
    print(text)


def llama(vocab_size: int = 32000):
    """The Llama-shaped bench model: 4 layers, hidden 512, 8 heads, seeded random init, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, hidden_size=512, intermediate_size=1376,
                                        num_attention_heads=8, num_key_value_heads=8,
                                        vocab_size=vocab_size)).eval()


def trainable(m) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def train_step(model, ids):
    """One AdamW step on a logsumexp surrogate loss over the logits, as a zero-argument callable."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def run():
        model.train()
        loss = model(input_ids=ids).logits.float().logsumexp(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return run


def infer(model, ids):
    """One eval-mode forward under ``inference_mode``, as a zero-argument callable."""
    def run():
        model.eval()
        with torch.inference_mode():
            model(input_ids=ids)
    return run
