"""Merge and unmerge: fold mergeable adapters into the weights they modify, and back out.

``merge_pass`` is functional by default: it returns a fork whose merged weights are new tensors, so the
caller's model (and the user's original module, whose tensors the trace shares) keep their values.
Guarantees: every mergeable adapter's node is gone (a model with only mergeable adapters has exactly the
base graph's nodes, plus one ``get_attr`` per site whose weight was shared with another site — a tied
embedding/LM head — and had to be untied so that each adapter merges into its own copy), outputs equal the unmerged model up to float rounding, and the adapter parameters
are kept (unused) so ``unmerge_pass`` can restore the weights and re-splice the nodes.
Several adapters on one site fold in the order that reproduces the graph (see ``_fold_sequences``); an
adapter that would have to fold through a non-mergeable one stays in the graph, and merge logs why.

``safe=True`` (the default) refuses to write a non-finite weight, as Hugging Face PEFT's ``safe_merge``: a merged
weight holding NaN or ±infinity (a diverged adapter, an fp16 overflow) raises :class:`~peftfx.PassError` naming
the adapter and its site, and the model is unchanged — a functional merge checks each weight of its private copy
as it goes and drops the copy; an in-place merge first merges every site into a scratch copy and checks it, and
only then touches the shared weights. The check costs one ``isfinite`` per merged weight (in place: one merge
more per site, one weight copy at a time).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .._errors import PassError
from .._util import set_submodule
from ..sites import canonical_weight
from .base import PassResult, fail, graph_pass
from .checks import adapters_called_once, merged_adapters_have_no_node
from ..sites import site_calls
from .splice import adapter_calls, splice_one

__all__ = ["merge_pass", "unmerge_pass"]

log = logging.getLogger(__name__)


def _own_weight(gm, target: str, inplace: bool, owned: set[str]) -> torch.Tensor:
    """The weight tensor to update; on a fork, a private copy replaces the shared one first."""
    w = gm.get_parameter(target)
    if inplace or target in owned:
        return w
    fresh = nn.Parameter(w.detach().clone(), requires_grad=False)
    set_submodule(gm, target, fresh)
    owned.add(target)
    return fresh


def _weight_arg(site_node, target: str):
    for i, a in enumerate(site_node.args):
        if getattr(a, "op", None) == "get_attr" and a.target == target:
            return i, a
        if getattr(a, "op", None) == "call_function" and a.args and getattr(a.args[0], "target", None) == target:
            return None, a.args[0]   # weight behind a transpose
    return None, None


def _untie_if_shared(gm, rec, site_node) -> None:
    """A weight read by other nodes too (tied embedding / LM head, a reused module) gets a private copy
    for this site before merging, so merging one adapter cannot change another site's weight."""
    target = rec.site["weight"]
    w = gm.get_parameter(target)
    readers = [n for n in gm.graph.nodes
               if n.op == "get_attr" and _is_param(gm, n.target) and gm.get_parameter(n.target) is w]
    users = {u for r in readers for u in r.users}
    calls = set(site_calls(gm, site_node)) | {site_node}      # every call of a module called several times
    own = calls | {u for u in users if u.op == "call_function" and calls & set(u.users)}
    # a reads_weight adapter (DoRA) of this same site reads the weight too: that is not a tie
    adapters = gm.peft_info.adapters
    own |= {u for u in users if u.op == "call_module"
            and getattr(adapters.get(u.meta.get("peftfx", {}).get("adapter")), "node", None) == rec.node}
    if users <= own:
        return
    idx, node = _weight_arg(site_node, target)
    if node is None:
        raise fail("merge", f"cannot find the weight operand {target} of the site", site_node)
    new_target = f"{target}_untied_{rec.site['key'].replace('.', '_').replace('#', '_')}"
    set_submodule(gm, new_target, nn.Parameter(w.detach().clone(), requires_grad=False))
    with gm.graph.inserting_before(node if idx is None else site_node):
        fresh = gm.graph.get_attr(new_target)
    fresh.meta = dict(node.meta)
    if idx is None:                      # weight behind a transpose node used only by this site
        transpose = next(u for u in node.users if site_node in u.users)
        transpose.replace_input_with(node, fresh)
    else:
        site_node.replace_input_with(node, fresh)
    for other in gm.peft_info.adapters.values():     # every adapter of this site folds into the copy
        if other.node == rec.node and other.site["weight"] == target:
            other.site["weight"] = new_target
    log.info("merge: %s is shared with other sites; %s merges into a private copy %s", target, rec.name, new_target)


