"""Finding the samples of a dataset on disk, in any of the accepted layouts.

(a) ``ROOT/train/<class>/*`` and ``ROOT/val/<class>/*``
(b) ``ROOT/<class>/*`` together with a validation fraction (stratified, seeded split)
(c) list files ``ROOT/train.txt`` and ``ROOT/val.txt`` (``path label`` per line, space or tab),
    as the seed project's preprocess.py wrote them; optional ``classes.json`` names the labels.

Class order is always deterministic: sorted folder names, or label indices for list files.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .images import IMAGE_EXTENSIONS, is_image_file
from ..errors import UserError


class DataError(UserError):
    """The data on disk does not fit what was asked; the message says what and how to fix it."""


@dataclass
class DatasetSplits:
    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    layout: str
    notes: list[str] = field(default_factory=list)


def _class_dirs(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _images_in(folder: Path) -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f))
    return files


def scan_class_folders(root: Path, what: str) -> tuple[list[str], dict[str, list[str]]]:
    """Return (sorted class names, {class: files}) for a folder of class folders."""
    if not root.is_dir():
        raise DataError(f"{what}: '{root}' is not a directory")
    classes = _class_dirs(root)
    if not classes:
        loose = [f for f in sorted(os.listdir(root)) if is_image_file(f)]
        hint = (f" It holds {len(loose)} loose image files: put them into one sub-folder per class."
                if loose else "")
        raise DataError(f"{what}: '{root}' has no class sub-folders.{hint} Expected "
                        f"'{root}/<class name>/<image files>'.")
    files = {c: _images_in(root / c) for c in classes}
    empty = [c for c in classes if not files[c]]
    if empty:
        raise DataError(
            f"{what}: class folder(s) with no images: {', '.join(repr(str(root / c)) for c in empty)}. "
            f"Add images ({', '.join(IMAGE_EXTENSIONS)}) or remove the empty folder(s).")
    return classes, files


def stratified_split(labels: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, val): every class keeps about val_fraction of its samples in val."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be between 0 and 1 (got {val_fraction})")
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    train_idx: list[int] = []
    val_idx: list[int] = []
    for c in np.unique(labels_arr):
        idx = np.flatnonzero(labels_arr == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        else:
            n_val = 0
        val_idx.extend(idx[:n_val].tolist())
        train_idx.extend(idx[n_val:].tolist())
    return sorted(train_idx), sorted(val_idx)


def read_list_file(path: Path, classes: list[str] | None = None,
                   require_labels: bool = True) -> list[tuple[str, int]]:
    """Parse ``path label`` lines. Relative paths are relative to the list file's folder.

    Labels may be integer indices or, when ``classes`` is known, class names.
    """
    base = path.parent
    samples: list[tuple[str, int]] = []
    missing: list[str] = []
    bad_lines: list[str] = []
    name_to_idx = {c: i for i, c in enumerate(classes)} if classes else {}
    with open(path, encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            if len(parts) < 2:
                if require_labels:
                    bad_lines.append(f"line {lineno}: '{line}' has no label")
                    continue
                file_part, label = line, -1
            else:
                file_part, label_text = parts
                if label_text in name_to_idx:
                    label = name_to_idx[label_text]
                else:
                    try:
                        label = int(label_text)
                    except ValueError:
                        if not require_labels and os.path.exists(base / line):
                            file_part, label = line, -1
                        else:
                            bad_lines.append(f"line {lineno}: label '{label_text}' is neither an integer "
                                             f"nor a class name")
                            continue
                if label < -1 or (require_labels and label < 0):
                    bad_lines.append(f"line {lineno}: negative label {label}")
                    continue
            fpath = file_part if os.path.isabs(file_part) else str(base / file_part)
            if not os.path.isfile(fpath):
                missing.append(f"line {lineno}: {fpath}")
                continue
            samples.append((fpath, label))
    if bad_lines:
        raise DataError(f"{path}: {len(bad_lines)} malformed line(s) (expected 'path label'):\n  "
                        + "\n  ".join(bad_lines[:20]) + ("\n  ..." if len(bad_lines) > 20 else ""))
    if missing:
        raise DataError(f"{path}: {len(missing)} listed file(s) do not exist:\n  "
                        + "\n  ".join(missing[:20]) + ("\n  ..." if len(missing) > 20 else "")
                        + "\nFix the paths (relative paths are read from the list file's folder) "
                          "or regenerate the list with 'python -m trainer prepare'.")
    if not samples:
        raise DataError(f"{path}: no samples listed")
    return samples


def _classes_for_lists(root: Path, labels: list[int]) -> list[str]:
    cj = root / "classes.json"
    if cj.is_file():
        classes = json.loads(cj.read_text(encoding="utf-8"))
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise DataError(f"{cj}: expected a JSON list of class names")
        return classes
    return [str(i) for i in range(max(labels) + 1)]


def _check_classes(classes: list[str], train: list[tuple[str, int]], val: list[tuple[str, int]],
                   where: str) -> list[str]:
    notes = []
    if len(classes) < 2:
        raise DataError(f"{where}: found a single class ({classes[0]!r}); a classifier needs at least two. "
                        "Add a folder per class.")
    for name, samples in (("training", train), ("validation", val)):
        bad = sorted({lbl for _, lbl in samples if lbl >= len(classes)})
        if bad:
            raise DataError(f"{where}: {name} labels {bad} are out of range for {len(classes)} classes; "
                            "fix the labels or add the class names to classes.json")
    seen = {lbl for _, lbl in train}
    unseen = [classes[i] for i in range(len(classes)) if i not in seen]
    if unseen:
        notes.append(f"classes with no training samples: {unseen}")
    return notes


def discover_dataset(data: str | os.PathLike, val_fraction: float | None = None,
                     seed: int = 0) -> DatasetSplits:
    """Find train and validation samples under ``data`` in any accepted layout."""
    root = Path(data)
    if root.is_file() and root.suffix == ".txt":
        train_list, val_list, root = root, root.parent / "val.txt", root.parent
    else:
        train_list, val_list = root / "train.txt", root / "val.txt"
    if not root.exists():
        raise DataError(f"data path '{root}' does not exist. Create a dataset there, or run "
                        f"'python -m trainer demo-data --out {root}' for the digits demo.")
    if not root.is_dir():
        raise DataError(f"data path '{root}' is not a directory or a .txt list file")

    if (root / "train").is_dir():
        train_root, val_root = root / "train", root / "val"
        classes, train_files = scan_class_folders(train_root, "training data")
        if not val_root.is_dir():
            if val_fraction:
                return _split_folders(classes, train_files, val_fraction, seed, "folders+fraction")
            raise DataError(f"'{root}' has train/ but no val/. Add a val/ folder with one folder per "
                            "class, or pass --val-fraction 0.2 to split train/.")
        val_classes, val_files = scan_class_folders(val_root, "validation data")
        extra = [c for c in val_classes if c not in classes]
        if extra:
            raise DataError(f"validation class(es) {extra} in '{val_root}' have no folder in '{train_root}'. "
                            "Every validation class needs training images: add them or remove the folder.")
        idx = {c: i for i, c in enumerate(classes)}
        train = [(f, idx[c]) for c in classes for f in train_files[c]]
        val = [(f, idx[c]) for c in val_classes for f in val_files[c]]
        notes = _check_classes(classes, train, val, str(root))
        missing_val = [c for c in classes if c not in val_classes]
        if missing_val:
            notes.append(f"classes with no validation images: {missing_val}")
        return DatasetSplits(classes, train, val, "train/val folders", notes)

    if train_list.is_file():
        probe = read_list_file(train_list, require_labels=True)
        classes = _classes_for_lists(root, [lbl for _, lbl in probe])
        train = read_list_file(train_list, classes)
        if val_list.is_file():
            val = read_list_file(val_list, classes, require_labels=False)
            if any(lbl < 0 for _, lbl in val):
                if not val_fraction:
                    raise DataError(f"{val_list} has lines without labels (a test list). Label every line "
                                    "for validation, or pass --val-fraction 0.2 to split train.txt.")
                val = []
            if val:
                notes = _check_classes(classes, train, val, str(root))
                return DatasetSplits(classes, train, val, "list files", notes)
        if not val_fraction:
            raise DataError(f"'{root}' has train.txt but no usable val.txt; add one or pass --val-fraction 0.2.")
        tr, va = stratified_split([lbl for _, lbl in train], val_fraction, seed)
        train, val = [train[i] for i in tr], [train[i] for i in va]
        notes = _check_classes(classes, train, val, str(root))
        return DatasetSplits(classes, train, val, "list file+fraction", notes)

    classes, files = scan_class_folders(root, "data")
    if not val_fraction:
        raise DataError(f"'{root}' is a folder of class folders without train/ and val/: pass "
                        "--val-fraction 0.2 (stratified, seeded split), or arrange it as "
                        f"'{root}/train/<class>' and '{root}/val/<class>'.")
    return _split_folders(classes, files, val_fraction, seed, "class folders+fraction")


def _split_folders(classes: list[str], files: dict[str, list[str]], val_fraction: float, seed: int,
                   layout: str) -> DatasetSplits:
    samples = [(f, i) for i, c in enumerate(classes) for f in files[c]]
    tr, va = stratified_split([lbl for _, lbl in samples], val_fraction, seed)
    train, val = [samples[i] for i in tr], [samples[i] for i in va]
    notes = _check_classes(classes, train, val, layout)
    return DatasetSplits(classes, train, val, layout, notes)


def load_eval_samples(data: str | os.PathLike, classes: list[str], val_fraction: float | None = None,
                      seed: int = 0) -> list[tuple[str, int]]:
    """Labelled samples to evaluate a trained model on, mapped onto the model's class order.

    ``data`` may be a dataset root (its validation split is used), a folder of class folders, or a
    list file.
    """
    root = Path(data)
    idx = {c: i for i, c in enumerate(classes)}
    if root.is_file():
        return read_list_file(root, classes)
    if (root / "train").is_dir() or (root / "train.txt").is_file():
        splits = discover_dataset(root, val_fraction, seed)
        unknown = [c for c in splits.classes if c not in idx]
        if unknown:
            raise DataError(f"'{root}' has classes {unknown} that the checkpoint does not know")
        return [(f, idx[splits.classes[lbl]]) for f, lbl in splits.val]
    folder_classes, files = scan_class_folders(root, "evaluation data")
    unknown = [c for c in folder_classes if c not in idx]
    if unknown:
        raise DataError(f"evaluation classes {unknown} in '{root}' are not among the checkpoint's "
                        f"classes {classes}")
    return [(f, idx[c]) for c in folder_classes for f in files[c]]
