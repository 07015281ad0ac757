"""The bundle manifest (schema version 1): reading, validating, checksums.

    from export.manifest import read_manifest, verify_checksums
    manifest = read_manifest("bundles/digits")      # refuses unknown schema versions, missing keys
    verify_checksums("bundles/digits", manifest)    # refuses tampered or corrupt artifacts

The structure is defined once, in bundle.schema.json (JSON Schema 2020-12), which this module
validates against first; the code below keeps only what a schema cannot say (paths stay inside the
bundle, class count == output width, files exist and match their sha256). docs/BUNDLE.md documents
every key of the schema (tests/export/test_schema_docs.py keeps them equal). The server and the
tests reuse this reader; the C++ runtime (native/libtorch/src/manifest.cpp) reads the same file.
Every BundleError carries a ``category`` (schema, path, integrity, classes, bundle), the word the
C++ runtime puts in brackets at the start of its messages.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
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
SCHEMA_FILE = Path(__file__).with_name("bundle.schema.json")
# docs/BUNDLE.md "Error categories"; C++ messages start with "[category] "
CATEGORIES = ("schema", "path", "integrity", "classes", "signature", "bundle", "image", "input")


class BundleError(ValueError):
    """A bundle (or something given as one) cannot be used; the message names the file and the fix.

    ``category``: which rule it broke (CATEGORIES), the same word the C++ runtime reports."""

    def __init__(self, message: str, category: str = "bundle"):
        super().__init__(message)
        self.category = category


@functools.lru_cache(maxsize=4)
def schema_validator(schema_file: Path = SCHEMA_FILE):
    """A validator for bundle.schema.json, or another schema file next to it (bundle.signature.schema.json);
    each is loaded once, and jsonschema is imported only here."""
    import jsonschema

    schema = json.loads(schema_file.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def schema_errors(m) -> list:
    """Every bundle.schema.json violation of a parsed manifest (jsonschema ValidationErrors), most relevant first."""
    from jsonschema.exceptions import relevance

    return sorted(schema_validator().iter_errors(m), key=relevance, reverse=True)


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


def plain_name_ok(name) -> bool:
    """An artifact file or data file: a plain file name in the bundle folder (no '/', no '..')."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def manifest_path(bundle: str | os.PathLike) -> Path:
    p = Path(bundle)
    return p if p.name == MANIFEST_NAME and p.is_file() else p / MANIFEST_NAME


def _schema_error(err, where: str) -> BundleError:
    path = err.json_path.replace("$", "manifest", 1)
    if err.validator == "required":
        fix = "the bundle is incomplete or was written by another tool"
    else:
        fix = "the manifest was edited by hand or written by another tool"
    return BundleError(f"{where}: {path}: {err.message} (bundle.schema.json, docs/BUNDLE.md); {fix}: re-export it "
                       "with 'python -m export' (ensembles: 'python -m export ensemble')", "schema")


def validate_manifest(m: dict, where: str = MANIFEST_NAME) -> dict:
    """Check a parsed manifest against bundle.schema.json, then the rules a schema cannot express;
    returns it unchanged or raises BundleError (with its category)."""
    if not isinstance(m, dict):
        raise BundleError(f"{where}: expected a JSON object at the top level", "schema")
    version = m.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{where}: unknown schema_version {version!r}; this reader understands version "
                          f"{SCHEMA_VERSION}; re-export the bundle with this version of 'python -m export' "
                          "(or upgrade the reader)", "schema")
    errors = schema_errors(m)
    if errors:
        raise _schema_error(errors[0], where)
    if m["kind"] == "ensemble":
        for i, mem in enumerate(m["members"]):
            if not member_path_ok(mem["path"]):
                raise BundleError(f"{where}: members[{i}].path must be a relative folder inside the ensemble "
                                  f"bundle (not absolute, no '..', not the bundle itself), got {mem['path']!r}; "
                                  "rebuild it with 'python -m export ensemble'", "path")
            if not math.isfinite(mem["weight"]):
                raise BundleError(f"{where}: members[{i}].weight must be a non-negative number, got "
                                  f"{mem['weight']!r}", "schema")
        return m
    width = m["output"]["shape"][-1]
    if width != len(m["classes"]):
        raise BundleError(f"{where}: output shape {m['output']['shape']} does not match {len(m['classes'])} classes; "
                          "the class list does not belong to this model: re-export the bundle", "classes")
    for key, art in m["artifacts"].items():
        for name in (art["file"], *art.get("data_files", []), *art.get("data_sha256", {})):
            if not plain_name_ok(name):
                raise BundleError(f"{where}: artifacts.{key}: {name!r} must be a plain file name in the bundle "
                                  "folder (no '/', no '..'); re-export the bundle", "path")
    return m


