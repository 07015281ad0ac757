"""``python -m export inspect BUNDLE`` and ``python -m export verify BUNDLE``.

inspect prints what a bundle holds; verify re-checks an existing bundle: the sha256 of every file,
the ONNX files' metadata against the manifest (export.onnx_metadata), then parity of every artifact
against a reference, at batch sizes 1, 2 and an odd size. The reference is eager PyTorch rebuilt
from the source checkpoint when the manifest's checkpoint is still on this machine with the same
sha256, otherwise the bundle's first fp32 artifact (torchscript, onnx, pt2 in that order), so that
every format is at least checked against the others. Artifacts compiled for CUDA run on the GPU when
there is one (within the tolerance recorded at export), and are reported as not run otherwise: their
sha256 is still checked.
"""
from __future__ import annotations

from pathlib import Path

from . import loader
from .formats import open_runtime
from .devices import cuda_device_count
from .manifest import (BundleError, artifact_device, artifact_precision, manifest_path, preprocess_spec, read_artifact,
                       read_manifest_bytes, verify_checksums)
from .onnx_metadata import metadata_mismatches
from .portable import pt2_problem, pt2_refusal
from .signing import check_signature, trust_policy
from .samples import validation_images
from .verify import ParityError, check_parity

FP32_ORDER = ("torchscript", "onnx", "pt2")


def describe(manifest: dict) -> str:
    lines = [f"{manifest['kind']} bundle '{manifest['name']}' version {manifest['version']} "
             f"(schema {manifest['schema_version']})",
             f"classes ({len(manifest['classes'])}): {', '.join(manifest['classes'][:20])}"
             + (" ..." if len(manifest["classes"]) > 20 else ""),
             f"TTA: {manifest['tta']['default']} ({len(manifest['tta']['views'])} views, merge "
             f"{manifest['tta']['merge']})"]
    if manifest["kind"] == "ensemble":
        lines.append(f"fusion: {manifest['fusion']}")
        lines += [f"  member {m['name']}: {m['path']} weight {m['weight']}" for m in manifest["members"]]
        return "\n".join(lines)
    pre = manifest["preprocessing"]
    lines += [f"architecture: {manifest['architecture']}   input: {manifest['input']['dtype']} "
              f"{manifest['input']['shape']}   output: {manifest['output']['name']} {manifest['output']['shape']}"
              f"   max batch: {manifest['max_batch']}",
              f"preprocessing: resize shorter side to {pre['resize_size']} ({pre['interpolation']}), "
              f"center crop {pre['crop_size']}, mean {pre['mean']} std {pre['std']} (in graph)"]
    for key, art in manifest["artifacts"].items():
        par = art.get("parity") or {}
        check = (f"max abs diff {par['max_abs_diff']:.2g} at batch {par['batch_sizes']}" if par else "not verified")
        where = "" if artifact_device(art) == "cpu" else f"  [{artifact_device(art)} {artifact_precision(art)}, " \
            f"{(art.get('compiled_for') or {}).get('gpu', '?')}]"
        lines.append(f"  {key:12s} {art['file']:16s} {art['bytes'] / 1e6:8.2f} MB  sha256 {art['sha256'][:12]}  "
                     f"{check}  export {art.get('export_seconds', '?')}s{where}")
        cpu = art.get("compiled_for") or {}
        if "cpu_isa" in cpu:
            lines.append(f"  {'':12s} compiled for {cpu['cpu_isa']} CPUs (-march={cpu.get('march')}), torch "
                         f"{cpu.get('torch')}" + (f", recompiled {art['recompiled']}" if art.get("recompiled") else ""))
        if art.get("parity_cuda"):
            lines.append(f"  {'':12s} on the CUDA execution provider: max abs diff "
                         f"{art['parity_cuda']['max_abs_diff']:.2g}")
        q = art.get("quantization")
        if q and "top1_fp32" in q:
            gate = (f", {q['top1_drop']:.2f} points lost (allowed {q['max_accuracy_drop']:g})"
                    if "top1_drop" in q else "")  # bundles made before the gate existed
            lines.append(f"  {'':12s} int8 top-1 {q['top1_int8']:.4f} vs fp32 {q['top1_fp32']:.4f} on "
                         f"{q['validation_images']} images ({q['validation_source']}){gate}; calibration "
                         f"{q.get('calibrate_method', 'MinMax')} on {q['calibration_images']} images")
    prov, met = manifest["provenance"], manifest.get("metrics") or {}
    lines.append(f"provenance: torch {prov.get('torch')}, checkpoint {prov.get('checkpoint')} "
                 f"({prov.get('weights')} weights), created {prov.get('created')}")
    if met.get("val_top1") is not None:
        lines.append(f"metrics: validation top-1 {met['val_top1']:.4f} (epoch {met.get('best_epoch')})")
    return "\n".join(lines)


