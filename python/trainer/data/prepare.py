"""Convert a class-folder tree into list files, as the seed project's preprocess.py did.

    python -m trainer prepare data/raw --out data/lists --val-fraction 0.2
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .layout import DataError, scan_class_folders, stratified_split


def prepare_lists(src: str | os.PathLike, out: str | os.PathLike, val_fraction: float = 0.2,
                  seed: int = 0) -> dict:
    """Write ``out/train.txt``, ``out/val.txt`` (absolute ``path<TAB>label``) and ``out/classes.json``."""
    src = Path(src).resolve()
    if (src / "train").is_dir() and not any((src / "train").glob("*.*")):
        roots = [src / "train"] + ([src / "val"] if (src / "val").is_dir() else [])
    else:
        roots = [src]
    classes, files = scan_class_folders(roots[0], "prepare source")
    if len(classes) < 2:
        raise DataError(f"'{roots[0]}' has a single class folder; a classifier needs at least two")
    idx = {c: i for i, c in enumerate(classes)}
    samples = [(f, idx[c]) for c in classes for f in files[c]]
    if len(roots) == 2:
        val_classes, val_files = scan_class_folders(roots[1], "prepare source (val)")
        extra = [c for c in val_classes if c not in idx]
        if extra:
            raise DataError(f"val class(es) {extra} have no training folder")
        train = samples
        val = [(f, idx[c]) for c in val_classes for f in val_files[c]]
    else:
        tr, va = stratified_split([lbl for _, lbl in samples], val_fraction, seed)
        train, val = [samples[i] for i in tr], [samples[i] for i in va]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.txt", train), ("val.txt", val)):
        tmp = out / (name + ".tmp")
        tmp.write_text("".join(f"{os.path.abspath(p)}\t{lbl}\n" for p, lbl in rows), encoding="utf-8")
        os.replace(tmp, out / name)
    (out / "classes.json").write_text(json.dumps(classes, indent=1), encoding="utf-8")
    return {"classes": classes, "train": len(train), "val": len(val), "out": str(out)}
