"""The bundle's identity inside its ONNX files, where ONNX tools look: ``metadata_props``.

    embed_onnx_metadata("model.onnx", manifest)   # at export, before the file is hashed
    read_onnx_metadata("model.onnx")              # {"name": ..., "classes": [...], "preprocessing": {...}, ...}
    metadata_mismatches("model.onnx", manifest)   # [] or the keys that differ (python -m export verify)
    onnxruntime.InferenceSession("model.onnx").get_modelmeta().custom_metadata_map   # the same, as strings

A model.onnx copied out of its bundle (into a Triton repository, a notebook, Netron) still says which
classes its outputs are, how its input must be prepared and which bundle it came from. Values are
strings (the ONNX type); lists and objects are JSON. The manifest stays the contract: these entries
are written from it and equal it. Weights in external data (``model.onnx.data``) are not rewritten.
"""
from __future__ import annotations

import json
import os

# metadata_props key -> how its value comes out of the manifest
ONNX_METADATA_KEYS = ("name", "version", "architecture", "classes", "preprocessing", "bundle_schema_version")


def onnx_metadata(manifest: dict) -> dict[str, str]:
    """The ``metadata_props`` entries of a model bundle's manifest, all strings."""
    return {"name": manifest["name"], "version": manifest["version"], "architecture": manifest["architecture"],
            "classes": json.dumps(manifest["classes"]),
            "preprocessing": json.dumps(manifest["preprocessing"], sort_keys=True),
            "bundle_schema_version": str(manifest["schema_version"])}


def describe_model(manifest: dict) -> str:
    """ONNX ``doc_string``: one line for a person opening the file in Netron or onnxruntime."""
    h, w = manifest["preprocessing"]["crop_size"]
    return (f"shipclassifier bundle '{manifest['name']}' version {manifest['version']}: {manifest['architecture']}, "
            f"{len(manifest['classes'])} classes. Input '{manifest['input']['name']}' uint8 RGB (N, 3, {h}, {w}), "
            f"resized and cropped as metadata 'preprocessing' says (normalisation is in the graph); output "
            f"'{manifest['output']['name']}' softmax probabilities (N, {len(manifest['classes'])}) over metadata "
            "'classes'.")


def embed_onnx_metadata(path: str | os.PathLike, manifest: dict) -> None:
    """Write the manifest's identity into ``path`` in place (other producers' entries are kept)."""
    import onnx

    # load_external_data=False: the tensors keep pointing at model.onnx.data, which stays as it is
    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    props.update(onnx_metadata(manifest))
    onnx.helper.set_model_props(model, props)
    model.doc_string = describe_model(manifest)
    onnx.save(model, str(path))


def read_onnx_metadata(path: str | os.PathLike) -> dict:
    """Our entries of ``path``'s ``metadata_props``, JSON decoded ({} for a file exported before them)."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    out: dict = {k: props[k] for k in ONNX_METADATA_KEYS if k in props}
    for key in ("classes", "preprocessing"):
        if key in out:
            out[key] = json.loads(out[key])
    if "bundle_schema_version" in out:
        out["bundle_schema_version"] = int(out["bundle_schema_version"])
    return out


def metadata_mismatches(path: str | os.PathLike, manifest: dict) -> list[str]:
    """Keys whose value in ``path`` differs from the manifest's: a manifest edited after export (its own
    bytes are not hashed, so a renamed class would otherwise go unnoticed). [] for files without them."""
    want = {"name": manifest["name"], "version": manifest["version"], "architecture": manifest["architecture"],
            "classes": manifest["classes"], "preprocessing": manifest["preprocessing"],
            "bundle_schema_version": manifest["schema_version"]}
    return [k for k, v in read_onnx_metadata(path).items() if v != want[k]]
