"""Fusing several models' predictions: probability averaging, weighted averaging, (weighted) voting.

    python -m trainer ensemble --inputs a.csv b.csv c.csv --method mean --out fused.csv
    python -m trainer ensemble --inputs a.csv b.csv c.csv --method weighted --weights 0.5,0.3,0.2 --out fused.csv
    python -m trainer ensemble --inputs "subs/method*.csv" --method vote --out vote.csv

Inputs are either our prediction CSVs (``id,label,prob,...,prob_<class>...``; header required) or
the seed project's header-less ``id,label`` vote files (a first line ``id,label`` is recognised as
a header and skipped). Rows are matched by id, never by line number. The fusion rules are the ones
the bundle contract defines (docs/BUNDLE.md): ``mean`` averages probabilities, ``weighted`` uses
the weights normalised to sum 1, ``vote`` is the weighted majority of top-1 labels, ties to the
lowest class index, returned as weighted vote fractions. Files with labels only can be voted
(``vote``, or ``weighted`` = weighted vote) but not averaged. As in the seed's ``kaggle_vote.py``, a
file named ``..._w3.csv`` carries weight 3 when no ``--weights`` are given.
"""
from __future__ import annotations

import csv
import glob
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .predict import PredictionTable
from .errors import UserError

METHODS = ("mean", "weighted", "vote")


class EnsembleError(UserError):
    pass


def fuse_probs(probs: list[np.ndarray], method: str = "mean", weights: list[float] | None = None) -> np.ndarray:
    """M arrays (N, K) -> (N, K). ``vote``: weighted top-1 vote fractions, ties to the lowest class index
    (``argmax`` of the result returns it)."""
    if method not in METHODS:
        raise EnsembleError(f"unknown fusion method {method!r}; use one of {', '.join(METHODS)}")
    m = len(probs)
    w = normalise_weights(weights, m) if (weights is not None or method == "weighted") else np.full(m, 1.0 / m)
    stack = np.stack([np.asarray(p, dtype=np.float64) for p in probs])  # (M, N, K)
    if method in ("mean", "weighted"):
        return np.tensordot(w, stack, axes=1).astype(np.float32)
    k = stack.shape[-1]
    top = stack.argmax(-1)  # (M, N); argmax itself breaks a member's own ties to the lowest index
    votes = np.zeros(stack.shape[1:], dtype=np.float64)
    for j in range(m):
        votes[np.arange(stack.shape[1]), top[j]] += w[j]
    assert votes.shape[-1] == k
    return votes.astype(np.float32)


def normalise_weights(weights: list[float] | None, m: int) -> np.ndarray:
    if weights is None:
        return np.full(m, 1.0 / m)
    if len(weights) != m:
        raise EnsembleError(f"{len(weights)} weight(s) given for {m} input(s); give exactly one weight per input")
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise EnsembleError(f"weights must be finite, non-negative and not all zero (got {list(weights)})")
    return w / w.sum()


def parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.replace(" ", ",").split(",") if x]
    except ValueError:
        raise EnsembleError(f"--weights {text!r}: write numbers separated by commas, e.g. 0.5,0.3,0.2") from None


@dataclass
class PredictionFile:
    path: str
    ids: list[str]
    labels: list[str]
    classes: list[str] | None  # from prob_<class> columns; None for label-only files
    probs: np.ndarray | None  # (N, K) in ``classes`` order


