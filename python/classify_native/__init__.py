"""The native (C++/libtorch) bundle runtime, from Python.

    from classify_native import Runtime
    rt = Runtime("bundles/digits", tta="hflip", threads=2)
    for r in rt.predict_files(["a.png", "b.jpg"]):
        print(r["path"], r["topk"][0] if r["error"] is None else r["error"])

Build it with ``bash scripts/setup.sh`` (or ``cmake -S . -B build && cmake --build build -j2``):
that writes the compiled ``_core`` module next to this file. Preprocessing, TTA and ensembles
follow docs/BUNDLE.md exactly as the Python loader does; the GIL is released while C++ decodes
and runs the model, so threads calling one Runtime each get real parallelism in the C++ part.
"""
from __future__ import annotations

try:
    from ._core import (BundleError, ImageError, NativeError, OptionError, Runtime, decode_bytes, decode_file,
                        file_sha256, parse_tta_policy, preprocess)
except ImportError as exc:  # pragma: no cover - exercised only on machines without the build
    raise ImportError(
        "classify_native: the compiled module is missing or does not load "
        f"({exc}); build it with 'bash scripts/setup.sh' or "
        "'cmake -S . -B build && cmake --build build -j2' (needs torch installed in the venv)") from exc

# Make load_bundle(..., backend="native") work once this package is imported.
from . import backend as _backend  # noqa: E402

_backend.register()

__all__ = ["Runtime", "NativeError", "BundleError", "ImageError", "OptionError", "decode_file", "decode_bytes",
           "preprocess", "parse_tta_policy", "file_sha256"]
