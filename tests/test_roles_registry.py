"""The role-detector registry: the built-in pipeline and its roles, a custom detector running in its declared
place and its role reaching ``select.role``, and registration errors. Every custom detector is unregistered."""
from __future__ import annotations

import importlib
import pkgutil
import sys

import pytest
import torch

import peftfx
import peftfx.roles
from peftfx import LoRA, select
from peftfx.roles import (DETECTORS, ROLES, DetectorError, assign_roles, pipeline, register_detector,
                          unregister_detector)
from peftfx.sites import find_sites
from tests import models as M

BUILTIN_ROLES = ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o", "mlp.up", "mlp.gate", "mlp.down",
                 "mlp.experts.up", "mlp.experts.gate", "mlp.experts.down", "mlp.router",
                 "embed", "embed.position", "embed.aux", "head")


@pytest.fixture
def register():
    """``register_detector`` that unregisters what it registered when the test ends."""
    names = []

    def reg(name, **kw):
        def decorate(fn):
            det = register_detector(name, **kw)(fn)
            names.append(name)
            return det
        return decorate
    yield reg
    for n in names:
        if n in DETECTORS:
            unregister_detector(n)


def _bert_sites():
    ids = M.ids()
    pm = peftfx.trace(M.bert(), {"input_ids": ids})
    return pm, find_sites(pm)


def test_builtin_detectors_are_discovered_and_ordered():
    modules = {m.name for m in pkgutil.iter_modules(peftfx.roles.__path__) if not m.name.startswith("_")}
    assert {"attention", "mlp", "embedding", "head"} <= modules
    assert all(f"peftfx.roles.{m}" in sys.modules for m in modules)
    assert [d.name for d in pipeline()] == ["attention", "mlp", "experts", "embedding", "head"]
    assert tuple(ROLES) == BUILTIN_ROLES and ROLES == BUILTIN_ROLES and "mlp.gate" in ROLES


def test_custom_detector_runs_in_declared_order_and_its_role_is_selectable(register):
    with pytest.raises(peftfx.RuleError, match="unknown role 'pooler'"):
        select.role("pooler")
    seen = {}

    # after mlp (dependency), before embedding (order 30) and head (order 40)
    @register("pooler", roles=("pooler",), order=25, after="mlp")
    def detect_pooler(ctx):
        seen.update({s.key: set(s.roles) for s in ctx.sites})
        for s in ctx.sites:
            if not s.roles and s.kind != "embedding" and any(
                    u.target is torch.ops.aten.tanh.default for u in ctx.dataflow.successors(s.node)):
                s.roles.add("pooler")

    assert [d.name for d in pipeline()] == ["attention", "mlp", "experts", "pooler", "embedding", "head"]
    assert tuple(ROLES) == BUILTIN_ROLES[:12] + ("pooler",) + BUILTIN_ROLES[12:]
    pm, sites = _bert_sites()
    assign_roles(pm.graph, sites)
    roles = {s.key: sorted(s.roles) for s in sites}
    # when it ran, attention and MLP roles were in place, embedding and head roles not yet
    assert seen["bert.encoder.layer.1.attention.self.query"] == {"attn.q"}
    assert seen["bert.encoder.layer.1.output.dense"] == {"mlp.down"}
    assert seen["bert.embeddings.word_embeddings"] == set() and seen["classifier"] == set()
    assert [k for k, r in roles.items() if "pooler" in r] == ["bert.pooler.dense"]
    assert roles["bert.pooler.dense"] == ["pooler"]
    assert roles["classifier"] == ["head"] and roles["bert.embeddings.word_embeddings"] == ["embed"]
    # the new role reaches the rules: select.role validates against the live ROLES and matches the site
    rep = peftfx.inspect(M.bert(), LoRA(rank=2, targets=select.role("pooler")), {"input_ids": M.ids()})
    assert [s["key"] for s in rep.to_dict()["rules"][0]["sites"]] == ["bert.pooler.dense"]

    unregister_detector("pooler")
    assert "pooler" not in DETECTORS and tuple(ROLES) == BUILTIN_ROLES
    with pytest.raises(peftfx.RuleError, match="unknown role 'pooler'"):
        select.role("pooler")
    pm, sites = _bert_sites()
    assign_roles(pm.graph, sites)
    assert all("pooler" not in s.roles for s in sites)


def test_a_detector_may_only_emit_its_declared_roles(register):
    @register("sloppy", roles=("sloppy.declared",), order=50, after="head")
    def sloppy(ctx):
        ctx.sites[0].roles.add("sloppy.undeclared")

    pm, sites = _bert_sites()
    with pytest.raises(peftfx.PassError, match="'sloppy'.*sloppy.undeclared.*does not declare"):
        assign_roles(pm.graph, sites)


def test_registration_errors(register):
    with pytest.raises(DetectorError, match="already registered"):
        register_detector("attention", roles=("x",))(lambda ctx: None)
    with pytest.raises(DetectorError, match="no role detector named 'nope'"):
        unregister_detector("nope")

    @register("orphan", roles=(), after="missing")
    def orphan(ctx):
        pass
    with pytest.raises(DetectorError, match="'orphan' runs after missing"):
        pipeline()
    unregister_detector("orphan")

    @register("a", roles=(), after="b")
    def a(ctx):
        pass

    @register("b", roles=(), after="a")
    def b(ctx):
        pass
    with pytest.raises(DetectorError, match="a, b wait on each other"):
        pipeline()


def test_reloading_a_detector_module_replaces_its_detector_in_place():
    before = DETECTORS["head"]
    importlib.reload(sys.modules["peftfx.roles.head"])
    assert DETECTORS["head"] is not before and DETECTORS["head"].run.__qualname__ == before.run.__qualname__
    assert [d.name for d in pipeline()] == ["attention", "mlp", "experts", "embedding", "head"]
