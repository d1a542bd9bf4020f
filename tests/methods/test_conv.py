"""LoRA and IA3 on convolutions (``nn.Conv1d/2d/3d``, site kind ``conv``): Hugging Face PEFT parity (outputs,
trainable counts, merged weights), HF folders both ways, exact merge/unmerge on every conv shape, the whitelist that
keeps DoRA/VeRA/Houlsby off convolutions, and rules that name a module peftfx cannot adapt."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import peftfx
from peftfx import IA3, LoRA, select

TOL = 1e-5        # float32: the same maths in another order
TOL_W = 1e-6      # merged / unmerged weights


class CNN(nn.Module):
    """Conv2d 3×3 → BatchNorm → Conv2d 1×1 → Conv1d (stride 2) → Linear."""

    def __init__(self, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.point = nn.Conv2d(8, 8, 3 if groups > 1 else 1, padding=1 if groups > 1 else 0, groups=groups)
        self.conv1d = nn.Conv1d(8, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = self.point(self.bn(self.conv(x)).relu()).relu().mean(-1)
        return self.fc(self.conv1d(h).relu().mean(-1))


def _cnn(groups: int = 1, seed: int = 0) -> CNN:
    torch.manual_seed(seed)
    m = CNN(groups)
    with torch.no_grad():                      # a BatchNorm that does something in eval mode
        m.bn.running_mean.uniform_(-0.2, 0.2)
        m.bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
TARGETS = ["conv", "point", "conv1d", "fc"]


def _run(model, x=X):
    with torch.no_grad():
        return model(x)


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _hf(model, config):
    from peft import get_peft_model

    return get_peft_model(model, config).eval()


def _copy_lora_from_hf(hf, ours) -> int:
    """Random B for every HF LoRA layer (A is random already), copied with A into ours by module path."""
    g, n = torch.Generator().manual_seed(7), 0
    with torch.no_grad():
        for name, mod in hf.named_modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                b = mod.lora_B["default"].weight
                b.copy_(torch.randn(b.shape, generator=g) * 0.2)
                ad = ours.get_submodule(name.replace("base_model.model.", "", 1) + ".lora")
                ad.lora_A.copy_(mod.lora_A["default"].weight)
                ad.lora_B.copy_(b)
                n += 1
    return n


# ------------------------------------------------------------------------------------------------ sites
def test_convolutions_are_sites_of_their_own_kind():
    sites = {s.key: s for s in peftfx.inspect(_cnn(), None, X).plan.sites}
    assert sorted(sites) == sorted(TARGETS)                                # BatchNorm is no site
    conv, c1 = sites["conv"], sites["conv1d"]
    assert (conv.kind, conv.op, conv.weight_shape, conv.in_features, conv.out_features) == \
        ("conv", "conv2d", (8, 3, 3, 3), 3, 8)
    assert (conv.conv.dims, conv.conv.stride, conv.conv.padding, conv.conv.dilation, conv.conv.groups) == \
        (2, (1, 1), (1, 1), (1, 1), 1)
    assert (c1.op, c1.conv.dims, c1.conv.stride) == ("conv1d", 1, (2,))
    assert not any(r.startswith("mlp.") for s in sites.values() for r in s.roles)   # a CNN block is no MLP
    assert sites["conv"].describe()["conv"]["padding"] == [1, 1]


# ------------------------------------------------------------------------------------------------- LoRA
def test_lora_on_conv2d_and_conv1d_matches_hf_peft_and_merges_exactly():
    from peft import LoraConfig

    base = _cnn()
    ours = peftfx.apply(copy.deepcopy(base), LoRA(rank=4, alpha=8, targets=select.name(*TARGETS)), X)
    hf = _hf(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    assert _copy_lora_from_hf(hf, ours) == 4
    assert peftfx.trainable_parameters(ours)[0] == _trainable(hf) == 364
    assert ours.get_submodule("conv.lora").lora_A.shape == (4, 3, 3, 3)          # HF's lora_A.weight
    assert ours.get_submodule("conv.lora").lora_B.shape == (8, 4, 1, 1)          # HF's 1×1 lora_B.weight
    ref, out = _run(hf), _run(ours)
    assert (ref - out).abs().max().item() < TOL
    assert (ref - _run(base)).abs().max().item() > 1e-2                          # the adapters act
    merged = peftfx.merge(ours)
    assert not [n for n in merged.graph.nodes if n.op == "call_module" and n.target.endswith(".lora")]
    assert (_run(merged) - out).abs().max().item() < TOL
    hf_merged = hf.merge_and_unload()
    for name in ("conv", "point", "conv1d"):                                     # HF's B ⊛ A fold, weight for weight
        w = merged.get_parameter(f"{name}.weight")
        assert (w - hf_merged.get_submodule(name).weight).abs().max().item() < TOL_W
    back = peftfx.unmerge(merged)
    assert (back.get_parameter("conv.weight") - base.conv.weight).abs().max().item() < TOL_W
    assert (_run(back) - out).abs().max().item() < TOL
    assert torch.equal(ours.get_parameter("conv.weight"), base.conv.weight)      # merge made private copies


def test_lora_conv_trains_only_the_adapter():
    ours = peftfx.apply(_cnn(), LoRA(rank=2, targets=select.type("Conv2d")), X).train()
    ours(X).square().sum().backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert sorted(grads) == ["conv.lora.lora_A", "conv.lora.lora_B", "point.lora.lora_A", "point.lora.lora_B"]


@pytest.mark.parametrize("make,x", [
    (lambda: nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1)), torch.randn(2, 2, 3, 5, 5)),
    (lambda: nn.Conv2d(3, 5, 3, stride=2, dilation=2, padding=2), torch.randn(2, 3, 9, 9)),
    (lambda: nn.Conv2d(3, 5, 3, padding="same"), torch.randn(2, 3, 6, 6)),
    (lambda: nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"), torch.randn(2, 3, 6, 6)),
    (lambda: nn.Conv1d(3, 5, 4, padding="valid", bias=False), torch.randn(2, 3, 9)),
])
def test_lora_conv_shapes_equal_a_conv_with_the_merged_weight(make, x):
    """y = W₀ ⊛ x + b + s·B ⊛ A ⊛ x equals one convolution with W₀ + ΔW (dilation kept, unlike HF PEFT)."""
    torch.manual_seed(3)
    conv = make()
    model = nn.Sequential(conv)
    ours = peftfx.apply(copy.deepcopy(model), LoRA(rank=3, alpha=6, targets=select.name("0")), x)
    ad = ours.get_submodule("0.lora")
    with torch.no_grad():
        ad.lora_B.normal_(0, 0.3)
        want = copy.deepcopy(conv)
        want.weight += ad.delta()
        ref = want(x)
    assert (_run(ours, x) - ref).abs().max().item() < TOL
    merged = peftfx.merge(ours)
    assert (_run(merged, x) - ref).abs().max().item() < TOL
    assert (peftfx.unmerge(merged).get_parameter("0.weight") - conv.weight).abs().max().item() < TOL_W


def test_grouped_conv_lora_matches_hf_and_stays_unmerged():
    from peft import LoraConfig

    base = _cnn(groups=2)
    ours = peftfx.apply(copy.deepcopy(base), LoRA(rank=4, alpha=8, targets=select.name("point")), X)
    hf = _hf(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["point"]))
    assert _copy_lora_from_hf(hf, ours) == 1
    assert ours.get_submodule("point.lora").lora_B.shape == (8, 2, 1, 1)        # B grouped as the weight
    assert peftfx.trainable_parameters(ours)[0] == _trainable(hf)
    assert (_run(hf) - _run(ours)).abs().max().item() < TOL
    merged = peftfx.merge(ours)                      # B ⊛ A is dense across groups: it stays in the graph
    assert [n.target for n in merged.graph.nodes if n.op == "call_module"] == ["point.lora"]
    assert (_run(merged) - _run(ours)).abs().max().item() < TOL
    with pytest.raises(peftfx.RuleError, match=r"'point' \(Conv2d\).*multiple of its groups.*rank is 3"):
        peftfx.apply(copy.deepcopy(base), LoRA(rank=3, targets=select.name("point")), X)


# -------------------------------------------------------------------------------------------------- IA3
def _copy_ia3_from_hf(hf, ours) -> int:
    g, n = torch.Generator().manual_seed(5), 0
    with torch.no_grad():
        for name, mod in hf.named_modules():
            if hasattr(mod, "ia3_l") and "default" in getattr(mod, "ia3_l", {}):
                p = mod.ia3_l["default"]
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
                ours.get_submodule(name.replace("base_model.model.", "", 1) + ".ia3").ia3_l.copy_(p.flatten())
                n += 1
    return n


@pytest.mark.parametrize("groups", [1, 2])
def test_ia3_on_conv2d_matches_hf_peft_and_merges_exactly(groups):
    """Output channels scaled on ``conv``, input channels on the feed-forward ``point`` (grouped when groups=2).
    HF PEFT's IA3 takes Conv2d and Conv3d (not Conv1d), so the comparison covers those."""
    from peft import IA3Config

    base = _cnn(groups=groups)
    rule = IA3(targets=select.name("conv", "point", "fc"), feedforward=select.name("point"))
    ours = peftfx.apply(copy.deepcopy(base), rule, X)
    hf = _hf(copy.deepcopy(base), IA3Config(target_modules=["conv", "point", "fc"], feedforward_modules=["point"]))
    assert _copy_ia3_from_hf(hf, ours) == 3
    assert peftfx.trainable_parameters(ours)[0] == _trainable(hf) == 8 + 8 + 4
    ref, out = _run(hf), _run(ours)
    assert (ref - out).abs().max().item() < TOL and (ref - _run(base)).abs().max().item() > 1e-2
    merged = peftfx.merge(ours)
    assert (_run(merged) - out).abs().max().item() < TOL
    hf_merged = hf.merge_and_unload()
    for name in ("conv", "point"):
        assert (merged.get_parameter(f"{name}.weight") - hf_merged.get_submodule(name).weight).abs().max() < TOL_W
    assert (merged.get_parameter("conv.bias") - hf_merged.conv.bias).abs().max().item() < TOL_W
    back = peftfx.unmerge(merged)
    assert (back.get_parameter("point.weight") - base.point.weight).abs().max().item() < TOL_W
    assert (back.get_parameter("conv.bias") - base.conv.bias).abs().max().item() < TOL_W


