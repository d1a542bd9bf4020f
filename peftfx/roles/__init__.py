"""Structural roles of sites, read off the data flow of the graph (networkx), never from name tables.

Roles: ``attn.q``, ``attn.k``, ``attn.v`` (a fused projection carries all three plus ``attn.qkv`` and the
output rows of each slice), ``attn.o``, ``mlp.up``, ``mlp.gate``, ``mlp.down``, ``embed`` (token
embedding), ``embed.position``, ``embed.aux``, ``head`` (the last projection before an output), and on
mixture-of-experts blocks ``mlp.experts.up``/``gate``/``down`` (3-D expert weights; a fused ``gate_up_proj``
carries both gate and up with the rows of each) and ``mlp.router``.

Each family of roles is found by a detector in its own module of this package (:mod:`.attention`, :mod:`.mlp`,
:mod:`.embedding`, :mod:`.head`, :mod:`.experts`), registered with :func:`register_detector` when the module is imported; every
module of the package is imported here, so adding a file ``roles/foo.py`` adds a detector. :func:`assign_roles`
runs the detectors in the order they declare (``order``, ``after=``; see :mod:`.base`), and :data:`ROLES` is the
live union of the roles they declare.
"""
from __future__ import annotations

import importlib
import pkgutil

from ._graph import attention_nodes, dataflow_graph
from .base import (DETECTORS, ROLES, Detector, DetectorError, RoleContext, assign_roles, pipeline,
                   register_detector, role_names, unregister_detector)

__all__ = ["assign_roles", "ROLES", "dataflow_graph", "attention_nodes", "register_detector", "unregister_detector",
           "DETECTORS", "Detector", "DetectorError", "RoleContext", "pipeline", "role_names"]

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_") and _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")
del _info
