import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The CI machine has 2 cores. Under pytest-xdist (two workers, `-n 2` in pyproject) each worker takes one
# intra-op thread; a plain single-process run takes two.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

try:
    import transformers

    transformers.logging.set_verbosity_error()
except ImportError:  # pragma: no cover
    pass
