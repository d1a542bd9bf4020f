import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Two intra-op threads (the CI machine has 2 cores); measured: one thread made the suite no faster.
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