def _is_param(gm, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def _fold_sequences(pm) -> list[list[str]]:
    """Per site, its adapters in the order that folds exactly what the graph computes. A site computes
    y = O_k(…O_1(W·x')…) with x' = I_m(…I_1(x)): output adapters O in chain (rule) order, each reading x', and
    input adapters I, I_m nearest the weight; so W becomes f_k(…f_1(W)…) · I_m ⋯ I_1 — output adapters first,
    in chain order, then input adapters from the weight outwards. Unmerging walks this order backwards."""
    by_site: dict[str, list[str]] = {}
    for name, rec in pm.peft_info.adapters.items():
        by_site.setdefault(rec.node, []).append(name)
    seqs = []
    for names in by_site.values():
        inputs = [n for n in names if pm.get_submodule(n).position == "input"]
        seqs.append([n for n in names if n not in inputs] + inputs[::-1])
    return seqs


def _merge_order(pm) -> list[str]:
    """The unmerged adapters that can fold, in fold order. An output adapter after a non-mergeable one on
    its site stays (it acts on that adapter's output); input adapters stay while an unmerged output adapter
    still reads their output (``reads_input``)."""
    recs, order = pm.peft_info.adapters, []
    for seq in _fold_sequences(pm):
        outs = [n for n in seq if pm.get_submodule(n).position != "input"]
        blocked = False
        for name in outs:
            blocked = not _take(pm, name, blocked, order)
        blocked = any(not recs[n].merged and n not in order and getattr(pm.get_submodule(n), "reads_input", True)
                      for n in outs)
        for name in seq[len(outs):]:
            blocked = not _take(pm, name, blocked, order)
    return order


def _take(pm, name: str, blocked: bool, order: list[str]) -> bool:
    """Append ``name`` to ``order`` if it can fold now; False if it stays in the graph."""
    rec, module = pm.peft_info.adapters[name], pm.get_submodule(name)
    if rec.merged:
        return True
    if blocked or not getattr(module, "mergeable", False):
        why = "is not mergeable" if not getattr(module, "mergeable", False) else \
            "acts next to an adapter on the same site that stays in the graph"
        log.info("adapter %s (%s) %s; it stays in the graph", name, rec.method, why)
        return False
    order.append(name)
    return True


def _finite(t: torch.Tensor | None) -> bool:
    return t is None or t.device.type == "meta" or not t.is_floating_point() or bool(torch.isfinite(t).all())


def _refuse(rec, weight: str) -> PassError:
    return fail("merge", f"merging adapter {rec.name} ({rec.method}) into site {rec.site['key']} (weight {weight}) "
                         "would write NaN or infinite values; nothing was merged and the model is unchanged. The "
                         "adapter's parameters are probably non-finite (training diverged) or overflow the weight's "
                         "dtype: check them, or merge with safe=False to write them anyway.")


def _dry_run(gm, order: list[str]) -> None:
    """Merge every adapter of ``order`` into scratch copies of its site's weights (one site at a time), and
    refuse before any real weight changes if a result is not finite. Module state a merge records
    (DoRA's norm) is restored afterwards."""
    recs, scratch, site = gm.peft_info.adapters, {}, None
    for name in order:
        rec, module = recs[name], gm.get_submodule(name)
        if rec.node != site:
            scratch, site = {}, rec.node
        targets = [rec.site["weight"]] + ([rec.site["bias"]] if rec.site.get("bias") else [])
        for t in targets:
            if t not in scratch:
                scratch[t] = gm.get_parameter(t).detach().clone()
        w, b = scratch[targets[0]], (scratch[targets[1]] if len(targets) > 1 else None)
        state = dict(module.__dict__)
        try:
            with torch.no_grad():
                module.merge(canonical_weight(w, rec.site["kind"]), b)
        finally:
            module.__dict__.clear()
            module.__dict__.update(state)
        if not (_finite(w) and _finite(b)):
            raise _refuse(rec, targets[0])


@graph_pass("merge", functional=True, ensures=[merged_adapters_have_no_node])
def merge_pass(gm, inplace: bool = False, safe: bool = True) -> PassResult:
    out = gm if inplace else gm.fork()
    by_name = {n.name: n for n in out.graph.nodes}
    owned: set[str] = set()
    order = _merge_order(out)
    if safe and inplace:
        _dry_run(out, order)
    for name in order:
        rec, module = out.peft_info.adapters[name], out.get_submodule(name)
        calls = adapter_calls(out.graph, name)
        if not calls:
            raise fail("merge", f"adapter {name} has no node in the graph")
        _untie_if_shared(out, rec, by_name[rec.node])
        w = _own_weight(out, rec.site["weight"], inplace, owned)
        b = _own_weight(out, rec.site["bias"], inplace, owned) if rec.site.get("bias") else None
        with torch.no_grad():
            module.merge(canonical_weight(w.data, rec.site["kind"]), None if b is None else b.data)
        if safe and not inplace and not (_finite(w) and _finite(b)):
            raise _refuse(rec, rec.site["weight"])      # the fork (and its private weights) is dropped
        # input adapter: the site (and adapters that ignore x) read the raw input; output: the site's output
        for node in calls:      # one node per call of the site; the weight is merged once
            node.replace_all_uses_with(node.args[0] if module.position == "input" else node.args[1])
            out.graph.erase_node(node)
        rec.merged = True
    return PassResult(out, bool(order))


@graph_pass("unmerge", functional=True, ensures=[merged_adapters_have_no_node, adapters_called_once])
def unmerge_pass(gm, inplace: bool = False) -> PassResult:
    out = gm if inplace else gm.fork()
    owned: set[str] = set()
    by_name = {n.name: n for n in out.graph.nodes}
    recs = out.peft_info.adapters
    todo = [n for seq in _fold_sequences(out) for n in seq if recs[n].merged]
    for name in todo:
        if recs[name].node not in by_name:
            raise fail("unmerge", f"site node {recs[name].node!r} of adapter {name} is not in the graph")
    for name in reversed(todo):          # undo the folds last-in first-out
        rec, module = recs[name], out.get_submodule(name)
        w = _own_weight(out, rec.site["weight"], inplace, owned)
        b = _own_weight(out, rec.site["bias"], inplace, owned) if rec.site.get("bias") else None
        with torch.no_grad():
            module.unmerge(canonical_weight(w.data, rec.site["kind"]), None if b is None else b.data)
    undone = set(todo)
    for name in [n for n in recs if n in undone]:   # re-splice in rule order: chains come back as built
        rec = recs[name]
        splice_one(out, by_name[rec.node], rec.site["op"], name, out.get_submodule(name))
        rec.merged = False
    return PassResult(out, bool(todo))
