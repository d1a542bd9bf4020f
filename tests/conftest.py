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


# The in-process trace cache keeps 16 graphs by default; a worker runs ~70 distinct architectures/input specs, and
# with 16 some of the same small models were traced again after eviction (the keys of a full run, replayed on one
# worker: at most 85 misses at 16 entries, 72 at 64, 71 unbounded). Graphs hold no weights (peftfx.trace_cache).
from peftfx import trace_cache as _trace_cache

_trace_cache.MAX_ENTRIES = 64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

try:
    import transformers

    transformers.logging.set_verbosity_error()
except ImportError:  # pragma: no cover
    pass