def test_ia3_on_conv1d_and_conv3d_scales_channels():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv1d(3, 5, 3), nn.ReLU(), nn.Conv1d(5, 4, 1))
    x = torch.randn(2, 3, 7)
    ours = peftfx.apply(copy.deepcopy(model), IA3(targets=select.type("Conv1d"), feedforward=select.name("2")), x)
    l0, l2 = ours.get_submodule("0.ia3").ia3_l, ours.get_submodule("2.ia3").ia3_l
    with torch.no_grad():
        l0.uniform_(0.5, 1.5)
        l2.uniform_(0.5, 1.5)
        h = model[1](model[0](x) * l0[:, None])
        ref = model[2](h * l2[:, None])
    assert (_run(ours, x) - ref).abs().max().item() < TOL
    assert (_run(peftfx.merge(ours), x) - ref).abs().max().item() < TOL


# ------------------------------------------------------------------------------------------ HF folders
def _perturbed_hf_folder(base, config, path):
    hf = _hf(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in hf.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    hf.save_pretrained(str(path))
    return hf


def _from_pretrained(base, path):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_hf_conv_folders_both_ways(kind, tmp_path):
    from peft import IA3Config, LoraConfig

    base = _cnn()
    config = (LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS) if kind == "lora" else
              IA3Config(target_modules=["conv", "point", "fc"], feedforward_modules=["point"]))
    hf = _perturbed_hf_folder(base, config, tmp_path / "hf")
    ref = _run(hf.base_model.model)
    ours = peftfx.load_adapter(copy.deepcopy(base), tmp_path / "hf", X).eval()
    assert (_run(ours) - ref).abs().max().item() < TOL
    peftfx.save_adapter(ours, tmp_path / "back", format="hf")
    again = _from_pretrained(base, tmp_path / "back")
    assert (_run(again.base_model.model) - ref).abs().max().item() < TOL


