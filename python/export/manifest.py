"""The bundle manifest (schema version 1): reading, validating, checksums.

    from export.manifest import read_manifest, verify_checksums
    manifest = read_manifest("bundles/digits")      # refuses unknown schema versions, missing keys
    verify_checksums("bundles/digits", manifest)    # refuses tampered or corrupt artifacts

docs/BUNDLE.md is the human version of this module; change both together. The server and the
tests reuse this reader; the C++ runtime reads the same file.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from trainer.engine.checkpoint import file_sha256  # noqa: F401 - one implementation, re-exported for readers

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
INPUT_NAME, OUTPUT_NAME = "images", "probs"

# artifact key -> (file name, format)
ARTIFACT_FILES = {
    "torchscript": ("model.ts", "torchscript"),
    "onnx": ("model.onnx", "onnx"),
    "pt2": ("model.pt2", "aotinductor"),
    "onnx_int8": ("model.int8.onnx", "onnx"),
}
DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "fp16", "bf16")


def artifact_key(family: str, device: str = "cpu", precision: str = "fp32") -> str:
    """Manifest key of a TorchScript or .pt2 artifact: 'pt2' (CPU), 'pt2_cuda', 'pt2_cuda_fp16', ..."""
    if device == "cpu":
        return family
    return f"{family}_{device}" + ("" if precision == "fp32" else f"_{precision}")


# CUDA artifacts (python -m export --device cuda [--precision ...]): model.cuda.pt2, model.cuda.fp16.ts, ...
for _family in ("torchscript", "pt2"):
    _file, _format = ARTIFACT_FILES[_family]
    for _prec in PRECISIONS:
        _stem, _ext = _file.rsplit(".", 1)
        _infix = "cuda" if _prec == "fp32" else f"cuda.{_prec}"
        ARTIFACT_FILES[artifact_key(_family, "cuda", _prec)] = (f"{_stem}.{_infix}.{_ext}", _format)


def artifact_device(art: dict) -> str:
    """Where an artifact runs: its "device" field; bundles from before CUDA artifacts are all CPU."""
    return art.get("device", "cpu")


def artifact_precision(art: dict) -> str:
    return art.get("precision", "fp32")
FUSIONS = ("mean", "weighted", "vote")
MODEL_KEYS = ("schema_version", "kind", "name", "version", "architecture", "classes", "preprocessing", "input",
              "output", "max_batch", "tta", "artifacts", "provenance")
ENSEMBLE_KEYS = ("schema_version", "kind", "name", "version", "classes", "fusion", "members", "tta", "provenance")
PREPROCESSING_KEYS = ("crop_size", "resize_size", "resize_policy", "crop", "interpolation", "mean", "std",
                      "channel_order", "input_dtype", "layout")
ARTIFACT_KEYS = ("file", "format", "sha256", "bytes")


class BundleError(ValueError):
    """A bundle (or something given as one) cannot be used; the message names the file and the fix."""


def utc_version() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def member_path_ok(path) -> bool:
    """An ensemble member's folder: a relative path inside the ensemble bundle. An absolute path or
    one with '..' would read outside it, and '.' or '' is the ensemble itself (endless recursion)."""
    if not isinstance(path, str) or "\\" in path:
        return False
    p = PurePosixPath(path)
    parts = [x for x in p.parts if x != "."]
    return not p.is_absolute() and bool(parts) and ".." not in parts


def manifest_path(bundle: str | os.PathLike) -> Path:
    p = Path(bundle)
    return p if p.name == MANIFEST_NAME and p.is_file() else p / MANIFEST_NAME


def _require(d: dict, keys, where: str) -> None:
    if not isinstance(d, dict):
        raise BundleError(f"{where}: expected a JSON object, got {type(d).__name__}; the manifest was edited by "
                          "hand or written by another tool: re-export it with 'python -m export'")
    missing = [k for k in keys if k not in d]
    if missing:
        raise BundleError(f"{where}: missing required key(s) {missing}; the bundle is incomplete or was written "
                          "by another tool; re-export it with 'python -m export'")


def validate_manifest(m: dict, where: str = MANIFEST_NAME) -> dict:
    """Check the structure of a parsed manifest; returns it unchanged or raises BundleError."""
    if not isinstance(m, dict):
        raise BundleError(f"{where}: expected a JSON object at the top level")
    version = m.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{where}: unknown schema_version {version!r}; this reader understands version "
                          f"{SCHEMA_VERSION}; re-export the bundle with this version of 'python -m export' "
                          "(or upgrade the reader)")
    kind = m.get("kind")
    if kind not in ("model", "ensemble"):
        raise BundleError(f"{where}: kind must be 'model' or 'ensemble', got {kind!r}")
    _require(m, MODEL_KEYS if kind == "model" else ENSEMBLE_KEYS, where)
    classes = m["classes"]
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise BundleError(f"{where}: 'classes' must be a list of at least two class names")
    if len(set(classes)) != len(classes):
        raise BundleError(f"{where}: 'classes' has duplicates")
    tta = m["tta"]
    if not isinstance(tta, dict) or not isinstance(tta.get("views"), list) or not tta["views"]:
        raise BundleError(f"{where}: 'tta' must hold a non-empty list of 'views'")
    if kind == "ensemble":
        if m["fusion"] not in FUSIONS:
            raise BundleError(f"{where}: unknown fusion {m['fusion']!r}; use one of {FUSIONS}")
        if not isinstance(m["members"], list) or not m["members"]:
            raise BundleError(f"{where}: an ensemble needs a non-empty list of members")
        for i, mem in enumerate(m["members"]):
            _require(mem, ("name", "path", "weight"), f"{where}: members[{i}]")
            if not member_path_ok(mem["path"]):
                raise BundleError(f"{where}: members[{i}].path must be a relative folder inside the ensemble "
                                  f"bundle (not absolute, no '..', not the bundle itself), got {mem['path']!r}; "
                                  "rebuild it with 'python -m export ensemble'")
            weight = mem["weight"]
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
                raise BundleError(f"{where}: members[{i}].weight must be a non-negative number, got {weight!r}")
        return m
    _require(m["preprocessing"], PREPROCESSING_KEYS, f"{where}: preprocessing")
    _require(m["output"], (), f"{where}: output")
    if not isinstance(m["artifacts"], dict):
        raise BundleError(f"{where}: 'artifacts' must be an object of artifact entries by key")
    if not isinstance(m["max_batch"], int) or m["max_batch"] < 1:
        raise BundleError(f"{where}: max_batch must be a positive integer")
    if m["output"].get("shape", [None, None])[-1] != len(classes):
        raise BundleError(f"{where}: output shape {m['output'].get('shape')} does not match {len(classes)} classes")
    if not m["artifacts"]:
        raise BundleError(f"{where}: no artifacts listed")
    for key, art in m["artifacts"].items():
        _require(art, ARTIFACT_KEYS, f"{where}: artifacts.{key}")
        if Path(art["file"]).name != art["file"]:
            raise BundleError(f"{where}: artifacts.{key}.file must be a plain file name, got {art['file']!r}")
        if artifact_device(art) not in DEVICES:
            raise BundleError(f"{where}: artifacts.{key}.device must be one of {DEVICES}, got {art['device']!r}")
        if artifact_precision(art) not in PRECISIONS:
            raise BundleError(f"{where}: artifacts.{key}.precision must be one of {PRECISIONS}, "
                              f"got {art['precision']!r}")
    return m


def parse_manifest(raw: bytes, where: str = MANIFEST_NAME) -> dict:
    """manifest.json bytes -> validated manifest (BundleError naming ``where`` otherwise)."""
    try:
        m = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{where}: not valid JSON ({exc}); the file is corrupt, re-export the bundle") from None
    return validate_manifest(m, where)


def read_manifest_bytes(bundle: str | os.PathLike) -> tuple[dict, bytes]:
    """(validated manifest, the exact bytes it was parsed from): the bytes a signature or an ensemble's
    manifest_sha256 is checked against, so that what is checked is what is used (one read)."""
    path = manifest_path(bundle)
    if not path.is_file():
        raise BundleError(f"'{bundle}' is not a bundle: {path} not found (build one with "
                          "'python -m export --checkpoint RUN/best.pt --out DIR')")
    raw = path.read_bytes()
    return parse_manifest(raw, str(path)), raw


def read_manifest(bundle: str | os.PathLike) -> dict:
    """Load and validate BUNDLE/manifest.json (``bundle`` may be the folder or the file itself)."""
    return read_manifest_bytes(bundle)[0]


def write_manifest(folder: str | os.PathLike, manifest: dict) -> Path:
    validate_manifest(manifest, f"{folder}/{MANIFEST_NAME} (being written)")
    path = Path(folder) / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path


def artifact_files(manifest: dict, key: str) -> list[str]:
    art = manifest["artifacts"][key]
    return [art["file"], *art.get("data_files", [])]


@dataclass(frozen=True)
class VerifiedArtifact:
    """An artifact's files, read once and checked against the manifest's sha256: runtimes load from
    these bytes, never from the path again (a file swapped after the check is never run)."""
    folder: Path
    key: str
    entry: dict                # the manifest's artifacts[key]
    files: dict                # file name -> bytes (the model file and its data files)

    @property
    def model_bytes(self) -> bytes:
        return self.files[self.entry["file"]]

    @property
    def path(self) -> Path:   # for messages only
        return self.folder / self.entry["file"]


def _artifact_entry(folder: Path, manifest: dict, key: str) -> dict:
    if key not in manifest.get("artifacts", {}):
        have = ", ".join(manifest.get("artifacts", {})) or "none"
        raise BundleError(f"{folder}: the bundle has no '{key}' artifact (it has: {have}); re-export with "
                          f"--format {key if key in ARTIFACT_FILES else 'all'} or pick another backend")
    return manifest["artifacts"][key]


def _check_files(folder: Path, manifest: dict, key: str, digest) -> None:
    """digest(path) -> sha256 hex of what will be used; refuses missing, unlisted or changed files."""
    art = _artifact_entry(folder, manifest, key)
    expected = {art["file"]: art["sha256"], **art.get("data_sha256", {})}
    for name in artifact_files(manifest, key):
        path = folder / name
        if not path.is_file():
            raise BundleError(f"{path}: missing; the bundle is incomplete, copy it again or re-export it")
        want = expected.get(name)
        if want is None:
            raise BundleError(f"{folder}/{MANIFEST_NAME}: no sha256 recorded for {name}")
        got = digest(path)
        if got != want:
            raise BundleError(f"{path}: sha256 {got[:16]}... differs from the manifest's {want[:16]}...; the file "
                              "was modified or corrupted: copy the bundle again or re-export it")


def read_artifact(bundle: str | os.PathLike, manifest: dict, key: str) -> VerifiedArtifact:
    """Read artifact ``key`` (and its data files) once, check the sha256 of those bytes, return them."""
    folder = manifest_path(bundle).parent
    files: dict[str, bytes] = {}

    def digest(path: Path) -> str:
        files[path.name] = path.read_bytes()
        return hashlib.sha256(files[path.name]).hexdigest()

    _check_files(folder, manifest, key, digest)
    return VerifiedArtifact(folder, key, manifest["artifacts"][key], files)


def check_artifact(bundle: str | os.PathLike, manifest: dict, key: str) -> Path:
    """Path of artifact ``key`` after checking it exists and its sha256 (and its data files') match.
    Only for checks (``export verify``): to load an artifact use read_artifact, which returns the checked bytes."""
    folder = manifest_path(bundle).parent
    _check_files(folder, manifest, key, file_sha256)
    return folder / manifest["artifacts"][key]["file"]


def verify_checksums(bundle: str | os.PathLike, manifest: dict | None = None) -> list[str]:
    """Check every artifact (and, for ensembles, every member) and return the keys checked."""
    manifest = manifest or read_manifest(bundle)
    folder = manifest_path(bundle).parent
    checked = []
    if manifest["kind"] == "ensemble":
        for mem in manifest["members"]:
            sub = folder / mem["path"]
            want = mem.get("manifest_sha256")
            if want and file_sha256(manifest_path(sub)) != want:
                raise BundleError(f"{manifest_path(sub)}: sha256 differs from the ensemble manifest's; the member "
                                  "was modified: rebuild the ensemble with 'python -m export ensemble'")
            checked += [f"{mem['name']}/{k}" for k in verify_checksums(sub)]
        return checked
    for key, art in manifest["artifacts"].items():
        check_artifact(folder, manifest, key)
        checked.append(key)
        prog = art.get("program")  # a .pt2's ExportedProgram (python -m export recompile): not needed to load
        if isinstance(prog, dict):
            path = folder / Path(str(prog.get("file"))).name
            if not path.is_file() or file_sha256(path) != prog.get("sha256"):
                raise BundleError(f"{path}: missing, or its sha256 differs from the manifest's; the file was "
                                  "modified or corrupted: copy the bundle again or re-export it")
            checked.append(f"{key}.program")
    return checked


def preprocess_spec(manifest: dict):
    """The manifest's preprocessing as a trainer.data.PreprocessSpec (the reference implementation)."""
    from trainer.data import PreprocessSpec

    d = {k: v for k, v in manifest["preprocessing"].items() if k != "normalize_in_graph"}
    return PreprocessSpec.from_dict(d)


def preprocessing_dict(spec) -> dict:
    d = spec.to_dict()
    if not d.get("extra"):
        d.pop("extra", None)
    d["normalize_in_graph"] = True
    return d
