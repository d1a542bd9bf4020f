"""Forward overhead of the drop-in dispatch (issue 9): ``peft(**batch)`` — binding the call, its (mode, signature)
key and the graph lookup in :mod:`peftfx.variants` — against calling the same graph's code directly.

Llama 4 × 512 (bench/_common.llama), LoRA r=8 on q/v, eval, ``inference_mode``, batch 1 × 128 with an attention
mask (a signature the model was not traced with: the eval-mode variant), 1 torch thread, interleaved, medians.
``python -m bench.bench_dispatch`` → ``bench/results/dispatch.{json,md}``.
"""
from __future__ import annotations

import torch

import peftfx
from peftfx import LoRA, select
from peftfx.variants import variant_for

from ._common import interleaved, llama, write


def main(repeats: int = 30) -> dict:
    torch.set_num_threads(1)
    model = llama(vocab_size=4096)
    ids = torch.randint(0, 4096, (2, 16))
    peft = peftfx.apply(model, [LoRA(rank=8, targets=select.role("attn.q", "attn.v"))],
                        example_inputs={"input_ids": ids})
    peft.eval()
    batch = {"input_ids": torch.randint(0, 4096, (1, 128)), "attention_mask": torch.ones(1, 128, dtype=torch.long)}
    gm = variant_for(peft, batch, training=False)          # the graph peft(**batch) runs
    bound = peft.peft_variants.bind((), batch)              # its inputs as the dispatch binds them
    with torch.inference_mode():
        a, b = peft(**batch).logits, gm._graph_forward(**bound).logits
        assert torch.equal(a, b), "dispatch and direct call must run the same graph"
        med = interleaved({"dispatch": lambda: peft(**batch), "direct": lambda: gm._graph_forward(**bound)},
                          repeats=repeats, warmup=3)
    ratio = med["dispatch"] / med["direct"]
    table = [("case", "peft(**batch) ms", "graph code directly ms", "ratio"),
             ("Llama 4×512, 1×128, eval variant", f"{med['dispatch'] * 1e3:.2f}", f"{med['direct'] * 1e3:.2f}",
              f"{ratio:.3f}")]
    write("dispatch", {"median_s": med, "ratio": ratio, "repeats": repeats}, table)
    return med


if __name__ == "__main__":
    main()
