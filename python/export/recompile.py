"""Recompile a bundle's CPU .pt2 on this machine from the ExportedProgram it ships.

    python -m export recompile bundles/digits                 # for this CPU's level (auto: avx2 where it has it)
    python -m export recompile bundles/digits --isa native --data data/digits

A .pt2 holds machine code for the CPU level and torch release it was compiled with (export.portable
says why); the bundle also carries the ``torch.export`` program it was compiled from
(``artifacts.pt2.program``, model.program.pt2). This compiles that program again here, checks the
new package against the bundle's own TorchScript or ONNX artifact (batch sizes 1, 2 and an odd
size; ``--data`` images or the synthetic batch), and rewrites model.pt2 and its manifest entry.
The work happens in a copy of the bundle (hard links for the untouched files) that replaces the
original only when every check passed: a failure leaves the bundle as it was. For an ensemble, every
member with a .pt2 is recompiled and the ensemble's member checksums are updated.
"""
from __future__ import annotations

import io
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import formats as fmt
from .build import staged_bundle
from .manifest import (MANIFEST_NAME, BundleError, file_sha256, manifest_path, preprocess_spec, read_artifact,
                       read_manifest, read_program, utc_now, verify_checksums, write_manifest)
from .portable import compiled_for, resolve_isa
from .samples import validation_images
from .verify import check_parity

REFERENCES = ("torchscript", "onnx")  # the fp32 artifacts a recompiled .pt2 must agree with


@dataclass
class RecompileOptions:
    bundle: str
    isa: str = "auto"  # export.portable.ISA_CHOICES
    data: str | None = None  # dataset whose validation images the parity check uses (default: synthetic)
    tolerance: float = 1e-4


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def _replace_file(path: Path, write) -> None:
    """Write ``path`` through a new inode: the staged copy shares its untouched files with the original
    bundle by hard link, so writing into an existing file would change the original too."""
    tmp = path.with_name(f".{path.name}.new")
    write(tmp)
    os.replace(tmp, path)


def _rewrite_manifest(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST_NAME).unlink()  # a hard link to the original bundle's: write a new file, not through it
    write_manifest(folder, manifest)


def _load_program(folder: Path, art: dict) -> torch.export.ExportedProgram:
    prog = art.get("program")
    if not isinstance(prog, dict):
        raise BundleError(f"{folder}: its .pt2 came without the ExportedProgram it was compiled from (bundles "
                          "exported before 'recompile' existed); re-export it with 'python -m export --checkpoint "
                          "CKPT --out DIR --format all' on any machine")
    data = read_program(folder, art)
    try:
        return torch.export.load(io.BytesIO(data))
    except Exception as exc:  # a program saved by another torch release may not deserialize
        path = folder / Path(str(prog.get("file"))).name
        raise BundleError(f"{path}: cannot load the ExportedProgram with torch {torch.__version__} "
                          f"({type(exc).__name__}: {str(exc)[:200]}); re-export the bundle from its checkpoint") from None


def _recompile_model(folder: Path, opts: RecompileOptions, isa: str, say) -> dict:
    """Recompile folder/model.pt2 in place (``folder`` is a staged copy); returns the new artifact entry."""
    manifest = read_manifest(folder)
    art = manifest["artifacts"].get("pt2")
    if art is None:
        raise BundleError(f"{folder}: the bundle has no CPU .pt2 artifact to recompile (it has: "
                          f"{', '.join(manifest['artifacts'])})")
    program = _load_program(folder, art)
    ref_key = next((k for k in REFERENCES if k in manifest["artifacts"]), None)
    if ref_key is None:
        raise BundleError(f"{folder}: no TorchScript or ONNX artifact to check the recompiled .pt2 against; "
                          "re-export the bundle with --format all")
    ref_art = manifest["artifacts"][ref_key]
    reference = fmt.open_runtime(read_artifact(folder, manifest, ref_key), ref_art["format"])
    static = sorted(int(n) for n in art.get("static_batch_models") or {})
    path = folder / art["file"]
    say(f"recompile {path.name} for {isa} (torch {torch.__version__}) ...")
    t0 = time.perf_counter()
    extra: dict = {}
    _replace_file(path, lambda tmp: extra.update(fmt.write_pt2(program, tmp, tuple(static), isa)))
    seconds = time.perf_counter() - t0
    images = validation_images(preprocess_spec(manifest), manifest["classes"], opts.data, None, limit=8)
    run = fmt.open_runtime(path, "aotinductor", static_batch_models=extra.get("static_batch_models"))
    parity = check_parity(reference, run, images.images, "pt2 (recompiled)", manifest["max_batch"], opts.tolerance,
                          images.source)
    say(f"  pt2: max abs diff {parity['max_abs_diff']:.2g} vs {ref_key} at batch sizes {parity['batch_sizes']} "
        f"({seconds:.1f}s)")
    art.update(extra, sha256=file_sha256(path), bytes=path.stat().st_size, compiled_for=compiled_for(isa),
               parity={**parity, "reference": ref_key}, export_seconds=round(seconds, 2),
               recompiled=utc_now())
    _rewrite_manifest(folder, manifest)
    return art


def recompile_bundle(opts: RecompileOptions, say=print) -> dict:
    """Recompile the bundle's .pt2 (every member's, for an ensemble); returns the new manifest."""
    folder = manifest_path(opts.bundle).parent.resolve()
    manifest = read_manifest(folder)
    isa = resolve_isa(opts.isa)
    verify_checksums(folder, manifest)  # rewriting checksums must not bless a file changed since the export
    with staged_bundle(folder) as tmp:
        shutil.copytree(folder, tmp, copy_function=_link_or_copy, dirs_exist_ok=True)
        if manifest["kind"] == "model":
            _recompile_model(tmp, opts, isa, say)
        else:
            members = [m for m in manifest["members"] if "pt2" in read_manifest(tmp / m["path"])["artifacts"]]
            if not members:
                raise BundleError(f"{folder}: no member of the ensemble has a CPU .pt2 artifact to recompile")
            for mem in members:
                _recompile_model(tmp / mem["path"], opts, isa, say)
                mem["manifest_sha256"] = file_sha256(manifest_path(tmp / mem["path"]))
            _rewrite_manifest(tmp, manifest)
    say(f"bundle: {folder}")
    return read_manifest(folder)
