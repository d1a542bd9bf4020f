"""Training framework integrations. Each submodule imports its framework lazily (``peftfx.integrations.lightning``
needs ``lightning``); the Hugging Face ``Trainer`` and plain PyTorch loops need nothing: the module from
:func:`peftfx.apply` is an ordinary ``nn.Module`` whose only trainable parameters are the adapters'."""
from __future__ import annotations

__all__: list[str] = []
