"""setuptools hook that builds the native runtime (native/libtorch) with CMake during install.

    pip install --no-build-isolation -e .      (scripts/setup.sh does this)

--no-build-isolation matters: the module is compiled against the torch already installed in the
venv, never a second copy pulled into an isolated build environment. The CMake build directory
is ./build, the same one a plain 'cmake -S . -B build && cmake --build build' uses, so the
classify binary lands in build/bin/classify either way. Set SHIPCLASSIFIER_SKIP_NATIVE=1 to
install the Python packages without compiling (the native tests then skip and say how to build).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self):
        if os.environ.get("SHIPCLASSIFIER_SKIP_NATIVE") == "1":
            print("setup.py: SHIPCLASSIFIER_SKIP_NATIVE=1, not building the native runtime")
            return
        if shutil.which("cmake") is None:
            raise RuntimeError("cmake not found: install it (apt-get install cmake g++, see scripts/setup.sh) or set "
                               "SHIPCLASSIFIER_SKIP_NATIVE=1 to install without the native runtime")
        super().run()

    def build_extension(self, ext: Extension) -> None:
        build = ROOT / "build"
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(min(4, os.cpu_count() or 1)))
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}",
                        "-DCMAKE_BUILD_TYPE=Release"], check=True)
        subprocess.run(["cmake", "--build", str(build), "-j", jobs], check=True)
        built = next((ROOT / "python" / "classify_native").glob("_core*.so"), None)
        if built is None:
            raise RuntimeError("the CMake build finished but python/classify_native/_core*.so is missing")
        dest = Path(self.get_ext_fullpath(ext.name))
        if dest.resolve() != built.resolve():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(built, dest)


setup(ext_modules=[CMakeExtension("classify_native._core")], cmdclass={"build_ext": CMakeBuild})
