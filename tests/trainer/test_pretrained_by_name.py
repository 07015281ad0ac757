"""--pretrained NAME: weights found in each library's own cache, never downloaded when cached, and a
clear error naming the file to place when they are neither cached nor downloadable (always offline
here: the download function is replaced so that calling it fails the test or simulates no network).

    pytest -q tests/trainer/test_pretrained_by_name.py
"""
from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm

from trainer.config import TrainConfig
from trainer.models import (WeightsError, WeightsUnavailableError, create_model, get_spec, is_weights_name,
                            load_pretrained)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache ($TORCH_HOME) where any download attempt fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_download(url, dst, *a, **k):
        raise AssertionError(f"a download was attempted: {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path / "torch" / "hub" / "checkpoints"


def offline(monkeypatch):
    def unreachable(url, dst, *a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)


def place(hub: Path, url: str, state: dict) -> Path:
    """Save ``state`` under the exact file name the library's weights API looks for."""
    hub.mkdir(parents=True, exist_ok=True)
    path = hub / os.path.basename(url)
    torch.save(state, path)
    return path


def test_names_and_files_are_told_apart(tmp_path):
    assert is_weights_name("imagenet") and is_weights_name("IMAGENET1K_V2") and is_weights_name("a1_in1k")
    assert not is_weights_name("runs/x/best.pt") and not is_weights_name("weights.pth")
    (tmp_path / "imagenet").write_bytes(b"")  # an existing file of that name is a file
    assert not is_weights_name(str(tmp_path / "imagenet"))


def test_torchvision_weights_come_from_the_hub_cache_without_download(hub):
    weights = tvm.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    src = tvm.mobilenet_v3_small(weights=None)
    place(hub, weights.url, src.state_dict())
    for name in ("imagenet", "IMAGENET1K_V1", "MobileNet_V3_Small_Weights.IMAGENET1K_V1"):
        model = create_model("mobilenet_v3_small", 3, 32)
        report = load_pretrained(model, get_spec("mobilenet_v3_small"), name)
        assert report.skipped == ["classifier.3.bias", "classifier.3.weight"]
        assert torch.equal(model.features[0][0].weight, src.features[0][0].weight)
        assert model.classifier[3].out_features == 3


def test_efficientnet_pytorch_weights_come_from_the_hub_cache(hub):
    from efficientnet_pytorch.utils import url_map_advprop

    src = create_model("efficientnet-b0", 1000, 64)
    place(hub, url_map_advprop["efficientnet-b0"], src.state_dict())
    model = create_model("efficientnet-b0", 4, 64)
    report = load_pretrained(model, get_spec("efficientnet-b0"), "advprop")
    assert report.skipped == ["_fc.bias", "_fc.weight"]
    assert torch.equal(model._conv_stem.weight, src._conv_stem.weight)


def test_missing_weights_error_names_the_file_and_url(hub, monkeypatch):
    offline(monkeypatch)
    url = tvm.RegNet_Y_400MF_Weights.IMAGENET1K_V2.url
    expected = hub / os.path.basename(url)
    model = create_model("regnet_y_400mf", 3, 32)
    with pytest.raises(WeightsUnavailableError) as info:
        load_pretrained(model, get_spec("regnet_y_400mf"), "IMAGENET1K_V2")
    msg = str(info.value)
    assert f"Place the file at: {expected}" in msg and url in msg and "name resolution" in msg
    assert "--pretrained /path/to/that/file" in msg


def test_unknown_weight_set_lists_the_known_ones():
    model = create_model("resnet18", 3, 32)
    with pytest.raises(WeightsError, match="no weights named 'IMAGENET1K_V9'.*IMAGENET1K_V1.*imagenet"):
        load_pretrained(model, get_spec("resnet18"), "IMAGENET1K_V9")
    with pytest.raises(WeightsError, match="'imagenet' and 'advprop'"):
        load_pretrained(create_model("efficientnet-b0", 3, 32), get_spec("efficientnet-b0"), "noisy_student")


@pytest.mark.parametrize("model,name,expected", [
    # (img_size, resize size, interpolation, mean) from torchvision's Weights.transforms
    ("swin_t", "imagenet", (224, 232, "bicubic", [0.485, 0.456, 0.406])),
    ("resnet50", "IMAGENET1K_V1", (224, 256, "bilinear", [0.485, 0.456, 0.406])),
    ("resnet50", "IMAGENET1K_V2", (224, 232, "bilinear", [0.485, 0.456, 0.406])),
    ("efficientnet_v2_s", "imagenet", (384, 384, "bilinear", [0.485, 0.456, 0.406])),
    ("convnext_tiny", "imagenet", (224, 236, "bilinear", [0.485, 0.456, 0.406])),
    ("efficientnet-b2", "imagenet", (260, 260, "bicubic", [0.485, 0.456, 0.406])),
    ("efficientnet-b0", "advprop", (224, 224, "bicubic", [0.5, 0.5, 0.5])),
])
def test_eval_preprocessing_comes_from_the_weights(model, name, expected):
    from trainer.data import PreprocessSpec

    cfg = TrainConfig(model=model, pretrained=name).with_preprocessing_defaults()
    pre = PreprocessSpec.for_size(cfg.img_size, cfg.crop_pct, cfg.interpolation, cfg.mean, cfg.std)
    assert (pre.crop_size[0], pre.resize_size, pre.interpolation, list(pre.mean)) == expected


def test_explicit_settings_win_over_the_weights_and_files_keep_our_defaults(tmp_path):
    cfg = TrainConfig(model="swin_t", pretrained="imagenet", img_size=64, interpolation="bilinear")
    cfg = cfg.with_preprocessing_defaults()
    assert (cfg.img_size, cfg.interpolation, round(cfg.crop_pct, 4)) == (64, "bilinear", round(224 / 232, 4))
    cfg = TrainConfig(model="swin_t", pretrained=str(tmp_path / "w.pth")).with_preprocessing_defaults()
    assert (cfg.img_size, cfg.crop_pct, cfg.interpolation) == (224, 0.875, "bilinear")


def test_train_cli_fine_tunes_by_name_and_records_the_weights_preprocessing(hub, tiny_digits, tmp_path):
    from trainer.cli import main

    weights = tvm.ResNet18_Weights.IMAGENET1K_V1
    place(hub, weights.url, tvm.resnet18(weights=None).state_dict())
    out = tmp_path / "run"
    code = main(["train", "--data", str(tiny_digits), "--out", str(out), "--model", "resnet18", "--pretrained",
                 "imagenet", "--img-size", "32", "--crop-pct", "1.0", "--interpolation", "bicubic", "--epochs", "1",
                 "--batch-size", "16", "--workers", "0", "--quiet"])
    assert code == 0
    ckpt = torch.load(out / "best.pt", map_location="cpu", weights_only=False)
    assert ckpt["config"]["pretrained"] == "imagenet" and ckpt["preprocess"]["interpolation"] == "bicubic"


def test_train_cli_without_cached_weights_exits_2_naming_the_file(hub, tiny_digits, tmp_path, monkeypatch, capsys):
    from trainer.cli import main

    offline(monkeypatch)
    code = main(["train", "--data", str(tiny_digits), "--out", str(tmp_path / "run"), "--model", "regnet_y_400mf",
                 "--pretrained", "imagenet", "--img-size", "32", "--epochs", "1", "--workers", "0", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(hub / os.path.basename(tvm.RegNet_Y_400MF_Weights.DEFAULT.url)) in err
    assert "Traceback" not in err


def test_vit_position_embeddings_resampled_to_the_input_size(hub):
    # torchvision's interpolate_embeddings, as when torchvision loads ViT weights at another size
    weights = tvm.ViT_B_16_Weights.IMAGENET1K_V1
    model = create_model("vit_b_16", 3, 32)  # 2x2 patches + class token
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["encoder.pos_embedding"] = torch.randn(1, 197, 768)  # 14x14 + 1: trained at 224
    state["heads.head.weight"], state["heads.head.bias"] = torch.zeros(1000, 768), torch.zeros(1000)
    place(hub, weights.url, state)
    report = load_pretrained(model, get_spec("vit_b_16"), "imagenet")
    assert model.encoder.pos_embedding.shape == (1, 5, 768)
    assert torch.equal(model.encoder.pos_embedding[0, 0], state["encoder.pos_embedding"][0, 0])  # class token kept
    assert report.skipped == ["heads.head.bias", "heads.head.weight"]


def hf_cache(tmp_path, monkeypatch, download):
    """A Hugging Face hub cache in tmp_path/hf, with ``download`` standing in for hf_hub_download."""
    pytest.importorskip("timm")
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return tmp_path / "hf"


def test_timm_weights_come_from_the_hugging_face_cache(tmp_path, monkeypatch):
    def no_download(*a, **k):
        raise AssertionError("a download was attempted")

    cache = hf_cache(tmp_path, monkeypatch, no_download)
    from safetensors.torch import save_file

    src = create_model("timm/test_vit", 1000, 160)  # the weights' own size: 10x10 patches
    repo = cache / "models--timm--test_vit.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abc")
    (repo / "snapshots" / "0123abc").mkdir(parents=True)
    save_file(src.state_dict(), str(repo / "snapshots" / "0123abc" / "model.safetensors"))

    model = create_model("timm/test_vit", 3, 32)
    report = load_pretrained(model, get_spec("timm/test_vit"), "imagenet")
    assert report.skipped == ["head.bias", "head.weight"]
    assert torch.equal(model.patch_embed.proj.weight, src.patch_embed.proj.weight)
    cfg = TrainConfig(model="timm/test_vit", pretrained="imagenet").with_preprocessing_defaults()
    assert (cfg.img_size, cfg.interpolation, cfg.mean) == (160, "bicubic", [0.5, 0.5, 0.5])


def test_timm_weights_missing_offline_name_the_url(tmp_path, monkeypatch):
    def unreachable(*a, **k):
        raise OSError("offline")

    hf_cache(tmp_path, monkeypatch, unreachable)
    with pytest.raises(WeightsUnavailableError, match="https://huggingface.co/timm/test_vit.r160_in1k/resolve/main/"
                       "model.safetensors"):
        load_pretrained(create_model("timm/test_vit", 3, 32), get_spec("timm/test_vit"), "imagenet")
