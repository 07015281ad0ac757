"""Forward hooks, Grad-CAM (against a hand-written reference) and default target layers for every family."""
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from extras_support import cli, tiny_checkpoint
from trainer.models import create_model, list_models
from trainer.visualize import (DEFAULT_CAM_LAYERS, NO_DEFAULT_CAM, LayerError, default_cam_layer, feature_maps, grad_cam,
                               list_layers, resolve_layer)

FAMILY_MODELS = {"resnet": "resnet18", "resnext": "resnext50_32x4d", "densenet": "densenet121",
                 "mobilenet_v2": "mobilenet_v2", "mobilenet_v3": "mobilenet_v3_small", "efficientnet": "efficientnet_b0",
                 "efficientnet-pytorch": "efficientnet-b0", "efficientnet_v2": "efficientnet_v2_s",
                 "regnet": "regnet_y_400mf", "convnext": "convnext_tiny"}


def test_every_family_has_a_default_layer():
    assert set(FAMILY_MODELS) == {s.family for s in list_models()} - NO_DEFAULT_CAM == set(DEFAULT_CAM_LAYERS)
    with torch.device("meta"):
        model = create_model("vit_b_16", 3, 32)
    with pytest.raises(LayerError, match="'vit' \\(a transformer.*pass --cam-layer NAME"):
        default_cam_layer(model, "vit", (32, 32))


@pytest.mark.parametrize("family", sorted(FAMILY_MODELS))
def test_default_cam_layer_is_the_last_feature_map(family):
    """On the meta device (no memory, no compute): at the default input size the default layer's output is
    the model's last 4-D activation, i.e. the map that global pooling turns into the features."""
    name = FAMILY_MODELS[family]
    with nullcontext() if family == "regnet" else torch.device("meta"):  # RegNet's builder needs real tensors
        model = create_model(name, 3, 224)
        order: list[tuple[str, tuple]] = []
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: order.append((n, tuple(o.shape))))
                 for n, m in model.named_modules() if n and isinstance(m, torch.nn.Module)]
        model.eval()(torch.zeros(1, 3, 224, 224))
        for h in hooks:
            h.remove()
        layer = default_cam_layer(model, family, (224, 224))
    last4d = [shape for n, shape in order if len(shape) == 4 and min(shape[2:]) > 1][-1]  # not the pooled 1x1
    assert layer == DEFAULT_CAM_LAYERS[family][0]
    assert dict(order)[layer] == last4d and min(last4d[2:]) >= 4


def test_grad_cam_matches_a_hand_split_forward_pass():
    """resnet18 (plain) and densenet121 (its forward applies relu in place to the hooked output)."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    for name, layer in (("resnet18", "layer3"), ("densenet121", "features")):
        model = create_model(name, 4, 64).eval()
        if name == "resnet18":
            a = model.layer3(model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x)))))))
            a = a.detach().requires_grad_(True)
            logits = model.fc(torch.flatten(model.avgpool(model.layer4(a)), 1))
        else:
            a = model.features(x).detach().requires_grad_(True)
            logits = model.classifier(torch.flatten(F.adaptive_avg_pool2d(F.relu(a), 1), 1))
        compared = 0
        for cls in range(4):
            cam, idx, probs = grad_cam(model, x, layer, class_index=cls)
            (g,) = torch.autograd.grad(logits[0, cls], a, retain_graph=True)
            ref = F.relu((g[0].mean((1, 2))[:, None, None] * a[0]).sum(0)).detach()
            ref = F.interpolate(ref[None, None], size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
            assert idx == cls
            np.testing.assert_allclose(probs, torch.softmax(logits, 1)[0].detach().numpy(), atol=1e-5)
            if float(ref.max() - ref.min()) < 1e-7:
                assert not cam.any()  # nothing positive to show: an empty map, not normalised noise
                continue
            ref = (ref - ref.min()) / (ref.max() - ref.min())
            np.testing.assert_allclose(cam, ref.numpy(), atol=1e-4)
            compared += 1
        assert compared >= 1


@pytest.mark.parametrize("family", sorted(FAMILY_MODELS))
def test_hooks_and_grad_cam_run_for_every_family(family):
    torch.manual_seed(0)
    model = create_model(FAMILY_MODELS[family], 3, 32).eval()
    layer = default_cam_layer(model, family, (32, 32))  # 32 px: every family falls back to a 4x4-or-larger stage
    x = torch.randn(1, 3, 32, 32)
    maps = feature_maps(model, x, [layer])
    assert maps[layer].dim() == 3 and min(maps[layer].shape[1:]) >= 4
    cam, idx, probs = grad_cam(model, x, layer)
    assert cam.shape == (32, 32) and np.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1
    assert idx == int(np.argmax(probs))


def test_layer_names_and_errors():
    model = create_model("resnet18", 3, 32)
    names = [n for n, _, _ in list_layers(model, (32, 32))]
    assert names[:3] == ["conv1", "bn1", "relu"] and "layer4.1.conv2" in names
    assert dict((n, s) for n, _, s in list_layers(model, (32, 32)))["layer2"] == (128, 4, 4)
    with pytest.raises(LayerError, match=r"no layer named 'layer5'.*Close matches: layer\d"):
        resolve_layer(model, "layer5")
    # too coarse at 32 px: layer4 is 1x1, so the default falls back to the deepest stage of at least 4x4
    assert default_cam_layer(model, "resnet", (32, 32)) == "layer2"


def test_visualize_cli_writes_pngs(tmp_path_factory, tiny_digits, tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path_factory, tiny_digits)
    img = sorted((tiny_digits / "val" / "7").glob("*.png"))[0]
    assert cli("visualize", "--checkpoint", ckpt, "--image", img, "--layers", "layer1,layer2.0.conv1",
               "--cam-class", "1", "--out", tmp_path / "vis") == 0
    out = capsys.readouterr().out
    assert "Grad-CAM for class 1 at layer2" in out
    files = sorted(p.name for p in (tmp_path / "vis").glob("*.png"))
    assert files == [f"{img.stem}_gradcam_1.png", f"{img.stem}_layer1.png", f"{img.stem}_layer2.0.conv1.png"]
    for f in files:
        with Image.open(tmp_path / "vis" / f) as im:
            assert im.size[0] > 300 and np.asarray(im.convert("L")).std() > 10  # a real picture, not blank
    assert cli("visualize", "--checkpoint", ckpt, "--image", img, "--layers", "layer9", "--out", tmp_path / "v2") == 2
    assert "Close matches" in capsys.readouterr().err
    assert cli("visualize", "--checkpoint", ckpt, "--list-layers") == 0
    assert "layer4.1.bn2" in capsys.readouterr().out
