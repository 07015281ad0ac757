"""Portable .pt2: the CPU level and torch release it was compiled for are recorded, every reader
(Python loader, `python -m export verify`, the classify binary, the pybind11 module) checks them
before opening the package and falls back to TorchScript (or refuses when .pt2 was asked for),
OpenMP threads follow the runtime, and `python -m export recompile` rebuilds it from the shipped
ExportedProgram, atomically.

    pytest -q tests/native/test_pt2_portable.py

Here, beside the native tests, to reuse their session bundle (resnet18, TorchScript + .pt2, compiled
with one torch thread) instead of compiling another .pt2.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import export
from export import portable
from export.manifest import file_sha256, read_manifest, verify_checksums, write_manifest
from export.recompile import RecompileOptions, recompile_bundle
from export.verify import ParityError

pytestmark = pytest.mark.slow  # shares the trained/exported bundle with test_runtime.py
FAKE_FEATURE = "x86_made_up_ext"  # no CPU has it, whatever machine runs the suite


def _faked(bundle: Path, dst: Path, **compiled_for) -> Path:
    """A copy of ``bundle`` whose .pt2 entry claims another CPU level / torch release."""
    shutil.copytree(bundle, dst)
    m = read_manifest(dst)
    m["artifacts"]["pt2"]["compiled_for"].update(compiled_for)
    (dst / "manifest.json").unlink()
    write_manifest(dst, m)
    return dst


@pytest.fixture
def newer_cpu(bundle_a, tmp_path) -> Path:
    feats = read_manifest(bundle_a)["artifacts"]["pt2"]["compiled_for"]["cpu_features"]
    return _faked(bundle_a, tmp_path / "newer_cpu", cpu_isa="avx512_fp16", cpu_features=[*feats, FAKE_FEATURE])


def test_manifest_records_the_cpu_level_torch_and_program(bundle_a):
    art = read_manifest(bundle_a)["artifacts"]["pt2"]
    rec = art["compiled_for"]
    assert rec["cpu_isa"] == portable.resolve_isa("auto") and rec["threads"] == "dynamic"
    assert rec["torch"] == str(torch.__version__) and rec["aten_cpu_capability"] in ("DEFAULT", "AVX2", "AVX512")
    if rec["cpu_isa"] in portable.ISAS:
        march, _, needed = portable.ISAS[rec["cpu_isa"]]
        assert rec["march"] == march and set(needed) <= set(rec["cpu_features"])
    assert portable.pt2_problem(art) is None  # this machine compiled it, so it can run it
    prog = art["program"]
    assert prog["file"] == "model.program.pt2" and file_sha256(bundle_a / prog["file"]) == prog["sha256"]
    assert "pt2.program" in verify_checksums(bundle_a)
    assert isinstance(torch.export.load(str(bundle_a / prog["file"])), torch.export.ExportedProgram)


def test_package_targets_the_level_and_leaves_threads_to_the_runtime(bundle_a):
    """Compiled with torch.set_num_threads(1) (tests/native/conftest.py): inductor's default would emit
    serial kernels or `num_threads(1)`; the export makes OpenMP ask the runtime's thread count instead."""
    rec = read_manifest(bundle_a)["artifacts"]["pt2"]["compiled_for"]
    with zipfile.ZipFile(bundle_a / "model.pt2") as z:
        sources = "\n".join(z.read(n).decode(errors="replace") for n in z.namelist() if n.endswith(".cpp"))
    assert f"-march={rec['march']}" in sources and "-march=native" not in sources.replace(f"-march={rec['march']}", "")
    assert "#pragma omp parallel" in sources and not re.search(r"num_threads\(\d+\)", sources)


def test_the_loader_falls_back_from_a_pt2_this_cpu_cannot_run(newer_cpu, bundle_a, caplog):
    with caplog.at_level(logging.WARNING, logger="export.loader"):
        bundle = export.load_bundle(newer_cpu, backend="auto")
    assert bundle.backend == "torchscript"
    assert f"lacks {FAKE_FEATURE}" in caplog.text and f"python -m export recompile {newer_cpu}" in caplog.text
    with pytest.raises(export.BundleError, match=rf"model.pt2 was compiled for avx512_fp16 CPUs .*lacks {FAKE_FEATURE}"
                                                 r".*illegal instruction.*python -m export recompile"):
        export.load_bundle(newer_cpu, backend="pt2")
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ref = export.load_bundle(bundle_a, backend="pt2").predict_tensor(x)
    assert np.abs(bundle.predict_tensor(x) - ref).max() <= 1e-4


