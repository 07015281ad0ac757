"""CNN features + classical classifiers (scikit-learn), for every architecture in the registry.

    python -m trainer features --checkpoint runs/digits/best.pt --data data/digits --classifier svm \
        --cache runs/digits/features.npz --out runs/digits/svm.joblib
    python -m trainer features --predict runs/digits/svm.joblib --checkpoint runs/digits/best.pt \
        --images data/digits/val --out svm_preds.csv

Features are the penultimate activations (the input of the classifier head, ``models.penultimate``),
so they exist for every family. The classifier is ``Pipeline([StandardScaler, CLASSIFIER])`` trained
on the training split and scored on the validation split next to the CNN's own head. The saved
file (joblib) holds the pipeline, the class names and the checkpoint's sha256; ``--predict``
refuses a checkpoint whose sha256 differs. joblib files are pickles: load only files you made.
Features can be cached as ``.npz`` (plain arrays, never pickle), keyed by the checkpoint's sha256.
"""
from __future__ import annotations

import ast
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from .data import ImageSamples, Normalize
from .engine.checkpoint import file_sha256
from .models import get_head
from .errors import UserError

log = logging.getLogger("trainer.features")
CLASSIFIERS = ("svm", "rf", "mlp", "knn", "logreg")
DEFAULT_GRIDS = {
    "svm": {"C": [0.1, 1.0, 10.0], "gamma": ["scale", 0.01]},
    "rf": {"n_estimators": [100, 300], "max_depth": [None, 20]},
    "mlp": {"hidden_layer_sizes": [(128,), (256,)], "alpha": [1e-4, 1e-3]},
    "knn": {"n_neighbors": [1, 3, 5, 9], "weights": ["uniform", "distance"]},
    "logreg": {"C": [0.1, 1.0, 10.0]},
}


class FeaturesError(UserError):
    pass


def make_classifier(name: str, seed: int = 0):
    """The classifier with our defaults (chosen for a few thousand samples of a few hundred dimensions)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import SVC

    if name == "svm":
        from sklearn.calibration import CalibratedClassifierCV

        # probabilities by Platt scaling (SVC(probability=True) is deprecated since scikit-learn 1.9);
        # --param C=10 reaches the SVC through param_name()
        return CalibratedClassifierCV(SVC(C=1.0, kernel="rbf", gamma="scale", random_state=seed), ensemble=False,
                                      cv=3)
    if name == "rf":
        return RandomForestClassifier(n_estimators=300, n_jobs=-1, random_state=seed)
    if name == "mlp":
        return MLPClassifier(hidden_layer_sizes=(256,), alpha=1e-4, max_iter=500, early_stopping=True,
                             random_state=seed)
    if name == "knn":
        return KNeighborsClassifier(n_neighbors=5)
    if name == "logreg":
        return LogisticRegression(C=1.0, max_iter=2000)
    raise FeaturesError(f"unknown classifier {name!r}; use one of {', '.join(CLASSIFIERS)}")


def parse_params(items: list[str] | None) -> dict:
    """['C=10', 'kernel=linear', 'hidden_layer_sizes=(64,32)'] -> {'C': 10, 'kernel': 'linear', ...}."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise FeaturesError(f"--param {item!r}: write NAME=VALUE, e.g. C=10")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            out[k.strip()] = v.strip()  # a plain string such as kernel=linear
    return out


def parse_grid(items: list[str] | None, classifier: str) -> dict:
    """['C=0.1,1,10'] -> {'C': [0.1, 1, 10]}; nothing given -> the default grid for the classifier."""
    if not items:
        return dict(DEFAULT_GRIDS[classifier])
    grid = {}
    for k, v in parse_params(items).items():
        grid[k] = list(v) if isinstance(v, (list, tuple)) and not k.endswith("sizes") else (
            [v] if not isinstance(v, list) else v)
    return grid


def param_name(clf, name: str) -> str:
    """A classifier parameter's name, reaching into a wrapped estimator (the calibrated SVC) when needed."""
    valid = clf.get_params()
    if name not in valid and f"estimator__{name}" in valid:
        return f"estimator__{name}"
    return name


