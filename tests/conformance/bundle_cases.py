"""The conformance set: good and bad bundles made from the tiny real bundles of tests/conftest.py.

    cases = write_bundle_cases(bundle_a, bundle_b, tmp_dir, keys)   # {name: BundleCase}

Each case is a copy of a base bundle (manifest.json copied, artifact files symlinked: cheap) with one
defect; ``category`` is what every reader must report (docs/BUNDLE.md "Error categories"), None for
a bundle every reader must accept and run. Add a case by appending to MODEL_CASES / ENSEMBLE_CASES
(TorchScript), PT2_CASES (the .pt2 artifact) or SIGNATURE_CASES (read with trusted keys).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from export.ensemble import build_ensemble
from export.manifest import file_sha256


@dataclass
class BundleCase:
    name: str
    path: Path
    category: str | None  # None: accepted
    format: str = "torchscript"  # the artifact every reader runs
    trusted_keys: tuple[Path, ...] = ()  # public keys every reader is given
    require_signature: bool = False


def clone(src: Path, dst: Path) -> Path:
    """dst: a copy of bundle src whose manifests are real files and whose other files are symlinks."""
    dst.mkdir(parents=True)
    for p in sorted(src.rglob("*")):
        t = dst / p.relative_to(src)
        if p.is_dir():
            t.mkdir(parents=True, exist_ok=True)
        elif p.name == "manifest.json":
            shutil.copyfile(p, t)
        else:
            t.symlink_to(p.resolve())
    return dst


def edit(bundle: Path, change: Callable[[dict], None], rel: str = "") -> None:
    path = bundle / rel / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m, indent=1))


def pin_members(ensemble: Path) -> None:
    """Rewrite every member's manifest_sha256 (after a deliberate, consistent member edit)."""
    def change(m):
        for mem in m["members"]:
            mem["manifest_sha256"] = file_sha256(ensemble / mem["path"] / "manifest.json")
    edit(ensemble, change)


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def change(m):
        d = m
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return change


def _member(key, value, index=0):
    return lambda m: m["members"][index].__setitem__(key, value)


def _del(*keys):
    def change(m):
        d = m
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]
    return change


def on_folder(change: Callable[[Path], None]) -> Callable[[Path], None]:
    """Mark a change that takes the bundle folder (the others take the parsed manifest)."""
    change.on_folder = True
    return change


