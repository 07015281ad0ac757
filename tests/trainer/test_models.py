import pytest
import torch

from trainer.models import (WeightsMismatchError, create_model, get_head, get_spec, head_prefix, list_models,
                            load_pretrained, num_features, penultimate, set_backbone_trainable)
from trainer.models.zoo import EFFICIENTNET_PYTORCH, TORCHVISION_MODELS

ALL = [s.name for s in list_models()]
# the smallest member of each family, for real forward passes
FAMILY_REPS = ["resnet18", "resnext50_32x4d", "densenet121", "mobilenet_v2", "mobilenet_v3_small",
               "efficientnet_b0", "efficientnet-b0"]


def test_registry_lists_every_required_model():
    required = set(TORCHVISION_MODELS) | set(EFFICIENTNET_PYTORCH)
    assert required <= set(ALL)
    assert len(ALL) == 24


def test_unknown_model_lists_alternatives():
    with pytest.raises(KeyError, match="unknown model 'resnet19'.*resnet18"):
        get_spec("resnet19")


@pytest.mark.parametrize("name", ALL)
def test_head_replaced_for_every_model(name):
    # built on the meta device: shapes only, no memory, milliseconds per model
    with torch.device("meta"):
        model = create_model(name, 7, 64)
    head = get_head(model, get_spec(name))
    assert head.out_features == 7
    assert head_prefix(model, get_spec(name)) in {k[: k.rfind(".") + 1] for k in model.state_dict()}
    assert model.state_dict()[head_prefix(model, get_spec(name)) + "weight"].shape[0] == 7


@pytest.mark.parametrize("name", FAMILY_REPS)
def test_forward_and_features_per_family(name):
    torch.manual_seed(0)
    model = create_model(name, 5, 64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        feats = penultimate(model, get_spec(name))(x)
    assert out.shape == (2, 5)
    assert feats.shape == (2, num_features(model, get_spec(name)))


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
    with pytest.raises(FileNotFoundError, match="never downloaded"):
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
