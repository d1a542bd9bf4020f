"""Several named adapters on one base model: add, select, delete, combine, mixed batches (:mod:`.adapters`), and
the container module that holds them at each site (:mod:`.container`)."""
from __future__ import annotations

from .adapters import (active_adapters, adapter_names, adapter_view, add_adapter, combine, delete_adapter,
                       forward_mixed, is_multi, mixed_batch, set_active)
from .container import MultiLoRA, lora_factors, lora_pair

__all__ = ["add_adapter", "set_active", "active_adapters", "adapter_names", "delete_adapter", "combine",
           "mixed_batch", "forward_mixed", "adapter_view", "is_multi", "MultiLoRA", "lora_factors", "lora_pair"]