def _tamper(target: Path) -> None:
    """Flip one byte in the middle of a (symlinked) file, writing a private copy."""
    data = bytearray(target.resolve().read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.unlink()
    target.write_bytes(bytes(data))


@on_folder
def _tamper_artifact(b: Path) -> None:
    _tamper(b / "model.ts")


@on_folder
def _nest(b: Path) -> None:
    inner = b.parent / (b.name + "-inner")
    clone(b, inner)
    shutil.move(inner, b / "members" / "nested")
    edit(b, _member("path", "members/nested"))
    pin_members(b)


@on_folder
def _self_link(b: Path) -> None:
    (b / "members" / "self").symlink_to("..")  # the member is the ensemble itself; its sha cannot match
    edit(b, _member("path", "members/self"))


@on_folder
def _member_classes(b: Path) -> None:
    member = json.loads((b / "manifest.json").read_text())["members"][0]["path"]
    edit(b, _set("classes", ["0", "1", "9"]), member)
    pin_members(b)


# (name, change to the manifest dict or to the bundle folder, category)
MODEL_CASES: list[tuple[str, Callable | None, str | None]] = [
    ("model", None, None),
    ("model_merge_max_five_crop", lambda m: m["tta"].update(
        merge="max", default="five-crop", views=[{"resize": None, "crop": c, "flip": "none"} for c in
                                                 ("center", "top_left", "top_right", "bottom_left", "bottom_right")]),
     None),
    ("schema_version_2", _set("schema_version", 2), "schema"),
    ("kind_unknown", _set("kind", "pipeline"), "schema"),
    ("not_json", on_folder(lambda b: (b / "manifest.json").write_text('{"schema_version": 1,')), "schema"),
    ("missing_name", _del("name"), "schema"),
    ("classes_a_string", _set("classes", "0,1,7"), "schema"),
    ("classes_duplicated", _set("classes", ["0", "0", "7"]), "schema"),
    ("classes_shorter_than_output", _set("classes", ["0", "1"]), "classes"),
    ("classes_longer_than_output", _set("classes", ["0", "1", "7", "9"]), "classes"),
    # the manifest agrees with itself, only the model disagrees: caught by the warm-up call at load
    # (the binding once copied the model's wider output into a buffer sized by the class list)
    ("classes_and_output_shape_both_shorter",
     lambda m: (m.update(classes=["0", "1"]), m["output"].update(shape=[-1, 2])), "classes"),
    ("max_batch_a_string", _set("max_batch", "8"), "schema"),
    ("preprocessing_a_list", _set("preprocessing", [32]), "schema"),
    ("crop_size_one_number", _set("preprocessing", "crop_size", [32]), "schema"),
    ("tta_views_an_object", _set("tta", "views", {}), "schema"),
    ("tta_merge_unknown", _set("tta", "merge", "median"), "schema"),
    ("artifacts_a_list", _set("artifacts", ["model.ts"]), "schema"),
    ("sha256_not_hex", _set("artifacts", "torchscript", "sha256", "not-a-sha"), "schema"),
    ("artifact_file_dotdot", _set("artifacts", "torchscript", "file", "../model.ts"), "path"),
    ("artifact_file_absolute", _set("artifacts", "torchscript", "file", "/etc/hostname"), "path"),
    ("data_files_escape", _set("artifacts", "torchscript", "data_files", ["../secret.data"]), "path"),
    ("data_files_subfolder", _set("artifacts", "torchscript", "data_files", ["sub/x.data"]), "path"),
    ("unknown_top_level_key", _set("labels", ["0", "1", "7"]), "schema"),
    ("unknown_preprocessing_key", _set("preprocessing", "gamma", 2.2), "schema"),
    ("unknown_view_key", lambda m: m["tta"]["views"][0].update(rotate=90), "schema"),
    ("missing_tta_merge", _del("tta", "merge"), "schema"),
    ("missing_provenance", _del("provenance"), "schema"),
    ("output_shape_a_string", _set("output", "shape", "[-1, 3]"), "schema"),
    ("tampered_artifact", _tamper_artifact, "integrity"),
    ("missing_artifact", on_folder(lambda b: (b / "model.ts").unlink()), "integrity"),
]

# read with format "pt2" by every reader (bundle_a as exported: TorchScript and .pt2 with its static
# batch-1 model, TTA hflip by default)
PT2_CASES: list[tuple[str, Callable | None, str | None]] = [
    ("model_pt2", None, None),
    ("tampered_pt2", on_folder(lambda b: _tamper(b / "model.pt2")), "integrity"),
    ("pt2_sha256_of_the_torchscript", lambda m: m["artifacts"]["pt2"].update(
        sha256=m["artifacts"]["torchscript"]["sha256"]), "integrity"),
]

ENSEMBLE_CASES: list[tuple[str, Callable | None, str | None]] = [
    ("ensemble_weighted_merge_max", None, None),
    ("ensemble_vote", lambda m: m.update(fusion="vote"), None),
    ("member_path_dot", _member("path", "."), "path"),
    ("member_path_empty", _member("path", ""), "path"),
    ("member_path_dotdot", _member("path", "../model"), "path"),
    ("member_path_absolute", _member("path", "/tmp"), "path"),
    ("member_self_reference", _self_link, "integrity"),
    ("member_folder_missing", _member("path", "members/ghost"), "integrity"),
    ("nested_ensemble", _nest, "schema"),
    ("missing_manifest_sha256", lambda m: m["members"][0].pop("manifest_sha256"), "schema"),
    ("manifest_sha256_a_number", _member("manifest_sha256", 5), "schema"),
    ("tampered_member_manifest", on_folder(lambda b: edit(b, _set("max_batch", 4), "members/a")), "integrity"),
    ("member_classes_differ", _member_classes, "classes"),
    ("weight_a_string", _member("weight", "heavy"), "schema"),
    ("weight_negative", _member("weight", -1), "schema"),
    ("fusion_unknown", _set("fusion", "median"), "schema"),
    ("members_empty", _set("members", []), "schema"),
    ("member_path_a_number", _member("path", 7), "schema"),
    ("unknown_member_key", _member("url", "http://example.invalid/a"), "schema"),
]


# (name, base "model" or "ensemble", signed by "ours" / None, change after signing, reader's trusted key
# "ours" / "theirs", require_signature, category); the readers run TorchScript
SIGNATURE_CASES: list[tuple[str, str, str | None, Callable | None, str, bool, str | None]] = [
    ("signed_trusted_required", "model", "ours", None, "ours", True, None),
    ("signed_trusted_not_required", "model", "ours", None, "ours", False, None),
    ("signed_ensemble_trusted_required", "ensemble", "ours", None, "ours", True, None),
    ("signed_by_an_untrusted_key", "model", "ours", None, "theirs", True, "signature"),
    ("signed_by_an_untrusted_key_not_required", "model", "ours", None, "theirs", False, "signature"),
    ("unsigned_with_require_signature", "model", None, None, "ours", True, "signature"),
    ("manifest_edited_after_signing", "model", "ours", _set("max_batch", 4), "ours", True, "signature"),
    ("signature_file_not_json", "model", "ours", on_folder(lambda b: (b / "signature.json").write_text("{")), "ours",
     True, "signature"),
    ("member_manifest_edited_after_signing", "ensemble", "ours",
     on_folder(lambda b: edit(b, _set("max_batch", 4), "members/a")), "ours", True, "integrity"),
]


def _apply(path: Path, change) -> None:
    if change is None:
        return
    if getattr(change, "on_folder", False):
        change(path)
    else:
        edit(path, change)


def write_bundle_cases(bundle_a: Path, bundle_b: Path, root: Path, keys: tuple[Path, Path, Path]
                       ) -> dict[str, BundleCase]:
    """Every case under root/<name>: model cases from bundle_a (TorchScript only), ensemble cases from
    a weighted (3:1) ensemble of bundle_a and bundle_b with TTA hflip merged by max (the members' own
    merge is mean: the ensemble's must win in every reader), .pt2 cases from bundle_a as exported,
    signature cases from either base signed with ``keys`` (private, its public, another public key)."""
    from export.signing import sign_bundle

    base = clone(bundle_a, root / "_base" / "model")
    for extra in ("model.pt2",):
        if (base / extra).exists():
            (base / extra).unlink()
    edit(base, lambda m: m.update(artifacts={"torchscript": m["artifacts"]["torchscript"]}))
    members = [base, clone(bundle_b, root / "_base" / "b")]
    ens, _ = build_ensemble([str(p) for p in members], str(root / "_base" / "ensemble"), [3.0, 1.0], "weighted",
                            name="conformance", tta="hflip", tta_merge="max", say=lambda *a, **k: None)
    def rename(m):  # members/a (from bundle_a) and members/b, whatever the bundles are called
        for mem, short in zip(m["members"], "ab"):
            os.rename(ens / mem["path"], ens / "members" / short)
            mem.update(name=short, path=f"members/{short}")
    edit(ens, rename)
    cases = {}
    for cases_of, src in ((MODEL_CASES, base), (ENSEMBLE_CASES, Path(ens))):
        for name, change, category in cases_of:
            path = clone(src, root / name)
            _apply(path, change)
            cases[name] = BundleCase(name, path, category)
    for name, change, category in PT2_CASES:
        path = clone(bundle_a, root / name)
        _apply(path, change)
        cases[name] = BundleCase(name, path, category, format="pt2")
    public = {"ours": keys[1], "theirs": keys[2]}
    for name, base_name, signer, change, trusted, require, category in SIGNATURE_CASES:
        path = clone(base if base_name == "model" else Path(ens), root / name)
        if signer is not None:
            sign_bundle(path, keys[0])
        _apply(path, change)
        cases[name] = BundleCase(name, path, category, trusted_keys=(public[trusted],), require_signature=require)
    return cases
