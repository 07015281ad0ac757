"""Signed bundles in C++ (classify --trusted-key/--require-signature, Runtime(trusted_keys=...)):
the same verdicts and messages as export.load_bundle; and every artifact is read once (the bytes
whose sha256 was checked are the bytes loaded)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from conftest import signed_copy
from export.signing import SIGNATURE_NAME

pytestmark = pytest.mark.slow


def classify(bin_path, *args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_path), *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def signed(bundle_a, keys, tmp_path):
    return signed_copy(bundle_a, keys[0], tmp_path / "signed")


def _probs(proc: subprocess.CompletedProcess) -> list:
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line)["topk"] for line in proc.stdout.splitlines()]


@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
def test_cli_runs_a_signed_bundle_like_an_unsigned_one(classify_bin, signed, keys, eval_images, fmt):
    img = eval_images[0]
    plain = _probs(classify(classify_bin, "--bundle", signed, "--format", fmt, img))
    checked = _probs(classify(classify_bin, "--bundle", signed, "--format", fmt, "--trusted-key", keys[1],
                              "--require-signature", img))
    assert checked == plain


def _flip_signature(bundle):
    doc = json.loads((bundle / SIGNATURE_NAME).read_text())
    doc["signature"] = ("B" if doc["signature"][0] == "A" else "A") + doc["signature"][1:]
    (bundle / SIGNATURE_NAME).write_text(json.dumps(doc))


def _edit_manifest(bundle):
    m = json.loads((bundle / "manifest.json").read_text())
    m["classes"][0], m["classes"][1] = m["classes"][1], m["classes"][0]
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2))


@pytest.mark.parametrize("damage,key,message", [
    ("unsign", 1, "unsigned bundle"),
    (None, 2, "not a trusted key"),
    ("manifest", 1, "manifest.json was modified after signing"),
    ("flip", 1, "the signature was modified"),
    ("garbage", 1, "malformed signature file"),
    ("version2", 1, "signature_version must be 1"),      # bundle.signature.schema.json, as Python refuses it
    ("numeric_key_id", 1, "key_id must be 16 lowercase hex digits"),
    (None, None, "needs at least one --trusted-key"),
])
def test_cli_refusals_exit_2_naming_the_problem(classify_bin, native, signed, keys, eval_images, damage, key,
                                                message):
    if damage == "unsign":
        (signed / SIGNATURE_NAME).unlink()
    elif damage == "manifest":
        _edit_manifest(signed)
    elif damage == "flip":
        _flip_signature(signed)
    elif damage == "garbage":
        (signed / SIGNATURE_NAME).write_text("{")
    elif damage in ("version2", "numeric_key_id"):
        doc = json.loads((signed / SIGNATURE_NAME).read_text())
        doc.update(signature_version=2) if damage == "version2" else doc.update(key_id=12345)
        (signed / SIGNATURE_NAME).write_text(json.dumps(doc))
    trust = ["--trusted-key", keys[key]] if key else []
    r = classify(classify_bin, "--bundle", signed, *trust, "--require-signature", eval_images[0])
    assert r.returncode == 2 and message in r.stderr, r.stderr
    with pytest.raises(native.NativeError, match=re.escape(message.replace("--trusted-key", ""))):
        native.Runtime(str(signed), trusted_keys=[str(keys[key])] if key else [], require_signature=True)


def test_module_round_trip_and_unsigned_without_the_flag(native, signed, bundle_a, keys):
    rows = np.zeros((2, 3, 32, 32), np.uint8)
    rt = native.Runtime(str(signed), trusted_keys=[str(keys[1])], require_signature=True)
    np.testing.assert_array_equal(rt.run_preprocessed(rows), native.Runtime(str(bundle_a)).run_preprocessed(rows))
    assert native.Runtime(str(bundle_a), trusted_keys=[str(keys[1])]).classes   # keys alone: unsigned allowed


def test_a_signed_ensemble_covers_its_members(native, ensembles, keys, tmp_path):
    ens = signed_copy(ensembles["mean"], keys[0], tmp_path / "ens")
    assert native.Runtime(str(ens), trusted_keys=[str(keys[1])], require_signature=True).kind == "ensemble"
    member = ens / json.loads((ens / "manifest.json").read_text())["members"][0]["path"] / "manifest.json"
    member.write_bytes(member.read_bytes() + b"\n")
    with pytest.raises(native.BundleError, match="differs from the ensemble manifest's"):
        native.Runtime(str(ens), trusted_keys=[str(keys[1])], require_signature=True)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
@pytest.mark.parametrize("fmt,file", [("torchscript", "model.ts"), ("pt2", "model.pt2")])
def test_each_bundle_file_is_opened_once(classify_bin, signed, keys, eval_images, tmp_path, fmt, file):
    """Hash-then-reopen would let a file swapped between the two be loaded: one open per file."""
    log = tmp_path / "strace.log"
    r = subprocess.run(["strace", "-f", "-e", "trace=open,openat", "-o", str(log), str(classify_bin), "--bundle",
                        str(signed), "--format", fmt, "--trusted-key", str(keys[1]), "--require-signature",
                        eval_images[0]], capture_output=True, text=True, timeout=180, env={"TMPDIR": str(tmp_path)})
    if "ptrace" in r.stderr or "Operation not permitted" in r.stderr:
        pytest.skip("ptrace is not allowed here")
    assert r.returncode == 0, r.stderr
    opens = log.read_text()
    for name in (file, "manifest.json"):
        assert len(re.findall(rf'"{re.escape(str(signed))}/{re.escape(name)}"', opens)) == 1, name
    assert not list(tmp_path.glob("classify-*")), "the private copy of the .pt2 was not removed"


def test_backend_native_loads_the_manifest_the_loader_checked(native, signed, keys, monkeypatch):
    import export
    from export import loader

    bundle = export.load_bundle(signed, "native", trusted_keys=[keys[1]], require_signature=True)
    assert bundle.predict_tensor(np.zeros((1, 3, 32, 32), np.uint8)).shape == (1, len(bundle.classes))
    real = loader.check_signature

    def check_then_swap(folder, raw, policy):   # the manifest is replaced after Python's check
        out = real(folder, raw, policy)
        _edit_manifest(folder)
        return out

    monkeypatch.setattr(loader, "check_signature", check_then_swap)
    with pytest.raises(export.BundleError, match="changed after the caller checked it"):
        export.load_bundle(signed, "native", trusted_keys=[keys[1]], require_signature=True)