def test_another_torch_release_is_refused_by_the_loader(bundle_a, tmp_path):
    old = _faked(bundle_a, tmp_path / "old_torch", torch="2.9.0+cpu")
    with pytest.raises(export.BundleError, match=r"compiled with torch 2.9.0\+cpu; this is torch .* only load in the "
                                                 "torch release that built them.*recompile"):
        export.load_bundle(old, backend="pt2")
    art = read_manifest(old)["artifacts"]["pt2"]
    art["compiled_for"]["torch"] = torch.__version__.split("+")[0] + "+cpu"  # another build of this release: fine
    assert portable.pt2_problem(art) is None


def test_verify_skips_the_pt2_and_checks_the_rest(newer_cpu, capsys):
    from export.cli import main

    assert main(["verify", str(newer_cpu)]) == 0
    out = capsys.readouterr().out
    assert f"pt2: not run ({newer_cpu}/model.pt2 was compiled for avx512_fp16" in out and "torchscript: max abs" in out


def test_classify_binary_falls_back_or_refuses(classify_bin, newer_cpu, bundle_a, eval_images):
    def run(*args):
        return subprocess.run([str(classify_bin), "--bundle", str(newer_cpu), "--threads", "1", "--topk", "1", *args,
                               eval_images[0]], capture_output=True, text=True, timeout=120)

    res = run()
    assert res.returncode == 0, res.stderr
    assert f"skipping the .pt2: {newer_cpu}/model.pt2 was compiled for avx512_fp16 CPUs" in res.stderr
    assert f"lacks {FAKE_FEATURE}" in res.stderr and f"python -m export recompile {newer_cpu}" in res.stderr
    res = run("--format", "pt2")
    assert res.returncode == 2 and f"lacks {FAKE_FEATURE}" in res.stderr and "--format torchscript" in res.stderr


def test_native_module_falls_back_or_refuses(native, newer_cpu, bundle_a, tmp_path, capfd):
    rt = native.Runtime(str(newer_cpu), threads=1)
    assert rt.format == "torchscript"
    assert f"lacks {FAKE_FEATURE}" in capfd.readouterr().err
    with pytest.raises(native.BundleError, match=rf"lacks {FAKE_FEATURE}.*python -m export recompile"):
        native.Runtime(str(newer_cpu), format="pt2")
    old = _faked(bundle_a, tmp_path / "old_torch", torch="2.9.0")
    with pytest.raises(native.BundleError, match=r"compiled with torch 2.9.0; this runtime was built against torch"):
        native.Runtime(str(old), format="pt2")
    pt2_only = _faked(bundle_a, tmp_path / "pt2_only", cpu_features=[FAKE_FEATURE])
    m = read_manifest(pt2_only)
    del m["artifacts"]["torchscript"]
    (pt2_only / "manifest.json").unlink()
    write_manifest(pt2_only, m)
    with pytest.raises(native.BundleError, match="no TorchScript artifact to fall back to"):
        native.Runtime(str(pt2_only))