def test_hf_save_refuses_ia3_on_conv1d(tmp_path):
    ours = peftfx.apply(_cnn(), IA3(targets=select.name("conv1d")), X)
    with pytest.raises(peftfx.CheckpointError, match="'Conv1d' module; Hugging Face PEFT's IA3 adapts"):
        peftfx.save_adapter(ours, tmp_path / "hf", format="hf")


# ----------------------------------------------------------------- whitelists and unadaptable modules
@pytest.mark.parametrize("method", [peftfx.DoRA(rank=2, targets=select.name("conv", "fc")),
                                    peftfx.VeRA(rank=2, targets=select.name("conv", "fc")),
                                    peftfx.Houlsby(bottleneck=2, targets=select.name("conv", "fc"))])
def test_methods_without_conv_in_their_whitelist_refuse_a_named_conv(method):
    model = _cnn()
    with pytest.raises(peftfx.RuleError, match=r"names a module it cannot adapt \(it matched 1 other site\(s\); "
                                               r"nothing was applied\):\n  'conv' \(Conv2d\): \w+ adapts linear "
                                               r"weights only; this site is a convolution"):
        peftfx.apply(model, method, X)
    assert all(p.requires_grad for p in model.parameters())                  # nothing changed
    broad = dataclasses.replace(method, targets=select.regex(".*"))
    report = peftfx.inspect(model, broad, X).to_dict()["rules"][0]            # a broad selector just declines
    assert [s["key"] for s in report["sites"]] == ["fc"]
    assert sorted(d["site"] for d in report["declined"]) == ["conv", "conv1d", "point"]


