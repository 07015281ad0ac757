from contextlib import nullcontext

import pytest
import torch

from trainer.models import (WeightsMismatchError, create_model, get_head, get_spec, head_prefix, list_models,
                            load_pretrained, num_features, penultimate, set_backbone_trainable)
from trainer.models.zoo import EFFICIENTNET_PYTORCH, TORCHVISION_MODELS

ALL = [s.name for s in list_models()]
# the smallest member of each family, for real forward and backward passes
FAMILY_REPS = ["resnet18", "resnext50_32x4d", "densenet121", "mobilenet_v2", "mobilenet_v3_small",
               "efficientnet_b0", "efficientnet-b0"]
# the 2020-2022 families, and timm's own test models (tiny versions of its families) through the extra
MODERN_REPS = ["efficientnet_v2_s", "regnet_y_400mf", "convnext_tiny", "swin_t", "vit_b_16",
               "timm/test_convnext", "timm/test_vit", "timm/test_efficientnet"]


def test_registry_lists_every_required_model():
    required = set(TORCHVISION_MODELS) | set(EFFICIENTNET_PYTORCH)
    assert required <= set(ALL)
    assert {"convnext_tiny", "convnext_small", "vit_b_16", "swin_t", "regnet_y_400mf", "efficientnet_v2_s"} <= set(ALL)
    assert len(ALL) == 33


def test_unknown_model_lists_alternatives():
    with pytest.raises(KeyError, match="unknown model 'resnet19'.*resnet18"):
        get_spec("resnet19")


@pytest.mark.parametrize("name", ALL)
def test_head_replaced_for_every_model(name):
    # built on the meta device: shapes only, no memory, milliseconds per model (torchvision's RegNet
    # computes its stage widths with tensor ops that need data, so it is built for real: 3-6M params)
    with nullcontext() if get_spec(name).family == "regnet" else torch.device("meta"):
        model = create_model(name, 7, 64)
    head = get_head(model, get_spec(name))
    assert head.out_features == 7
    assert head_prefix(model, get_spec(name)) in {k[: k.rfind(".") + 1] for k in model.state_dict()}
    assert model.state_dict()[head_prefix(model, get_spec(name)) + "weight"].shape[0] == 7


@pytest.mark.parametrize("name", FAMILY_REPS)
def test_forward_and_features_per_family(name):
    torch.manual_seed(0)
    model = create_model(name, 5, 32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        feats = penultimate(model, get_spec(name))(x)
    assert out.shape == (2, 5)
    assert feats.shape == (2, num_features(model, get_spec(name)))


@pytest.mark.parametrize("name", MODERN_REPS)
def test_modern_family_trains_and_extracts_features(name):
    if name.startswith("timm/"):
        pytest.importorskip("timm")
    torch.manual_seed(0)
    spec = get_spec(name)
    model = create_model(name, 5, 32).train()
    x = torch.randn(2, 3, 32, 32)
    model(x).logsumexp(1).sum().backward()  # trainable: the new head and the first backbone layer get gradients
    first = next(p for n, p in model.named_parameters() if not n.startswith(head_prefix(model, spec)))
    assert get_head(model, spec).weight.grad.abs().sum() > 0 and first.grad.abs().sum() > 0
    with torch.no_grad():
        out = model.eval()(x)
        feats = penultimate(model, spec)(x)
    assert out.shape == (2, 5)
    assert feats.shape == (2, num_features(model, spec))


def test_timm_models_by_name_with_their_own_defaults():
    pytest.importorskip("timm")
    spec = get_spec("timm/test_vit")
    assert (spec.source, spec.head, spec.default_img_size, spec.size_multiple) == ("timm", "head", 160, 16)
    assert get_spec("timm/resnet18.a1_in1k").head == "fc"
    assert "timm/test_vit" not in {s.name for s in list_models()}  # built on demand, not listed
    with pytest.raises(KeyError, match="unknown timm model 'resnet19x'.*resnet"):
        get_spec("timm/resnet19x")
    with pytest.raises(KeyError, match="no weights tagged 'nope'.*resnet18.a1_in1k"):
        get_spec("timm/resnet18.nope")


def test_timm_names_without_timm_say_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(KeyError, match=r"pip install 'shipclassifier\[timm\]'"):
        get_spec("timm/some_model_not_built_yet")


def test_vit_input_size_must_be_a_multiple_of_the_patch():
    with pytest.raises(ValueError, match="multiple of 16, got 40; pass e.g. --img-size 32"):
        create_model("vit_b_16", 3, 40)


def test_pretrained_skips_old_head_and_reports_it(tmp_path):
    src = create_model("resnet18", 1000, 32)
    torch.save(src.state_dict(), tmp_path / "imagenet.pth")
    model = create_model("resnet18", 10, 32)
    report = load_pretrained(model, get_spec("resnet18"), tmp_path / "imagenet.pth")
    assert report.skipped == ["fc.bias", "fc.weight"]
    assert torch.equal(model.conv1.weight, src.conv1.weight)
    assert model.fc.out_features == 10


def test_pretrained_efficientnet_pytorch_layout(tmp_path):
    src = create_model("efficientnet-b0", 1000, 64)
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, tmp_path / "w.pth")
    model = create_model("efficientnet-b0", 3, 64)
    report = load_pretrained(model, get_spec("efficientnet-b0"), tmp_path / "w.pth")
    assert report.skipped == ["_fc.bias", "_fc.weight"]
    assert torch.equal(model._conv_stem.weight, src._conv_stem.weight)


def test_pretrained_mismatch_is_refused_with_layout_hint(tmp_path):
    torch.save(create_model("efficientnet-b0", 1000, 64).state_dict(), tmp_path / "eff.pth")
    model = create_model("resnet18", 10, 32)
    with pytest.raises(WeightsMismatchError, match="does not match resnet18.*efficientnet-pytorch-layout"):
        load_pretrained(model, get_spec("resnet18"), tmp_path / "eff.pth")
    torch.save(create_model("resnet34", 1000, 32).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(WeightsMismatchError, match="unexpected"):
        load_pretrained(model, get_spec("resnet18"), tmp_path / "r34.pth")


def test_pretrained_missing_or_garbage_file(tmp_path):
    model = create_model("resnet18", 10, 32)
    with pytest.raises(FileNotFoundError, match="not found; give a local file, or a weights name"):
        load_pretrained(model, get_spec("resnet18"), tmp_path / "none.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsMismatchError, match="cannot read"):
        load_pretrained(model, get_spec("resnet18"), tmp_path / "junk.pth")


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet-b0", "densenet121"])
def test_freeze_backbone_leaves_only_head_trainable(name):
    with torch.device("meta"):
        model = create_model(name, 4, 32)
    spec = get_spec(name)
    set_backbone_trainable(model, spec, False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {head_prefix(model, spec) + "weight", head_prefix(model, spec) + "bias"}
    set_backbone_trainable(model, spec, True)
    assert all(p.requires_grad for p in model.parameters())


def test_models_command_lists_the_modern_families_and_timm(capsys):
    from trainer.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "vit_b_16" in out and "convnext_tiny" in out and "timm/<name>" in out and "--pretrained imagenet" in out