def parse_manifest(raw: bytes, where: str = MANIFEST_NAME) -> dict:
    """manifest.json bytes -> validated manifest (BundleError naming ``where`` otherwise)."""
    try:
        m = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{where}: not valid JSON ({exc}); the file is corrupt, re-export the bundle",
                          "schema") from None
    return validate_manifest(m, where)


def read_manifest_bytes(bundle: str | os.PathLike) -> tuple[dict, bytes]:
    """(validated manifest, the exact bytes it was parsed from): the bytes a signature or an ensemble's
    manifest_sha256 is checked against, so that what is checked is what is used (one read)."""
    path = manifest_path(bundle)
    if not path.is_file():
        raise BundleError(f"'{bundle}' is not a bundle: {path} not found (build one with "
                          "'python -m export --checkpoint RUN/best.pt --out DIR')", "bundle")
    raw = path.read_bytes()
    return parse_manifest(raw, str(path)), raw


def read_manifest(bundle: str | os.PathLike) -> dict:
    """Load and validate BUNDLE/manifest.json (``bundle`` may be the folder or the file itself)."""
    return read_manifest_bytes(bundle)[0]


def write_manifest(folder: str | os.PathLike, manifest: dict) -> Path:
    # through JSON first: the schema sees exactly what readers will (tuples become lists)
    validate_manifest(json.loads(json.dumps(manifest)), f"{folder}/{MANIFEST_NAME} (being written)")
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
            raise BundleError(f"{path}: missing; the bundle is incomplete, copy it again or re-export it",
                              "integrity")
        want = expected.get(name)
        if want is None:
            raise BundleError(f"{folder}/{MANIFEST_NAME}: no sha256 recorded for {name}; re-export the bundle",
                              "integrity")
        got = digest(path)
        if got != want:
            raise BundleError(f"{path}: sha256 {got[:16]}... differs from the manifest's {want[:16]}...; the file "
                              "was modified or corrupted: copy the bundle again or re-export it", "integrity")


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
            sub, sub_manifest = read_member(folder, manifest, mem)
            checked += [f"{mem['name']}/{k}" for k in verify_checksums(sub, sub_manifest)]
        return checked
    for key, art in manifest["artifacts"].items():
        check_artifact(folder, manifest, key)
        checked.append(key)
        if isinstance(art.get("program"), dict):  # a .pt2's ExportedProgram (export recompile): not needed to load
            read_program(folder, art)
            checked.append(f"{key}.program")
    return checked


def read_program(folder: Path, art: dict) -> bytes:
    """The bytes of a .pt2 entry's ExportedProgram (``art["program"]``), read once and checked against
    its sha256: what is checked is what 'python -m export recompile' compiles."""
    prog = art["program"]
    path = folder / Path(str(prog.get("file"))).name
    data = path.read_bytes() if path.is_file() else None
    if data is None or hashlib.sha256(data).hexdigest() != prog.get("sha256"):
        raise BundleError(f"{path}: missing, or its sha256 differs from the manifest's; the file was "
                          "modified or corrupted: copy the bundle again or re-export it", "integrity")
    return data


def read_member(folder: str | os.PathLike, ensemble: dict, member: dict) -> tuple[Path, dict]:
    """(folder, manifest) of one member of a validated ensemble manifest, after checking that its
    manifest.json matches the ensemble's manifest_sha256, that it is a model bundle (no nesting) and
    that its classes are the ensemble's. One rule for the loader, the server and verify_checksums."""
    sub = Path(folder) / member["path"]
    path = manifest_path(sub)
    if not path.is_file():
        raise BundleError(f"{path}: missing; the ensemble is incomplete: copy it again or rebuild it with "
                          "'python -m export ensemble'", "integrity")
    m, raw = read_manifest_bytes(sub)   # one read: the bytes hashed are the bytes parsed
    if hashlib.sha256(raw).hexdigest() != member["manifest_sha256"]:
        raise BundleError(f"{path}: sha256 differs from the ensemble manifest's; the member was modified: "
                          "rebuild the ensemble with 'python -m export ensemble'", "integrity")
    if m["kind"] != "model":
        raise BundleError(f"{path}: an ensemble member is itself an ensemble; nested ensembles are not supported: "
                          "list the inner ensemble's members in the outer one", "schema")
    if m["classes"] != ensemble["classes"]:
        raise BundleError(f"{path}: member '{member['name']}' has different classes from the ensemble; ensemble only "
                          "models trained on the same classes", "classes")
    return sub, m


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
