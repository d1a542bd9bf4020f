"""The architecture sweep as tests (marked ``sweep``: ``python -m pytest -m sweep``; the default run skips it).

Each model must pass every check of :func:`tests.sweep.harness.run` — HF PEFT parity ≤ 1e-5, merge ≤ 1e-4,
ONNX Runtime ≤ 1e-4 at a shape unlike the example — except the gaps listed in ``KNOWN`` with their reason. A
listed gap that starts passing is reported (``python -m tests.sweep.report`` rewrites the matrix), not failed."""
from __future__ import annotations

import pytest

from .harness import ALL, run

pytestmark = pytest.mark.sweep

#: model → {check: why it is expected to fail}; the README's coverage matrix lists the same
KNOWN: dict[str, dict[str, str]] = {
    "led": {c: "torch.export: Longformer's sliding-window attention pads to the window with a data-dependent guard"
            for c in ("roles", "lora", "ia3")},
}


@pytest.mark.parametrize("name", ALL)
def test_architecture(name):
    row = run(name)
    known = KNOWN.get(name, {})
    bad = {c: v for c, v in row.checks.items() if v.startswith("FAIL") and c not in known}
    fixed = [c for c in known if not str(row.checks.get(c, "FAIL")).startswith("FAIL")]
    if fixed:
        print(f"{name}: {fixed} now pass — remove them from KNOWN and the README matrix")
    assert not bad, f"{name}: {bad}"
