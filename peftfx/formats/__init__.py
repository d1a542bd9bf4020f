"""Adapter formats of other libraries. :mod:`peftfx.formats.hf` reads and writes Hugging Face PEFT folders."""
from __future__ import annotations

__all__: list[str] = []