def verify_bundle(bundle: str, data: str | None = None, tol: float = 1e-4, say=print, trusted_keys=()) -> dict:
    """Signature (when trusted_keys are given: then required), checksums, then parity of every artifact;
    raises BundleError / ParityError on failure."""
    folder = manifest_path(bundle).parent
    manifest, raw = read_manifest_bytes(folder)
    if trusted_keys:
        say(f"{folder}: signature ok (key {check_signature(folder, raw, trust_policy(trusted_keys, True))})")
    checked = verify_checksums(folder, manifest)
    say(f"{folder}: sha256 ok for {len(checked)} artifact(s)")
    if manifest["kind"] == "ensemble":
        return {m["name"]: verify_bundle(str(folder / m["path"]), data, tol, say) for m in manifest["members"]}
    _check_onnx_metadata(folder, manifest)
    spec = preprocess_spec(manifest)
    images = validation_images(spec, manifest["classes"], data, None, limit=8)
    try:
        reference, ref_name = loader.load_bundle(folder, "eager")._run, "eager (source checkpoint)"
    except BundleError:
        key = next((k for k in FP32_ORDER if k in manifest["artifacts"] and not pt2_problem(manifest["artifacts"][k])),
                   None)
        if key is None:
            raise BundleError(f"{folder}: no fp32 artifact and no source checkpoint to compare against") from None
        art = manifest["artifacts"][key]
        reference = open_runtime(read_artifact(folder, manifest, key), art["format"],
                                 static_batch_models=art.get("static_batch_models"))
        ref_name = key
    report = {"reference": ref_name, "images": images.source, "artifacts": {}}
    for key, art in manifest["artifacts"].items():
        if artifact_device(art) == "cuda":
            if not cuda_device_count():
                say(f"  {key}: compiled for CUDA, not run (no GPU here; its sha256 was checked)")
                continue
            report["artifacts"][key] = _verify_cuda(reference, read_artifact(folder, manifest, key), images,
                                                    manifest["max_batch"], tol)
            say(f"  {key}: max abs diff {report['artifacts'][key]['max_abs_diff']:.2g} vs {ref_name} on cuda:0")
            continue
        reason = pt2_problem(art, str(folder))
        if reason:
            say(f"  {key}: not run ({pt2_refusal(reason, folder)}; its sha256 was checked)")
            continue
        run = open_runtime(read_artifact(folder, manifest, key), art["format"],
                           static_batch_models=art.get("static_batch_models"))
        res = check_parity(reference, run, images.images, key, manifest["max_batch"],
                           None if key == "onnx_int8" else tol, images.source)
        report["artifacts"][key] = res
        say(f"  {key}: max abs diff {res['max_abs_diff']:.2g} vs {ref_name}, top-1 "
            f"{'agrees' if res['top1_agree'] else 'DIFFERS'} (batch sizes {res['batch_sizes']})")
    return report


def _check_onnx_metadata(folder: Path, manifest: dict) -> None:
    for key, art in manifest["artifacts"].items():
        if art["format"] == "onnx":
            bad = metadata_mismatches(folder / art["file"], manifest)
            if bad:
                raise BundleError(f"{folder}/{art['file']}: its metadata {bad} differ from {folder}/manifest.json; the "
                                  "manifest was edited after export: restore it or re-export the bundle")


def _verify_cuda(reference, verified, images, max_batch: int, tol: float) -> dict:
    """A CUDA artifact against the CPU reference, within the tolerance its export recorded (TF32, fp16)."""
    key, art = verified.key, verified.entry
    run = open_runtime(verified, art["format"], device="cuda:0",
                       static_batch_models=art.get("static_batch_models"))
    allowed = max(tol, (art.get("parity") or {}).get("tolerance", tol))
    res = check_parity(reference, run, images.images, key, max_batch, None, images.source)
    if not res["max_abs_diff"] <= allowed:
        raise ParityError(f"{key}: max abs probability difference {res['max_abs_diff']:.3g} on cuda:0 (allowed "
                          f"{allowed:g}, the tolerance of its export); re-export the bundle on this GPU")
    return res