def read_predictions(path: str | os.PathLike) -> PredictionFile:
    """Read our prediction CSV or a seed-style ``id,label`` file (with or without a header)."""
    path = str(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    except FileNotFoundError:
        raise EnsembleError(f"input '{path}' not found") from None
    if not rows:
        raise EnsembleError(f"input '{path}' is empty")
    first = [c.strip() for c in rows[0]]
    has_header = first[0].lower() == "id" and len(first) >= 2 and first[1].lower() in ("label", "prediction",
                                                                                        "class", "category")
    header = first if has_header else ["id", "label"]
    body = rows[1:] if has_header else rows
    if not has_header and len(first) != 2:
        raise EnsembleError(f"{path}: a file without a header must have exactly two columns (id,label); "
                            f"line 1 has {len(first)}. Write our prediction CSVs with their header.")
    col = {name: i for i, name in enumerate(header)}
    prob_cols = [(name[len("prob_"):], i) for i, name in enumerate(header) if name.startswith("prob_")]
    ids, labels, probs, errors = [], [], [], []
    err_col = col.get("error")
    for lineno, r in enumerate(body, 2 if has_header else 1):
        if len(r) < 2:
            raise EnsembleError(f"{path}: line {lineno} has {len(r)} column(s); expected at least id,label")
        if err_col is not None and err_col < len(r) and r[err_col].strip():
            errors.append(r[0])
            continue
        ids.append(r[0].strip())
        labels.append(r[1].strip())
        if prob_cols:
            try:
                probs.append([float(r[i]) for _, i in prob_cols])
            except (ValueError, IndexError):
                raise EnsembleError(f"{path}: line {lineno}: probability columns are not all numbers") from None
    dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dupes:
        raise EnsembleError(f"{path}: duplicate id(s) {dupes[:5]}; each id must appear once")
    if errors:
        raise EnsembleError(f"{path}: {len(errors)} row(s) are prediction errors (e.g. id {errors[0]!r}); "
                            "fix or remove those images and predict again, or drop the rows from every input")
    classes = [c for c, _ in prob_cols] or None
    return PredictionFile(path, ids, labels, classes, np.asarray(probs, dtype=np.float32) if classes else None)


def expand_inputs(inputs: list[str]) -> list[str]:
    """Shell-style globs (quoted on the command line, as the seed's kaggle_vote.py took them) are expanded."""
    out = []
    for pattern in inputs:
        matches = sorted(glob.glob(pattern)) if any(ch in pattern for ch in "*?[") else [pattern]
        if not matches:
            raise EnsembleError(f"--inputs {pattern!r} matches no file")
        out.extend(matches)
    return out


def weights_from_names(paths: list[str]) -> list[float] | None:
    """kaggle_vote.py's convention: 'method1_w3.csv' weighs 3; None unless every file has such a suffix."""
    found = [re.search(r"_w(\d+(?:\.\d+)?)\.[^.]+$", os.path.basename(p)) for p in paths]
    if all(found):
        return [float(m.group(1)) for m in found]
    return None


def _class_order(files: list[PredictionFile]) -> list[str]:
    with_probs = [f for f in files if f.classes]
    if with_probs:
        classes = with_probs[0].classes
        for f in with_probs[1:]:
            if f.classes != classes:
                raise EnsembleError(f"class columns differ: {with_probs[0].path} has {classes}, {f.path} has "
                                    f"{f.classes}; ensemble models trained on the same classes")
        extra = sorted({lbl for f in files for lbl in f.labels} - set(classes))
        if extra:
            raise EnsembleError(f"label(s) {extra[:5]} are not among the probability columns {classes}")
        return classes
    labels = {lbl for f in files for lbl in f.labels}
    # natural order: numeric labels by value, others alphabetically (so ties go to '2' before '10')
    return sorted(labels, key=lambda s: (0, float(s), s) if _is_number(s) else (1, 0.0, s))


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def align(files: list[PredictionFile], on_mismatch: str = "error") -> list[str]:
    """The ids to fuse, in the first file's order. Mismatched id sets raise (naming what is missing where)
    unless ``on_mismatch='intersect'``."""
    sets = [set(f.ids) for f in files]
    common = set.intersection(*sets)
    if any(s != common for s in sets):
        lines = []
        for f, s in zip(files, sets):
            missing = sorted(set.union(*sets) - s)
            if missing:
                lines.append(f"{f.path} lacks {len(missing)} id(s), e.g. {missing[:5]}")
        if on_mismatch != "intersect":
            raise EnsembleError("the inputs do not predict the same ids:\n  " + "\n  ".join(lines)
                                + f"\nPredict the same images with every model, or pass --on-mismatch intersect "
                                  f"to fuse only the {len(common)} common id(s).")
    return [i for i in files[0].ids if i in common]


def ensemble_files(inputs: list[str], method: str = "mean", weights: list[float] | None = None,
                   on_mismatch: str = "error") -> tuple[PredictionTable, dict]:
    paths = expand_inputs(inputs)
    if len(paths) < 2:
        raise EnsembleError(f"give at least two inputs to ensemble (got {len(paths)})")
    if method not in METHODS:
        raise EnsembleError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if weights is not None:
        normalise_weights(weights, len(paths))  # a wrong count is refused before reading anything
    files = [read_predictions(p) for p in paths]
    if weights is None and method in ("weighted", "vote"):
        weights = weights_from_names(paths)
        if weights is None and method == "weighted":
            raise EnsembleError("--method weighted needs --weights (one per input), or inputs named like "
                                "'model_w3.csv'")
    label_only = [f.path for f in files if f.probs is None]
    if method == "mean" and label_only:
        raise EnsembleError(f"--method mean averages probabilities, but {label_only} hold labels only; use "
                            "--method vote (or weighted, a weighted vote) or predict with --save-probs")
    ids = align(files, on_mismatch)
    classes = _class_order(files)
    cidx = {c: i for i, c in enumerate(classes)}
    mats = []
    for f in files:
        row = {ident: i for i, ident in enumerate(f.ids)}
        order = [row[i] for i in ids]
        if f.probs is not None:
            mats.append(f.probs[order])
        else:
            mats.append(np.eye(len(classes), dtype=np.float32)[[cidx[f.labels[j]] for j in order]])
    fused_method = method
    if method == "weighted" and label_only:
        fused_method = "vote"  # a weighted vote, as kaggle_vote.py did
    fused = fuse_probs(mats, fused_method, weights)
    info = {"inputs": paths, "method": method, "fusion": fused_method, "rows": len(ids),
            "weights": normalise_weights(weights, len(files)).round(6).tolist(), "classes": classes,
            "with_probabilities": not label_only}
    return PredictionTable(ids, classes, fused), info