def build_pipeline(classifier: str, params: dict | None = None, seed: int = 0):
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_classifier(classifier, seed)
    if params:
        valid = clf.get_params()
        params = {param_name(clf, k): v for k, v in params.items()}
        unknown = sorted(set(params) - set(valid))
        if unknown:
            names = sorted(k.removeprefix("estimator__") for k in valid if k != "estimator")
            raise FeaturesError(f"the {classifier} classifier has no parameter(s) {unknown}; it has: {', '.join(names)}")
        clf.set_params(**params)
    return Pipeline([("scale", StandardScaler()), ("clf", clf)])


@torch.no_grad()
def extract_features(model: torch.nn.Module, spec, preprocess, samples: list[tuple[str, int]], device="cpu",
                     batch_size: int = 64, workers: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass -> (features (N, D) float32 = the head's input, head logits (N, K), labels (N,))."""
    device = torch.device(device)
    model = model.to(device).eval()
    head = get_head(model, spec)
    normalize = Normalize(preprocess.mean, preprocess.std).to(device)
    loader = DataLoader(ImageSamples(samples, eval_spec=preprocess), batch_size=batch_size, shuffle=False,
                        num_workers=workers)
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda m, inp, out: captured.append(inp[0].flatten(1).float().cpu()))
    feats, logits, labels = [], [], []
    try:
        for x, y in loader:
            out = model(normalize(x.to(device)))
            feats.append(captured.pop())
            logits.append(out.float().cpu())
            labels.append(torch.as_tensor(y))
    finally:
        handle.remove()
    return torch.cat(feats).numpy(), torch.cat(logits).numpy(), torch.cat(labels).numpy()


def cached_features(cache: str | os.PathLike | None, checkpoint_sha: str, split: str, samples, compute):
    """Load (features, logits, labels) for ``split`` from the .npz cache when it was made from the same
    checkpoint and the same files; otherwise compute and (re)write it. Never pickle (allow_pickle=False)."""
    paths = np.asarray([p for p, _ in samples])
    if cache and Path(cache).is_file():
        with np.load(cache, allow_pickle=False) as z:
            if (str(z["checkpoint_sha256"]) == checkpoint_sha and f"{split}_paths" in z
                    and np.array_equal(z[f"{split}_paths"], paths)):
                return z[f"{split}_features"], z[f"{split}_logits"], z[f"{split}_labels"], True
    feats, logits, labels = compute()
    if cache:
        data = {}
        if Path(cache).is_file():
            with np.load(cache, allow_pickle=False) as z:
                if str(z["checkpoint_sha256"]) == checkpoint_sha:
                    data = {k: z[k] for k in z.files}
        data.update({"checkpoint_sha256": np.asarray(checkpoint_sha), f"{split}_paths": paths,
                     f"{split}_features": feats, f"{split}_logits": logits, f"{split}_labels": labels})
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(cache).with_name(f".{Path(cache).name}.tmp.npz")
        np.savez_compressed(tmp, **data)
        os.replace(tmp, cache)
    return feats, logits, labels, False


def train_classifier(checkpoint: str | os.PathLike, data: str | os.PathLike, classifier: str = "svm",
                     params: dict | None = None, grid: dict | None = None, cv: int = 5, out=None, cache=None,
                     device: str = "auto", batch_size: int = 64, workers: int = 0, seed: int = 0) -> dict:
    """Fit the pipeline on the training split's features, score it and the CNN head on the validation split."""
    import joblib
    import sklearn
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    from .inference import model_from_checkpoint
    from .data import discover_dataset
    from .engine.runtime import resolve_device

    loaded = model_from_checkpoint(checkpoint)
    path = loaded.checkpoint["path"]
    sha = file_sha256(path)
    cfg = loaded.checkpoint.get("config", {})
    splits = discover_dataset(data, cfg.get("val_fraction"), cfg.get("seed", 0))
    if splits.classes != loaded.classes:
        raise FeaturesError(f"'{data}' has classes {splits.classes}, the checkpoint {loaded.classes}")
    dev = resolve_device(device)
    run = lambda s: lambda: extract_features(loaded.model, loaded.spec, loaded.preprocess, s, dev,  # noqa: E731
                                             batch_size, workers)
    xtr, _, ytr, hit_tr = cached_features(cache, sha, "train", splits.train, run(splits.train))
    xva, lva, yva, hit_va = cached_features(cache, sha, "val", splits.val, run(splits.val))
    pipe = build_pipeline(classifier, params, seed)
    search = None
    if grid is not None:
        grid = {f"clf__{param_name(pipe.named_steps['clf'], k)}": v for k, v in grid.items()}
        folds = StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed)
        search = GridSearchCV(pipe, grid, cv=folds, n_jobs=1)
        search.fit(xtr, ytr)
        pipe = search.best_estimator_
    else:
        pipe.fit(xtr, ytr)
    result = {"classifier": classifier, "arch": loaded.spec.name, "feature_dim": int(xtr.shape[1]),
              "train_samples": int(len(ytr)), "val_samples": int(len(yva)),
              "val_top1": float((pipe.predict(xva) == yva).mean()) if len(yva) else float("nan"),
              "cnn_head_val_top1": float((lva.argmax(1) == yva).mean()) if len(yva) else float("nan"),
              "params": dict(params or {}),
              "cache_hit": bool(hit_tr and hit_va)}
    if search is not None:
        result["grid_best_params"] = {k[len("clf__"):].removeprefix("estimator__"): v
                                      for k, v in search.best_params_.items()}
        result["grid_cv_top1"] = float(search.best_score_)
    if out:
        bundle = {"pipeline": pipe, "classes": loaded.classes, "checkpoint_sha256": sha, "checkpoint": str(path),
                  "arch": loaded.spec.name, "weights": loaded.weights, "result": result,
                  "sklearn_version": sklearn.__version__,
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        joblib.dump(bundle, out)
        result["out"] = str(out)
    return result


def predict_with_classifier(saved: str | os.PathLike, checkpoint: str | os.PathLike, images: str | os.PathLike,
                            device: str = "auto", batch_size: int = 64, workers: int = 0):
    """Reuse a saved pipeline on new images -> PredictionTable (error rows for unreadable images)."""
    import joblib

    from .inference import model_from_checkpoint
    from .data import ImageDecodeError, decode_image
    from .engine.runtime import resolve_device
    from .predict import PredictionTable, image_ids, list_images

    if not Path(saved).is_file():
        raise FeaturesError(f"classifier file '{saved}' not found (make it with 'python -m trainer features ... --out')")
    bundle = joblib.load(saved)
    loaded = model_from_checkpoint(checkpoint, bundle.get("weights", "auto"))
    sha = file_sha256(loaded.checkpoint["path"])
    if sha != bundle["checkpoint_sha256"]:
        raise FeaturesError(f"{saved} was fitted on features of the checkpoint with sha256 "
                            f"{bundle['checkpoint_sha256'][:12]}... ({bundle['checkpoint']}), but "
                            f"{loaded.checkpoint['path']} has sha256 {sha[:12]}...; give the original checkpoint "
                            "or fit the classifier again")
    paths = list_images(images)
    errors = []
    for p in paths:  # decode once up front so one bad file becomes one error row
        try:
            decode_image(p)
            errors.append("")
        except ImageDecodeError as exc:
            log.warning("unreadable image, written as an error row: %s", exc)
            errors.append(str(exc))
    good = [(p, 0) for p, e in zip(paths, errors) if not e]
    k = len(bundle["classes"])
    probs = np.full((len(paths), k), np.nan, dtype=np.float32)
    if good:
        feats, _, _ = extract_features(loaded.model, loaded.spec, loaded.preprocess, good, resolve_device(device),
                                       batch_size, workers)
        pipe = bundle["pipeline"]
        if hasattr(pipe, "predict_proba"):
            p = pipe.predict_proba(feats)
            full = np.zeros((len(good), k), dtype=np.float32)
            full[:, pipe.classes_] = p  # classes_ are label indices; absent classes stay 0
        else:
            full = np.eye(k, dtype=np.float32)[pipe.predict(feats)]
        probs[[i for i, e in enumerate(errors) if not e]] = full
    return PredictionTable(image_ids(paths), list(bundle["classes"]), probs, errors)
