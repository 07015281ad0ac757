"""Packaging of the native runtime: the torch check at import, the build pins, classify on the venv's PATH.

    pytest -q tests/native/test_packaging.py

The wheel itself (module and binary installed with $ORIGIN-relative rpaths) is checked by hand as
docs/native.md "Packaging" shows: building one takes minutes.
"""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from conftest import REPO, classify_binary


def test_the_build_records_the_torch_it_was_compiled_against(native):
    import torch

    assert native.BUILT_FOR_TORCH == torch.__version__


def test_check_torch_names_both_versions_and_the_fix(native):
    native.check_torch("2.14.1+cu130", "2.14.1+cu130")
    with pytest.raises(ImportError) as err:
        native.check_torch("2.14.1+cu130", "2.15.0+cpu")
    msg = str(err.value)
    assert "built for torch 2.14.1+cu130" in msg and "torch 2.15.0+cpu is installed" in msg
    assert "pip install --no-build-isolation --force-reinstall ." in msg and "torch==2.14.1+cu130" in msg


def test_import_under_another_torch_is_an_import_error(native):
    """The check runs at import, before the compiled module (whose libtorch symbols may not even resolve)."""
    code = ("import torch; torch.__version__ = '1.0.0+fake'\n"
            "try:\n    import classify_native\nexcept ImportError as exc:\n    print('REFUSED', exc)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(native.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("REFUSED classify_native was built for torch"), res.stdout
    assert "torch 1.0.0+fake is installed" in res.stdout


def test_torch_is_pinned_alike_for_building_and_running():
    """The build compiles against torch and the module refuses any other at import: both pins must agree."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["build-system"]["build-backend"] == "scikit_build_core.build"
    build_pins = [r for r in meta["build-system"]["requires"] if r.startswith("torch")]
    run_pins = [r for r in meta["project"]["dependencies"] if r.startswith("torch") and not r.startswith("torchv")]
    assert build_pins == run_pins and run_pins[0].startswith("torch==")


def test_classify_is_on_the_venvs_path():
    """scripts/setup.sh (editable) and pip install . (wheel) both put classify into the venv's bin/."""
    exe = Path(sysconfig.get_path("scripts")) / "classify"
    if not exe.is_file() and classify_binary() is None:
        pytest.skip("no native build in this environment")
    assert exe.is_file(), f"{exe} missing: the project is not installed in this venv (run 'bash scripts/setup.sh')"
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--bundle" in res.stdout + res.stderr
