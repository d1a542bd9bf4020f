"""Methods: one file per method, discovered rather than listed.

:mod:`peftfx.methods.base` holds the contract (``MethodConfig``, ``AdapterModule``, the registry). Every public
module of this package (a file whose name does not start with ``_``) is imported here, and each registers its
config class with :func:`~peftfx.methods.base.register_method` (and, where it has one, its Hugging Face PEFT
converter): dropping ``methods/foo.py`` into this folder makes method ``foo`` available to ``apply``, rules as
data, ``load_adapter`` in a fresh process, ``inspect`` and export, with no list to edit.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import (METHODS, AdapterModule, GraphMethod, MethodConfig, register_method, rule_from_dict,
                   rules_from_data)

__all__ = ["METHODS", "MethodConfig", "AdapterModule", "GraphMethod", "register_method", "rule_from_dict",
           "rules_from_data", "discover"]


def discover() -> list[str]:
    """Import every public module of this package (idempotent); returns their names."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_") and m.name != "base")
    for name in names:
        importlib.import_module(f"{__name__}.{name}")
    return names


discover()