def test_recompile_rebuilds_the_pt2_for_this_machine(newer_cpu, bundle_a):
    before = read_manifest(newer_cpu)["artifacts"]["pt2"]
    recompile_bundle(RecompileOptions(str(newer_cpu)), say=lambda *a: None)
    art = read_manifest(newer_cpu)["artifacts"]["pt2"]
    assert art["compiled_for"]["cpu_isa"] == portable.resolve_isa("auto") and portable.pt2_problem(art) is None
    assert art["parity"]["reference"] == "torchscript" and art["parity"]["max_abs_diff"] <= 1e-4 and art["recompiled"]
    assert art["program"] == before["program"] and art["static_batch_models"] == before["static_batch_models"]
    verify_checksums(newer_cpu)
    assert export.load_bundle(newer_cpu).backend == "pt2"
    assert not [p for p in newer_cpu.parent.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_a_failed_recompile_leaves_the_bundle_untouched(newer_cpu, monkeypatch):
    def snapshot():
        return {p.name: p.read_bytes() for p in newer_cpu.iterdir()}

    def compiled(program, path, static_batches, isa):  # stands in for the compile (tested above): same package
        shutil.copyfile(newer_cpu / "model.pt2", path)
        return {"static_batch_models": {str(n): f"batch{n}" for n in static_batches}}

    before = snapshot()
    with monkeypatch.context() as patch:
        patch.setattr(export.formats, "write_pt2", compiled)
        with pytest.raises(ParityError, match="pt2 \\(recompiled\\)"):  # tolerance < 0: fails after the new .pt2
            recompile_bundle(RecompileOptions(str(newer_cpu), tolerance=-1.0), say=lambda *a: None)
    assert snapshot() == before
    prog = newer_cpu / "model.program.pt2"
    prog.write_bytes(prog.read_bytes() + b"x")
    with pytest.raises(export.BundleError, match="model.program.pt2: missing, or its sha256 differs"):
        recompile_bundle(RecompileOptions(str(newer_cpu)), say=lambda *a: None)
    assert not [p for p in newer_cpu.parent.iterdir() if p.name.startswith(".")]
    (newer_cpu / "model.ts").write_bytes(b"tampered")  # a checksum it would rewrite must not hide another change
    with pytest.raises(export.BundleError, match="model.ts: sha256 .* differs"):
        recompile_bundle(RecompileOptions(str(newer_cpu)), say=lambda *a: None)


def test_recompile_refuses_bundles_it_cannot_help(bundle_b, tmp_path, capsys):
    from export.cli import main

    assert main(["recompile", str(bundle_b)]) == 2
    assert "has no CPU .pt2 artifact to recompile" in capsys.readouterr().err


def test_isa_levels_this_cpu_lacks_are_refused(monkeypatch):
    monkeypatch.setattr(portable, "cpu_features", lambda: frozenset(portable.ISAS["default"][2]))
    monkeypatch.setattr(portable, "_x86", lambda: True)
    assert portable.resolve_isa("auto") == "default"
    with pytest.raises(export.BundleError, match=r"--pt2-isa avx2: this CPU lacks .*avx2.*choose a lower level"):
        portable.resolve_isa("avx2")
    with pytest.raises(export.BundleError, match="--pt2-isa 'sse9': use one of auto, native, default, avx2, avx512"):
        portable.resolve_isa("sse9")


def test_the_server_loads_the_fallback_and_refuses_an_explicit_pt2(newer_cpu, caplog):
    from server.models import load_served_model

    with caplog.at_level(logging.WARNING, logger="export.loader"):
        served = load_served_model(newer_cpu, backend="auto", threads=1)
    assert served.backend == "torchscript" and f"lacks {FAKE_FEATURE}" in caplog.text
    with pytest.raises(export.BundleError, match=rf"lacks {FAKE_FEATURE}.*python -m export recompile"):
        load_served_model(newer_cpu, backend="pt2", threads=1)


def test_recompile_an_ensemble_updates_its_member_checksums(ensembles, tmp_path, monkeypatch):
    ens = tmp_path / "ens"
    shutil.copytree(ensembles["mean"], ens)
    member = next(m for m in read_manifest(ens)["members"] if "pt2" in read_manifest(ens / m["path"])["artifacts"])
    mdir = ens / member["path"]
    m = read_manifest(mdir)
    m["artifacts"]["pt2"]["compiled_for"]["cpu_features"].append(FAKE_FEATURE)
    (mdir / "manifest.json").unlink()
    write_manifest(mdir, m)
    e = read_manifest(ens)  # re-hashed as a real (older) export would have it
    next(x for x in e["members"] if x["name"] == member["name"])["manifest_sha256"] = file_sha256(mdir / "manifest.json")
    (ens / "manifest.json").unlink()
    write_manifest(ens, e)
    member = next(x for x in e["members"] if x["name"] == member["name"])

    def compiled(program, path, static_batches, isa):  # the real compile is tested above: reuse the package
        shutil.copyfile(mdir / "model.pt2", path)
        return {"static_batch_models": {str(n): f"batch{n}" for n in static_batches}}

    monkeypatch.setattr(export.formats, "write_pt2", compiled)
    recompile_bundle(RecompileOptions(str(ens)), say=lambda *a: None)
    new = read_manifest(ens)
    mem = next(m for m in new["members"] if m["name"] == member["name"])
    assert mem["manifest_sha256"] == file_sha256(mdir / "manifest.json") != member["manifest_sha256"]
    assert portable.pt2_problem(read_manifest(mdir)["artifacts"]["pt2"]) is None
    verify_checksums(ens)
    assert export.load_bundle(ens, backend="auto").backend  # the ensemble still opens


def test_no_pt2_program_ships_only_the_package(tmp_path, monkeypatch):
    from export import build

    monkeypatch.setattr(export.formats, "write_pt2", lambda program, path, static, isa: {"static_batch_models": {}})
    extra = build.write_cpu_pt2(None, tmp_path / "model.pt2", [], "avx2", with_program=False)
    assert "program" not in extra and extra["compiled_for"]["cpu_isa"] == "avx2" and not list(tmp_path.iterdir())


def test_export_refuses_a_level_this_cpu_lacks_before_any_work(tmp_path, monkeypatch, capsys):
    from export.cli import main

    monkeypatch.setattr(portable, "cpu_features", lambda: frozenset(portable.ISAS["avx2"][2]))
    monkeypatch.setattr(portable, "_x86", lambda: True)
    code = main(["--checkpoint", str(tmp_path / "absent.pt"), "--out", str(tmp_path / "b"), "--format", "pt2",
                 "--pt2-isa", "avx512"])
    assert code == 2 and "--pt2-isa avx512: this CPU lacks avx512bw" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
