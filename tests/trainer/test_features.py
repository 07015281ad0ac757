"""CNN features for every registry family + scikit-learn pipelines (params, grid, cache, joblib, sha256)."""
import csv

import numpy as np
import pytest
import torch

from extras_support import cli, perturbed_copy, tiny_checkpoint
from trainer.data.transforms import PreprocessSpec
from trainer.features import (FeaturesError, build_pipeline, extract_features, parse_grid, parse_params,
                              predict_with_classifier, train_classifier)
from trainer.models import create_model, get_spec, list_models, num_features

ONE_PER_FAMILY = ["resnet18", "resnext50_32x4d", "densenet121", "mobilenet_v2", "mobilenet_v3_small",
                  "efficientnet_b0", "efficientnet-b0", "efficientnet_v2_s", "regnet_y_400mf", "convnext_tiny",
                  "swin_t", "vit_b_16"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_digits):
    return tiny_checkpoint(tmp_path_factory, tiny_digits)


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_penultimate_features_for_every_family(name, tmp_path):
    """Features are exactly the head's input: head(features) reproduces the model's logits."""
    spec = get_spec(name)
    torch.manual_seed(0)
    model = create_model(name, 3, 32).eval()
    img = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(img)
    feats, logits, labels = extract_features(model, spec, PreprocessSpec.for_size(32), [(str(img), 2)] * 2)
    assert feats.shape == (2, num_features(model, spec)) and labels.tolist() == [2, 2]
    from trainer.models import get_head

    with torch.no_grad():
        again = get_head(model, spec)(torch.from_numpy(feats)).numpy()
    np.testing.assert_allclose(again, logits, atol=1e-4, rtol=1e-4)


def test_every_registered_family_is_covered():
    assert {get_spec(n).family for n in ONE_PER_FAMILY} == {s.family for s in list_models()}


def test_params_and_pipelines():
    assert parse_params(["C=10", "kernel=linear", "hidden_layer_sizes=(64, 32)"]) == \
        {"C": 10, "kernel": "linear", "hidden_layer_sizes": (64, 32)}
    assert parse_grid(["C=0.1,1"], "svm") == {"C": [0.1, 1]}
    assert "n_neighbors" in parse_grid(None, "knn")
    pipe = build_pipeline("knn", {"n_neighbors": 3})
    assert [n for n, _ in pipe.steps] == ["scale", "clf"] and pipe.named_steps["clf"].n_neighbors == 3
    for name in ("svm", "rf", "mlp", "knn", "logreg"):
        build_pipeline(name)
    svm = build_pipeline("svm", {"C": 10, "gamma": 0.01}).named_steps["clf"]  # reaches the calibrated SVC
    assert svm.estimator.C == 10 and svm.estimator.gamma == 0.01
    with pytest.raises(FeaturesError, match="has no parameter"):
        build_pipeline("svm", {"n_neighbors": 3})
    with pytest.raises(FeaturesError, match="NAME=VALUE"):
        parse_params(["C"])


def test_fit_cache_save_predict_and_sha_refusal(ckpt, tiny_digits, tmp_path, capsys):
    cache = tmp_path / "feats.npz"
    res = train_classifier(ckpt, tiny_digits, "logreg", cache=cache, out=tmp_path / "lr.joblib", workers=0,
                           device="cpu")
    assert res["feature_dim"] == 512 and res["train_samples"] == 72 and res["val_samples"] == 24
    assert not res["cache_hit"] and 0.0 <= res["val_top1"] <= 1.0
    with np.load(cache, allow_pickle=False) as z:  # plain arrays only
        assert z["train_features"].shape == (72, 512) and len(str(z["checkpoint_sha256"])) == 64
    # a second classifier reuses the cache, with a grid search
    res2 = train_classifier(ckpt, tiny_digits, "knn", grid={"n_neighbors": [1, 3]}, cv=3, cache=cache, workers=0,
                            device="cpu")
    assert res2["cache_hit"] and res2["grid_best_params"]["n_neighbors"] in (1, 3)
    assert res2["cnn_head_val_top1"] == res["cnn_head_val_top1"]
    # the saved pipeline predicts through the CLI; unreadable images become error rows
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for f in sorted((tiny_digits / "val" / "1").glob("*.png"))[:3]:
        (imgs / f.name).write_bytes(f.read_bytes())
    (imgs / "bad.png").write_bytes(b"nope")
    assert cli("features", "--predict", tmp_path / "lr.joblib", "--checkpoint", ckpt, "--images", imgs,
               "--out", tmp_path / "p.csv", "--device", "cpu") == 0
    with open(tmp_path / "p.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and [r["id"] for r in rows if r["error"]] == ["bad"]
    good = [r for r in rows if not r["error"]]
    assert all(abs(sum(float(r[f"prob_{c}"]) for c in ("0", "1", "7")) - 1) < 1e-4 for r in good)
    # the reference: the same pipeline on features extracted directly
    import joblib

    saved = joblib.load(tmp_path / "lr.joblib")
    assert saved["classes"] == ["0", "1", "7"] and saved["arch"] == "resnet18"
    direct = predict_with_classifier(tmp_path / "lr.joblib", ckpt, imgs, device="cpu")
    assert [direct.classes[int(np.argmax(p))] for p, e in zip(direct.probs, direct.errors) if not e] == \
        [r["label"] for r in good]
    other = perturbed_copy(ckpt, tmp_path / "other.pt")
    assert cli("features", "--predict", tmp_path / "lr.joblib", "--checkpoint", other, "--images", imgs,
               "--out", tmp_path / "p2.csv") == 2
    assert "sha256" in capsys.readouterr().err and not (tmp_path / "p2.csv").exists()
