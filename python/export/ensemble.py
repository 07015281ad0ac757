"""Ensemble bundles: several model bundles with one fusion rule, served as one.

    python -m export ensemble --members bundles/a bundles/b --weights 2 1 --fusion weighted --out bundles/ab

Each member bundle is checked (manifest, sha256 of every artifact) and copied under
``members/<name>/``; the members must have identical classes in the same order.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from trainer.tta import MERGES, parse_policy

from .build import staged_bundle
from .manifest import (FUSIONS, SCHEMA_VERSION, BundleError, file_sha256, manifest_path, read_manifest, utc_now,
                       utc_version, verify_checksums, write_manifest)


def build_ensemble(members: list[str], out: str, weights: list[float] | None = None, fusion: str = "mean",
                   name: str | None = None, tta: str = "none", tta_merge: str = "mean", force: bool = False,
                   say=print) -> tuple[Path, dict]:
    if fusion not in FUSIONS:
        raise BundleError(f"unknown fusion {fusion!r}; use one of {', '.join(FUSIONS)}")
    if tta_merge not in MERGES:
        raise BundleError(f"unknown TTA merge {tta_merge!r}; use one of {MERGES}")
    if len(members) < 2:
        raise BundleError("an ensemble needs at least two --members")
    weights = list(weights) if weights else [1.0] * len(members)
    if len(weights) != len(members):
        raise BundleError(f"--weights has {len(weights)} values for {len(members)} members; give one per member")
    if any(not w > 0 for w in weights):
        raise BundleError(f"--weights must all be positive, got {weights}")
    out_path = Path(out).resolve()
    if out_path.exists() and not (force and manifest_path(out_path).is_file()):
        raise BundleError(f"'{out}' already exists; choose another --out or pass --force to replace a bundle")
    manifests = []
    for m in members:
        man = read_manifest(m)
        if man["kind"] != "model":
            raise BundleError(f"{m}: is an ensemble; members must be model bundles (list its members instead)")
        verify_checksums(m, man)
        manifests.append(man)
    classes = manifests[0]["classes"]
    for m, man in zip(members[1:], manifests[1:]):
        if man["classes"] != classes:
            raise BundleError(f"{m}: classes {man['classes']} differ from {members[0]}'s {classes}; ensemble members "
                              "must be trained on the same classes in the same order")
    names: list[str] = []
    for man in manifests:
        base = man["name"]
        n, i = base, 2
        while n in names:
            n, i = f"{base}-{i}", i + 1
        names.append(n)
    views = parse_policy(tta)
    with staged_bundle(out_path) as tmp:
        entries = []
        for src, n, w in zip(members, names, weights):
            dst = tmp / "members" / n
            shutil.copytree(manifest_path(src).parent, dst)
            entries.append({"name": n, "path": f"members/{n}", "weight": float(w),
                            "manifest_sha256": file_sha256(dst / "manifest.json")})
        manifest = {"schema_version": SCHEMA_VERSION, "kind": "ensemble",
                    "name": name or "+".join(names), "version": utc_version(), "classes": classes,
                    "fusion": fusion, "members": entries,
                    "tta": {"default": tta, "merge": tta_merge, "views": [v.to_dict() for v in views]},
                    "provenance": {"created": utc_now(), "sources": [str(Path(m).resolve()) for m in members]}}
        write_manifest(tmp, manifest)
    say(f"ensemble bundle: {out_path} ({len(members)} members, fusion {fusion})")
    return out_path, manifest
