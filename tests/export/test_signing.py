"""Signed bundles (export.signing) and loading from the verified bytes (export.manifest.read_artifact).

Every refusal is a SignatureError (a BundleError) that names the problem and the fix; an unsigned
bundle still loads when no signature is required.
"""
from __future__ import annotations

import io
import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from export_testlib import export_cli, write_checkpoint

import export
from export import formats
from export.build import ExportOptions, build_bundle
from export.manifest import read_artifact, read_manifest
from export.signing import SIGNATURE_NAME, SIGNATURE_SCHEMA_FILE, SignatureError, signature_doc_problem

pytestmark = pytest.mark.slow

BATCH = torch.arange(2 * 3 * 32 * 32, dtype=torch.int64).remainder(251).to(torch.uint8).view(2, 3, 32, 32)


@pytest.fixture(scope="module")
def signed_setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(bundle, keys dir, other keys dir): an untrained mobilenet_v3_small, TorchScript + ONNX, unsigned."""
    root = tmp_path_factory.mktemp("signing")
    ckpt = write_checkpoint(root / "ckpt.pt", "mobilenet_v3_small")
    out, _ = build_bundle(ExportOptions(str(ckpt), str(root / "bundle"), ["torchscript", "onnx"], max_batch=4),
                          say=lambda *_: None)
    assert export_cli("keygen", "--out", root / "keys")[0] == 0
    assert export_cli("keygen", "--out", root / "other")[0] == 0
    return out, root / "keys", root / "other"


@pytest.fixture
def bundle(signed_setup, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(signed_setup[0], dst)
    return dst


def _keys(signed_setup) -> tuple[Path, Path, Path]:
    _, keys, other = signed_setup
    return keys / "bundle-signing.key", keys / "bundle-signing.pub", other / "bundle-signing.pub"


def test_keygen_writes_a_private_key_only_its_owner_reads(signed_setup, capsys):
    priv, pub, _ = _keys(signed_setup)
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in priv.read_bytes() and b"BEGIN PUBLIC KEY" in pub.read_bytes()
    code, err = export_cli("keygen", "--out", priv.parent, capsys=capsys)
    assert code == 2 and "--force" in err


def test_sign_and_load_round_trip(signed_setup, bundle, capsys):
    priv, pub, _ = _keys(signed_setup)
    code, _ = export_cli("sign", bundle, "--key", priv, capsys=capsys)
    assert code == 0 and (bundle / SIGNATURE_NAME).is_file()
    for backend in ("onnxruntime", "torchscript"):
        plain = export.load_bundle(bundle, backend).predict_tensor(BATCH)
        signed = export.load_bundle(bundle, backend, trusted_keys=[pub], require_signature=True)
        np.testing.assert_array_equal(signed.predict_tensor(BATCH), plain)
    assert export_cli("verify", bundle, "--trusted-key", pub, capsys=capsys)[0] == 0
    doc = json.loads((bundle / SIGNATURE_NAME).read_text())
    schema = json.loads(SIGNATURE_SCHEMA_FILE.read_text())
    assert signature_doc_problem(doc) is None and set(doc) == set(schema["properties"])  # writes every key


def test_a_manifest_changed_after_signing_is_refused(signed_setup, bundle, capsys):
    priv, pub, _ = _keys(signed_setup)
    export_cli("sign", bundle, "--key", priv)
    m = json.loads((bundle / "manifest.json").read_text())
    m["classes"][0], m["classes"][1] = m["classes"][1], m["classes"][0]   # a quiet, still-valid edit
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2))
    with pytest.raises(SignatureError, match="manifest.json was modified after signing"):
        export.load_bundle(bundle, "onnxruntime", trusted_keys=[pub], require_signature=True)
    with pytest.raises(SignatureError, match="manifest.json was modified after signing"):
        export.load_bundle(bundle, "onnxruntime", trusted_keys=[pub])   # a present signature is always checked
    code, err = export_cli("verify", bundle, "--trusted-key", pub, capsys=capsys)
    assert code == 2 and "modified after signing" in err


def test_a_signature_by_another_key_is_refused(signed_setup, bundle):
    priv, _, other_pub = _keys(signed_setup)
    export_cli("sign", bundle, "--key", priv)
    with pytest.raises(SignatureError, match="not a trusted key.*--trusted-key"):
        export.load_bundle(bundle, "onnxruntime", trusted_keys=[other_pub], require_signature=True)


def test_an_unsigned_bundle_needs_a_signature_only_when_required(signed_setup, bundle):
    _, pub, _ = _keys(signed_setup)
    with pytest.raises(SignatureError, match="unsigned bundle.*python -m export sign"):
        export.load_bundle(bundle, "onnxruntime", trusted_keys=[pub], require_signature=True)
    assert export.load_bundle(bundle, "onnxruntime", trusted_keys=[pub]).classes   # keys alone: unsigned allowed
    assert export.load_bundle(bundle, "onnxruntime").classes
    with pytest.raises(SignatureError, match="needs at least one trusted public key"):
        export.load_bundle(bundle, "onnxruntime", require_signature=True)


@pytest.mark.parametrize("damage", ["garbage", "flip", "algorithm", "version", "key_id"])
def test_a_tampered_signature_file_is_refused(signed_setup, bundle, damage):
    priv, pub, _ = _keys(signed_setup)
    export_cli("sign", bundle, "--key", priv)
    path = bundle / SIGNATURE_NAME
    doc = json.loads(path.read_text())
    if damage == "garbage":
        path.write_text("{not json")
    elif damage == "flip":
        sig = doc["signature"]
        doc["signature"] = ("B" if sig[0] == "A" else "A") + sig[1:]
        path.write_text(json.dumps(doc))
    else:  # bundle.signature.schema.json: a future format or a damaged field is refused by name
        doc.update({"algorithm": {"algorithm": "none"}, "version": {"signature_version": 2},
                    "key_id": {"key_id": 12345}}[damage])
        path.write_text(json.dumps(doc))
    want = {"flip": "the signature was modified", "garbage": "malformed signature file"}.get(
        damage, f"malformed signature file.*signature.{damage if damage != 'version' else 'signature_version'}")
    with pytest.raises(SignatureError, match=want):
        export.load_bundle(bundle, "onnxruntime", trusted_keys=[pub], require_signature=True)


def test_a_signed_ensemble_covers_its_members(signed_setup, bundle, tmp_path):
    priv, pub, _ = _keys(signed_setup)
    assert export_cli("ensemble", "--members", signed_setup[0], bundle, "--out", tmp_path / "ens")[0] == 0
    export_cli("sign", tmp_path / "ens", "--key", priv)
    ens = export.load_bundle(tmp_path / "ens", "onnxruntime", trusted_keys=[pub], require_signature=True)
    assert len(ens.members) == 2
    member = tmp_path / "ens" / ens.manifest["members"][1]["path"] / "manifest.json"
    member.write_bytes(member.read_bytes() + b"\n")   # the member changed, the ensemble's signature still holds
    with pytest.raises(export.BundleError, match="sha256 differs from the ensemble manifest's"):
        export.load_bundle(tmp_path / "ens", "onnxruntime", trusted_keys=[pub], require_signature=True)


def test_runtimes_load_the_checked_bytes_not_the_path(bundle):
    """The file may change between the sha256 check and the load: the runtime gets the checked bytes."""
    manifest = read_manifest(bundle)
    verified = {key: read_artifact(bundle, manifest, key) for key in ("onnx", "torchscript")}
    expected = {key: formats.open_runtime(v, v.entry["format"])(BATCH) for key, v in verified.items()}
    for v in verified.values():   # swap every file on disk after the check
        for name in v.files:
            (bundle / name).write_bytes(b"not the checked model")
    for key, v in verified.items():
        torch.testing.assert_close(formats.open_runtime(v, v.entry["format"])(BATCH), expected[key])
    with pytest.raises(export.BundleError, match="sha256 .* differs"):
        read_artifact(bundle, manifest, "onnx")


def test_load_bundle_hands_the_runtimes_bytes(bundle, monkeypatch):
    import onnxruntime as ort

    seen = []
    real_session, real_jit_load = ort.InferenceSession, torch.jit.load

    def session(model, *a, **k):
        seen.append(type(model))
        return real_session(model, *a, **k)

    def jit_load(f, *a, **k):
        seen.append(type(f))
        return real_jit_load(f, *a, **k)

    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(torch.jit, "load", jit_load)
    export.load_bundle(bundle, "onnxruntime")
    export.load_bundle(bundle, "torchscript")
    assert seen == [bytes, io.BytesIO]