@pytest.mark.parametrize("selector,error,where", [
    (select.name("bn"), peftfx.NoMatchError, "'bn' (BatchNorm2d): a normalisation layer"),
    (select.name("conv", "bn"), peftfx.RuleError, "'bn' (BatchNorm2d): a normalisation layer"),
    (select.type("Conv2d", "BatchNorm2d"), peftfx.RuleError, "'bn' (BatchNorm2d)"),
])
def test_rule_naming_a_module_without_a_site_is_an_error(selector, error, where):
    model = _cnn()
    with pytest.raises(error) as e:
        peftfx.apply(model, LoRA(rank=2, targets=selector), X)
    assert where in str(e.value) and "~select.name('bn')" in str(e.value)
    assert all(p.requires_grad for p in model.parameters())
    # inspect explains it without raising; globs and negations that happen to cover a norm are no error
    report = peftfx.inspect(model, LoRA(rank=2, targets=selector), X).to_dict()["rules"][0]
    assert [d["site"] for d in report["declined"]] == ["bn"]
    peftfx.apply(copy.deepcopy(model), LoRA(rank=2, targets=select.name("*") & ~select.name("fc")), X)


def test_transposed_convolution_is_named_as_unsupported():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 2, 2))
    with pytest.raises(peftfx.RuleError, match=r"'1' \(ConvTranspose2d\): a transposed convolution"):
        peftfx.apply(model, LoRA(rank=2, targets=select.name("0", "1")), X)


# ------------------------------------------------------------------------------ checkpoint, composition, ONNX
def test_lora_and_ia3_compose_on_convs_round_trip_and_export(tmp_path):
    base = _cnn()
    rules = [LoRA(rank=2, targets=select.type("Conv2d", "Conv1d")), IA3(targets=select.name("conv", "conv1d"))]
    ours = peftfx.apply(copy.deepcopy(base), rules, X)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    out = _run(ours)
    peftfx.save_adapter(ours, tmp_path / "a")
    again = peftfx.load_adapter(copy.deepcopy(base), tmp_path / "a", X)
    assert (_run(again) - out).abs().max().item() < TOL_W
    assert (_run(peftfx.merge(again)) - out).abs().max().item() < TOL             # LoRA then IA3, folded in order
    report = peftfx.export_onnx(again, str(tmp_path / "cnn.onnx"), X, optimize="none")  # merged, verified in ORT
    assert report.checks and report.max_abs < 1e-4


def test_named_adapters_refuse_conv_sites_clearly_and_change_nothing():
    ours = peftfx.apply(_cnn(), LoRA(rank=2, targets=select.type("Conv2d")), X)
    before = _run(ours)
    with pytest.raises(peftfx.RuleError, match="named adapters hold LoRA on linear and embedding sites"):
        peftfx.add_adapter(ours, "b", LoRA(rank=2, targets=select.type("Conv2d")))
    assert peftfx.adapter_names(ours) == [] and torch.equal(_run(ours), before)
