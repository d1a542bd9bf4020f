"""One graph per (mode, call signature): the model a user gets back behaves like the module it came from.

A traced graph has one calling convention and one mode: ``torch.export`` records the inputs it was given and every
``if self.training:`` branch, BatchNorm's batch statistics and stochastic depth as they were while tracing. So a
model returned by :func:`peftfx.apply` keeps a registry of graphs keyed by :func:`peftfx.model.call_key` (mode,
and per input present: tensor rank/dtype/size-1 dims, or a constant's value). Its own graph is the one traced at
``apply`` time (train mode, the example inputs); a call in eval mode, or with inputs the example did not have
(``attention_mask``, ``labels``, ``token_type_ids``, ``return_dict=False`` …), runs a *variant*: the original
module traced again in that mode with those inputs, then the same passes the model went through, replayed:

  trace (``training=mode``) → rebind the base tensors to the model's → plan the model's rules on the new graph
  and check that the adapter names it yields (deterministic from site keys) are exactly the model's → splice the
  model's own adapter modules there (``splice_pass``) → graph-level edits with the model's modules
  (``rewrite_pass``); merged adapters are not spliced (their weights, which the variant shares, hold them).

Guarantees: every variant shares every parameter, buffer and adapter module with the model (one set for
optimizers, ``state_dict``, checkpoints; BatchNorm running statistics are the original module's tensors, updated
only by train-mode calls); building one does not consume the global RNG (the same seed draws the same dropout
masks whatever was traced before); a signature seen before is not traced again (``Variants.traces`` counts
traces); a pass that changes the model's graph (a new adapter, merge/fold in place) makes every variant stale and
it is rebuilt on its next use. Models whose state cannot be replayed on a fresh trace (a quantized base, folded
adapters) run their own graph only: a mode change switches dropout as before, another signature is an error.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ._errors import PeftfxError
from ._stepgraph import run_step, session_key
from .model import PeftModel, adapter_name, call_key
from .passes.base import PassManager
from .passes.cleanup import simplify_pass
from .passes.rewrite import rewrite_pass
from .passes.splice import splice_pass
from .plan import plan
from .trace import hf_extra_inputs, trace, widen_unit_sequence

__all__ = ["Variants", "disable_adapter", "enable_variants", "variant_for"]

log = logging.getLogger(__name__)


def enable_variants(pm: PeftModel) -> PeftModel:
    """Give a traced model (``peftfx.trace`` output, adapters applied or not) its registry of graphs."""
    origin = pm.__dict__.get("_peftfx_origin")
    if origin is None:
        return pm
    source, key, dynamic = origin
    pm.__dict__["_peftfx_variants"] = Variants(source, key, dynamic)
    sig = inspect.signature(source.forward)
    this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    # without **kwargs: Trainer then passes no num_items_in_batch (torch.export cannot take a forward's **kwargs
    # tensors here); return_dict and the like are still accepted by Variants.bind
    named = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
    pm.__dict__["_peftfx_signature"] = sig.replace(parameters=[this, *named])
    type(pm).forward.__signature__ = pm.__dict__["_peftfx_signature"]
    return pm


def variant_for(pm: PeftModel, kwargs: dict[str, Any], training: bool) -> PeftModel:
    """The graph ``pm`` runs for keyword inputs ``kwargs`` in mode ``training``: ``pm`` itself or a variant (a
    single-graph PeftModel sharing ``pm``'s tensors and adapters; passes such as merge and export act on it)."""
    variants = pm.peft_variants
    if variants is None:
        return pm
    kwargs = variants.bind((), kwargs)
    return variants.graph_for(pm, call_key(kwargs, training, variants.dynamic), kwargs)


def disable_adapter(pm: PeftModel):
    """``with peftfx.disable_adapter(peft): ref = peft(**batch)`` — the base model's outputs for every method
    (site adapters, virtual tokens, prefixes), in train and eval mode; the adapters are back on exit. Also
    ``peft.disable_adapter()``."""
    return pm.disable_adapter()


class Variants:
    """The graphs of one model by call key. Not an ``nn.Module``: nothing here is registered twice."""

    def __init__(self, source: nn.Module, home_key: tuple, dynamic: bool):
        self.source, self.home_key, self.dynamic = source, home_key, dynamic
        self.graphs: dict[tuple, PeftModel] = {}
        self.traces = 0
        sig = inspect.signature(source.forward)
        params = sig.parameters
        self._positional = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self._order = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        self._var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
        self._strict = hasattr(source, "config")  # HF forwards swallow unknown names in **kwargs: refuse them
        self._extra = hf_extra_inputs() if self._strict else set()
        self._no_cache = "use_cache" in params and hasattr(source, "config")
        self._warned = False
        self.disabled = 0          # > 0 inside disable_adapter(): calls run the base model's graphs

    @contextlib.contextmanager
    def disable(self, home: PeftModel) -> Iterator[PeftModel]:
        """Calls inside run the base model (the original module traced without adapters, in the call's mode and
        signature; cached like every graph); on exit the adapters are back, untouched."""
        why = not_replayable(home)
        merged = [n for n, r in home.peft_info.adapters.items() if r.merged]
        if why or merged:
            raise PeftfxError(f"disable_adapter() needs the base weights as they were: "
                              f"{why or f'adapters are merged into the weights ({merged[0]} …)'}; "
                              "use the unmerged model (peftfx.merge returns a copy).")
        self.disabled += 1
        try:
            yield home
        finally:
            self.disabled -= 1

    def fresh(self, source: nn.Module | None = None) -> Variants:
        """An empty registry for a copy of the model (a fork or deepcopy)."""
        return Variants(self.source if source is None else source, self.home_key, self.dynamic)

    def __deepcopy__(self, memo: dict) -> Variants:
        return self.fresh(copy.deepcopy(self.source, memo))

    # ------------------------------------------------------------------------------------------ calls
    def bind(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Positional and keyword inputs → keywords in signature order, ``None`` dropped, ``use_cache=False`` for
        Hugging Face models unless given."""
        if len(args) > len(self._positional):
            raise TypeError(f"{type(self.source).__name__}.forward takes {len(self._positional)} positional "
                            f"inputs, got {len(args)}")
        given = dict(kwargs)
        for name, value in zip(self._positional, args):
            if name in given:
                raise TypeError(f"got multiple values for argument '{name}'")
            given[name] = value
        unknown = [k for k in given if k not in self._order and not (self._strict and k in self._extra)]
        if unknown and (self._strict or not self._var_kw):
            raise TypeError(f"{type(self.source).__name__}.forward got unexpected input(s) {unknown}; its inputs "
                            f"are {self._order}")
        if self._no_cache and given.get("use_cache") is None:
            given["use_cache"] = False
        out = {n: given[n] for n in self._order if given.get(n) is not None}
        out.update((k, v) for k, v in given.items() if k not in out and v is not None and k not in self._order)
        return out

    def call(self, home: PeftModel, args: tuple, kwargs: dict[str, Any], *, cached: bool = False,
             session: dict | None = None) -> Any:
        """Run the graph for this call. ``cached``: a generation step whose KV cache already holds the virtual
        tokens of prompt tuning / p-tuning (they are not put before the sequence again; :mod:`peftfx.dropin`).
        ``session``: a dict kept for one ``generate()`` call; variant graphs then run as
        :class:`peftfx._stepgraph.StepGraph`\\ s (weights resolved once per session, the cache updated in place)."""
        kwargs = self.bind(args, kwargs)
        # Hugging Face's return_dict only shapes the output (ModelOutput or its to_tuple()): done here, so it needs
        # no graph of its own (torch.export also rejects a bool among a forward's **kwargs).
        return_dict = kwargs.pop("return_dict", None) if self._strict else None
        key = session_key(session, kwargs, home.training, self.dynamic)
        if self.disabled:
            key += ("base",)
        elif cached:
            key += ("cached",)
        gm = self.graph_for(home, key, kwargs)
        if gm is not home:                       # flags traced into the graph from the config (_config_flags)
            kwargs = {k: v for k, v in kwargs.items() if not (self._strict and k in _CONFIG_FLAGS)}
        if gm is home:
            out = home._graph_forward(**kwargs)
        elif session is not None:
            out = run_step(gm, kwargs, session)
        else:
            out = gm(**kwargs)
        if return_dict is False and hasattr(out, "to_tuple"):
            out = out.to_tuple()
        return out

    def graph_for(self, home: PeftModel, key: tuple, kwargs: dict[str, Any]) -> PeftModel:
        if key == self.home_key:
            return home
        gm = self.graphs.get(key)
        if gm is not None and gm.__dict__.get("_peftfx_stamp") == home.__dict__.get("_peftfx_version"):
            return gm
        why = not_replayable(home)
        if why:
            if key[1] == self.home_key[1]:     # same inputs, other mode: this graph with dropout switched
                if not self._warned:
                    log.warning("%s; %s mode runs the train-mode graph with dropout switched (BatchNorm, stochastic "
                                "depth and other mode-dependent code keep their traced side)", why,
                                "train" if key[0] else "eval")
                    self._warned = True
                return home
            raise PeftfxError(f"{why}, so it runs only the inputs it was traced with "
                              f"({[p[0] for p in self.home_key[1]]}); got {[p[0] for p in key[1]]}. Call it with "
                              "those inputs, or apply the rules to the original model with example inputs like these.")
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            raise PeftfxError(f"no graph for inputs {[p[0] for p in key[1]]} in {'train' if key[0] else 'eval'} mode "
                              "yet, and one cannot be traced while torch is tracing this model; call the model once "
                              "eagerly with such inputs first.")
        gm = self._build(home, kwargs, key[0], base="base" in key[2:], cached="cached" in key[2:])
        gm.__dict__["_peftfx_stamp"] = home.__dict__.get("_peftfx_version")
        self.graphs[key] = gm
        return gm

    # ------------------------------------------------------------------------------------------ build
    def _build(self, home: PeftModel, kwargs: dict[str, Any], training: bool, base: bool = False,
               cached: bool = False) -> PeftModel:
        """Trace the original module in mode ``training`` with ``kwargs`` and replay ``home``'s adapters on it
        (``base``: none; the base model's graph; ``cached``: without the virtual tokens of prompt tuning and
        p-tuning, which a generation step finds in its KV cache)."""
        from torch.utils import _pytree as pytree

        def own(v):            # inference tensors cannot be traced; a cache object is traced on a copy
            if isinstance(v, torch.Tensor):
                return v.clone() if v.is_inference() else v
            if type(v) in pytree.SUPPORTED_NODES and type(v) not in (list, tuple, dict):
                return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, v)
            return v

        with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
            example = widen_unit_sequence({k: own(v) for k, v in kwargs.items()})
            flags = {k: example.pop(k) for k in _CONFIG_FLAGS if self._strict and k in example}
            patched = self.source.__dict__.pop("forward", None)     # generate() routes forward here; trace the model's
            try:
                with _prefill_check(self.source, example), _config_flags(self.source, flags):
                    pm = trace(self.source, example, dynamic=self.dynamic, training=training)
            finally:
                if patched is not None:
                    self.source.__dict__["forward"] = patched
            self.traces += 1
            _rebind(pm, home, self.source)
            if not base:
                _replay(pm, home, [k for k in kwargs], training, cached)
            if any(callable(getattr(v, "get_seq_length", None)) for v in kwargs.values()):
                simplify_pass(pm)          # a generation step: run once per token, so drop its no-op work
        pm.train(training)
        log.info("traced a %s-mode graph for inputs %s", "train" if training else "eval", list(kwargs))
        return pm

    def follow(self, home: PeftModel) -> None:
        """After ``home.to(...)``: buffers are new tensors; point the original module at them (so a new trace
        reads the moved buffers) and drop every variant (rebuilt on next use)."""
        names = dict(home.named_buffers(remove_duplicate=False))
        for name, buf in list(self.source.named_buffers(remove_duplicate=False)):
            new = names.get(name)
            if new is not None and new is not buf:
                owner, _, leaf = name.rpartition(".")
                self.source.get_submodule(owner)._buffers[leaf] = new
        self.graphs.clear()


def not_replayable(home: PeftModel) -> str | None:
    """Why ``home``'s adapters cannot be replayed on a fresh trace, or None."""
    origin = home.__dict__.get("_peftfx_origin")
    known = set() if origin is None else (
        {n for n, _ in origin[0].named_parameters(remove_duplicate=False)})
    adapters = tuple(a + "." for a in home.peft_info.adapters)
    for n in home.graph.nodes:
        meta = n.meta.get("peftfx", {})
        if "dequant_of" in meta:
            return "this model has a quantized base (peftfx.quantize)"
        if "folded_from" in meta:
            return "this model has folded adapters (peftfx.fold)"
        if (n.op == "get_attr" and origin is not None and n.target not in known
                and not str(n.target).startswith(adapters)
                and isinstance(_tensor(home, str(n.target)), nn.Parameter)):
            return f"this model reads weight {n.target}, which the original module does not have (a merge untied it)"
    return None


def _tensor(root: nn.Module, name: str) -> torch.Tensor | None:
    owner, _, leaf = name.rpartition(".")
    try:
        mod = root.get_submodule(owner) if owner else root
    except AttributeError:
        return None
    t = mod._parameters.get(leaf, mod._buffers.get(leaf, mod.__dict__.get(leaf)))
    return t if isinstance(t, torch.Tensor) else None


def _rebind(pm: PeftModel, home: PeftModel, source: nn.Module) -> None:
    """The variant's copies of the base tensors (by name) become ``home``'s: after a fork's private merged weights
    or a device move they differ from the original module's."""
    names = [n for n, _ in source.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in source.named_buffers(remove_duplicate=False)]
    for name in names:
        mine, theirs = _tensor(pm, name), _tensor(home, name)
        if mine is None or theirs is None or mine is theirs:
            continue
        owner, _, leaf = name.rpartition(".")
        mod = pm.get_submodule(owner) if owner else pm
        if leaf in mod._parameters:
            mod._parameters[leaf] = theirs
        elif leaf in mod._buffers:
            mod._buffers[leaf] = theirs
        else:
            setattr(mod, leaf, theirs)


def _replay(pm: PeftModel, home: PeftModel, inputs: list[str], training: bool, cached: bool = False) -> None:
    """Splice ``home``'s adapter modules into the fresh graph ``pm`` at the sites its rules select there
    (``cached``: virtual-token rules that put tokens before the sequence are left out; their tokens are in the
    KV cache the graph reads)."""
    info = home.peft_info
    where = f"the {'train' if training else 'eval'}-mode graph for inputs {inputs}"
    rules = [_InCache(r) if cached and in_cache(r) else r for r in info.rules]
    try:
        p = plan(pm, rules, allow_empty=True)
    except PeftfxError as e:
        raise PeftfxError(f"the model's rules do not plan on {where}: {e}") from e
    live = {r.rule_index for r in info.adapters.values()}       # a rule whose adapter was deleted takes no sites
    sites = {adapter_name(pm, m.site.key, m.rule.name): m.site for m in p.matches if m.rule_index in live}
    for name, spec in info.multi.get("adapters", {}).items():   # named adapters added later (peftfx.multi)
        if name != "default":
            sites.update((adapter_name(pm, m.site.key, m.rule.name), m.site)
                         for m in plan(pm, spec["rules"], allow_empty=True).matches)
    recorded = {n for n, r in info.adapters.items() if r.site.get("kind") != "virtual"}
    # a weight this graph never reads (an encoder's, in a decoder step given encoder_outputs) needs no adapter here
    read = {n.target for n in pm.graph.nodes if n.op == "get_attr" and n.users}
    unread = {n for n in recorded - set(sites) if info.adapters[n].site.get("weight") not in read}
    recorded -= unread
    if set(sites) != recorded:
        raise PeftfxError(f"{where} has other adapter sites than the model: missing there "
                          f"{sorted(recorded - set(sites))[:5]}, new there {sorted(set(sites) - recorded)[:5]}. The "
                          "model's code takes another path for these inputs or this mode; apply the rules with "
                          "example inputs like these.")
    adapters = {}
    items = []
    for name, rec in info.adapters.items():
        if name in unread:
            continue
        rec = copy.copy(rec)
        adapters[name] = rec
        if name in sites:
            rec.node = sites[name].node.name
            if not rec.merged:
                items.append((sites[name].node, sites[name].op, name, home.get_submodule(name)))
    edits = []
    for i, edit in p.graph_edits.items():
        rule = p.rules[i]
        if isinstance(rule, _InCache):
            continue
        with torch.random.fork_rng(devices=[]):
            names = list(rule.build_graph(pm, edit))      # the names; the freshly built modules are dropped
        mine = [n for n, r in info.adapters.items() if r.rule_index == i and r.site.get("kind") == "virtual"]
        if sorted(names) != sorted(mine):
            raise PeftfxError(f"rule {i} ({rule.name}) yields modules {names} on {where}, the model has {mine}.")
        edits.append((rule, edit, {n: home.get_submodule(n) for n in names}))
    pm.peft_info.adapters = adapters
    pm.peft_info.rules = list(info.rules)
    pm.peft_info.multi = info.multi
    pm.peft_info.base_node_count = len(pm.graph.nodes)
    PassManager([splice_pass.bind(items), rewrite_pass.bind(edits)])(pm)


def in_cache(rule: Any) -> bool:
    """Whether ``rule`` puts virtual tokens before the sequence (prompt tuning, p-tuning): in generation they enter
    the KV cache at the prefill step and later steps find them there."""
    from .methods._virtual import EmbeddingTokensMethod

    return isinstance(rule, EmbeddingTokensMethod)


class _InCache:
    """Stands in for a virtual-token rule in a decode-step plan: graph-level, takes nothing, edits nothing."""

    graph_level = True
    virtual_tokens = False

    def __init__(self, rule: Any):
        self.rule, self.name = rule, rule.name

    def prepare(self, pm: PeftModel, plan: Any, index: int) -> None:
        return None


#: Hugging Face output switches that torch.export cannot take as inputs (bools among a forward's ``**kwargs``): a
#: call with one traces a graph of its own with the switch set on the model's config instead, which transformers
#: reads when the keyword is absent; the call then runs that graph without the keyword.
_CONFIG_FLAGS = ("output_hidden_states", "output_attentions")


@contextlib.contextmanager
def _config_flags(source: nn.Module, flags: dict[str, Any]) -> Iterator[None]:
    config = getattr(source, "config", None)
    if not flags:
        yield
        return
    if config is None:
        raise PeftfxError(f"{sorted(flags)}: {type(source).__name__} has no config to carry these switches into "
                          "a trace; call the model without them.")
    old = {k: getattr(config, k, None) for k in flags}
    try:
        for k, v in flags.items():
            try:
                setattr(config, k, bool(v))
            except ValueError as e:      # e.g. output_attentions with SDPA attention
                raise PeftfxError(f"{k}={v!r}: {type(source).__name__} cannot return this ({e}). Load the model "
                                  "with attn_implementation='eager' for attention weights, or call without "
                                  f"{k}.") from None
        yield
    finally:
        for k, v in old.items():
            setattr(config, k, v)


@contextlib.contextmanager
def _prefill_check(source: nn.Module, kwargs: dict[str, Any]) -> Iterator[None]:
    """While tracing a prefill call (a KV cache holding nothing), tell torch.export that the 2-D attention mask is
    as long as the token ids (it covers past + new tokens, and there is no past). Without it the mask gets a size
    symbol of its own, and prompt tuning could not find it to widen it with the virtual tokens."""
    cache = next((v for v in kwargs.values() if callable(getattr(v, "get_seq_length", None))), None)
    ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
    if cache is None or cache.get_seq_length() != 0 or not isinstance(ids, torch.Tensor) \
            or not isinstance(mask, torch.Tensor) or ids.dim() != 2 or mask.dim() != 2:
        yield
        return

    def check(module, args, kw):
        i, m = kw.get("input_ids"), kw.get("attention_mask")
        if isinstance(i, torch.Tensor) and isinstance(m, torch.Tensor):
            torch._check(m.shape[1] == i.shape[1])

    handle = source.register_forward_pre_hook(check, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
