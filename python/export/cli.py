"""Command line: ``python -m export --help``.

    python -m export --checkpoint runs/digits/best.pt --format all --out bundles/digits --data data/digits
    python -m export --checkpoint runs/digits/best.pt --format all --out bundles/digits --data data/digits \
        --device cuda --precision fp32 fp16       # + TorchScript and .pt2 compiled for the GPU (docs/export.md)
    python -m export --checkpoint runs/digits/best.pt --format onnx --quantize int8 \
        --calibration data/digits/train --data data/digits --out bundles/digits-int8
    python -m export --checkpoint runs/digits/best.pt --format onnx --verify-precision bf16 --data data/digits \
        --out bundles/digits     # bf16 top-1 measured (OpenVINO) and recorded: precision auto may then run bf16
    python -m export ensemble --members bundles/a bundles/b --fusion mean --out bundles/ab
    python -m export triton bundles/digits --out models        # Triton model repository: models/digits/
    python -m export --checkpoint runs/digits/best.pt --format triton --triton-repo models --out bundles/digits
    python -m export inspect bundles/digits
    python -m export verify bundles/digits [--data data/digits] [--trusted-key keys/bundle-signing.pub]
    python -m export recompile bundles/digits [--isa avx2]   # the .pt2 again, for this machine's CPU and torch
    python -m export keygen --out keys/            # Ed25519 pair: bundle-signing.key (0600), bundle-signing.pub
    python -m export sign bundles/digits --key keys/bundle-signing.key     # writes bundles/digits/signature.json

Exit codes: 0 success, 1 an artifact failed its parity check or int8 lost more top-1 than
--max-accuracy-drop (nothing written), 2 a user error
(missing or corrupt checkpoint, unknown format, tampered bundle, ...), printed without a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings

COMMANDS = ("ensemble", "inspect", "triton", "verify", "recompile", "keygen", "sign")


def _export_parser() -> argparse.ArgumentParser:
    from .portable import ISA_CHOICES

    p = argparse.ArgumentParser(prog="python -m export", description="Build a verified bundle from a checkpoint. "
                                "Other commands: python -m export {ensemble,inspect,triton,verify,recompile,keygen,sign} --help")
    p.add_argument("--checkpoint", required=True, help="training checkpoint (RUN/best.pt or a run directory)")
    p.add_argument("--out", required=True, help="bundle folder to create")
    p.add_argument("--format", nargs="+", default=["all"],
                   help="torchscript, onnx, pt2 or all (several allowed); triton: also write a Triton model from "
                        "model.onnx into --triton-repo")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset")
    p.add_argument("--max-batch", type=int, default=64, help="largest batch the artifacts accept (>= 2)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (default: whichever validated best)")
    p.add_argument("--weights", choices=["auto", "model", "ema"], default=None, help="which weights to export")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="check every artifact against eager PyTorch (default on)")
    p.add_argument("--quantize", choices=["int8"], default=None, help="also write model.int8.onnx")
    p.add_argument("--calibration", help="folder of calibration images for --quantize (e.g. DATA/train)")
    p.add_argument("--calibration-count", type=int, default=256, help="calibration images to use")
    p.add_argument("--calibration-method", choices=["minmax", "entropy", "percentile"], default="minmax",
                   help="how --quantize int8 picks activation ranges (onnxruntime CalibrationMethod)")
    p.add_argument("--max-accuracy-drop", type=float, default=1.0, metavar="POINTS",
                   help="--quantize int8 and --verify-precision bf16 fail (exit 1, no bundle) when their top-1 on the "
                        "labelled validation images is more than this many percentage points below fp32")
    p.add_argument("--verify-precision", nargs="+", default=[], metavar="P", choices=["bf16"],
                   help="bf16: measure model.onnx in bf16 (OpenVINO, on this CPU's native bf16) against fp32 on the "
                        "--data validation images (top-1, probability gap) and record it in the manifest; only such "
                        "a bundle runs bf16 under precision auto (loader, server). Needs a CPU with AVX-512 BF16 or AMX")
    p.add_argument("--data", help="dataset whose validation split verifies the bundle and scores int8")
    p.add_argument("--name", help="bundle name (default: <dataset>-<architecture>)")
    p.add_argument("--tta", default="none", help="default TTA policy written into the manifest")
    p.add_argument("--tta-merge", default="mean", help="mean, max or vote")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs probability difference allowed")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON at the end")
    p.add_argument("--pt2-static-batches", type=int, nargs="*", default=[1], metavar="N",
                   help=".pt2 also holds a model compiled for exactly these batch sizes (weights prepacked: "
                        "resnet50 batch 1 on CPU 40 vs 58 ms; each adds the weights once more). Default 1; "
                        "give no value to compile only the dynamic-batch model")
    p.add_argument("--pt2-isa", default="auto", choices=ISA_CHOICES,
                   help="CPUs the .pt2 is compiled for: avx2 (x86-64-v3, Haswell/Zen 1 and later), avx512 "
                        "(x86-64-v4), default (x86-64-v2, scalar kernels), native (only CPUs like this one; "
                        "inductor's default) or auto (avx2 where this CPU has it). Recorded in the manifest; "
                        "readers skip a .pt2 this CPU cannot run")
    p.add_argument("--pt2-program", action=argparse.BooleanOptionalAction, default=True,
                   help="ship the ExportedProgram next to the .pt2 (model.program.pt2, one more copy of the weights) "
                        "so 'python -m export recompile' can rebuild it on another machine (default on)")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda or cuda:N. cuda also writes TorchScript and .pt2 compiled for that GPU next to the "
                        "CPU artifacts, and checks model.onnx on the CUDA execution provider")
    p.add_argument("--precision", nargs="+", default=["fp32"], metavar="P",
                   help="precisions of the CUDA artifacts: fp32, fp16, bf16 (several allowed; --device cuda only)")
    p.add_argument("--cuda-tolerance", type=float, default=1e-3,
                   help="max abs probability difference of fp32 CUDA artifacts vs eager fp32 on the GPU (TF32 "
                        "convolutions: looser than --tolerance)")
    p.add_argument("--half-tolerance", type=float, default=None,
                   help="the same for fp16/bf16 variants (default fp16 1e-2, bf16 5e-2); their top-1 on the "
                        "validation images is checked too")
    p.add_argument("--triton-repo", metavar="REPO",
                   help="with --format triton: the Triton model repository to add the model to (REPO/NAME/); "
                        "--device cuda makes it a KIND_GPU model. 'python -m export triton --help' has the tuning "
                        "flags")
    return p


def _cmd_export(argv) -> int:
    from .build import ExportOptions, build_bundle
    from .manifest import BundleError

    a = _export_parser().parse_args(argv)
    weights = a.weights or ("ema" if a.ema else "auto")
    triton = _triton_target(a)
    formats = [f for f in a.format if f != "triton"]
    opts = ExportOptions(checkpoint=a.checkpoint, out=a.out, formats=formats, opset=a.opset,
                         max_batch=a.max_batch, weights=weights, verify=a.verify, quantize=a.quantize,
                         calibration=a.calibration, calibration_count=a.calibration_count, data=a.data,
                         calibration_method=a.calibration_method, max_accuracy_drop=a.max_accuracy_drop,
                         name=a.name, tta=a.tta, tta_merge=a.tta_merge, tolerance=a.tolerance, force=a.force,
                         pt2_static_batches=sorted(set(a.pt2_static_batches)), pt2_isa=a.pt2_isa,
                         pt2_program=a.pt2_program, device=a.device,
                         precisions=list(dict.fromkeys(a.precision)), cuda_tolerance=a.cuda_tolerance,
                         half_tolerance=a.half_tolerance, verify_precisions=list(dict.fromkeys(a.verify_precision)))
    out, manifest = build_bundle(opts)
    if triton:
        from .triton_repo import write_triton_model

        triton.bundle = str(out)
        try:
            write_triton_model(triton)
        except BundleError as exc:
            raise BundleError(f"the bundle {out} was written, but not the Triton model: {exc}") from None
    if a.json:
        print(json.dumps(manifest, indent=2))
    return 0


def _triton_target(a):
    """TritonOptions for --format triton, checked before the export starts (a taken --name fails fast)."""
    from .manifest import BundleError

    if "triton" not in a.format:
        if a.triton_repo:
            raise BundleError("--triton-repo is only used with --format triton (e.g. --format all triton)")
        return None
    from .triton_repo import TritonOptions, model_folder

    if not a.triton_repo:
        raise BundleError("--format triton needs --triton-repo REPO: the Triton model repository to write the model "
                          "into (or run 'python -m export triton BUNDLE --out REPO' on an existing bundle)")
    if "onnx" not in a.format and "all" not in a.format:
        a.format.append("onnx")  # Triton serves model.onnx
    opts = TritonOptions(bundle=a.out, repository=a.triton_repo, name=a.name, device=a.device, force=a.force)
    if a.name:  # otherwise the name comes from the checkpoint, known only once the export has read it
        model_folder(opts, {"name": a.name})
    return opts


def _cmd_triton(argv) -> int:
    from .triton_repo import DEFAULT_QUEUE_DELAY_US, TritonOptions, write_triton_model

    p = argparse.ArgumentParser(prog="python -m export triton", description="Write a Triton Inference Server model "
                                "repository entry (REPO/NAME/config.pbtxt, 1/model.onnx, labels.txt) from a bundle; "
                                "serve it with: tritonserver --model-repository=REPO")
    p.add_argument("bundle", help="a model bundle with model.onnx (ensembles are refused: add each member)")
    p.add_argument("--out", required=True, metavar="REPO", help="model repository folder (created if missing; other "
                   "models in it are left alone)")
    p.add_argument("--name", help="Triton model name (default: the bundle's name)")
    p.add_argument("--int8", action="store_true", help="serve model.int8.onnx instead of model.onnx")
    p.add_argument("--device", default="cpu", help="cpu (KIND_CPU), cuda (KIND_GPU on every GPU) or cuda:N (GPU N); "
                   "no GPU is needed to write the repository")
    p.add_argument("--instances", type=int, default=1, help="model instances (per GPU with cuda)")
    p.add_argument("--preferred-batch-sizes", type=int, nargs="*", default=None, metavar="N",
                   help="dynamic batching's preferred sizes (default: 4, 8, 16, ... up to the bundle's max_batch; "
                        "give no value to leave them out)")
    p.add_argument("--max-queue-delay-us", type=int, default=DEFAULT_QUEUE_DELAY_US,
                   help="longest wait for a batch to fill, microseconds")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads per instance (default: Triton's)")
    p.add_argument("--force", action="store_true", help="replace an existing model folder of that name")
    a = p.parse_args(argv)
    write_triton_model(TritonOptions(bundle=a.bundle, repository=a.out, name=a.name, int8=a.int8, device=a.device,
                                     instances=a.instances, preferred_batch_sizes=a.preferred_batch_sizes,
                                     max_queue_delay_us=a.max_queue_delay_us, threads=a.threads, force=a.force))
    return 0


def _cmd_ensemble(argv) -> int:
    from .ensemble import build_ensemble

    p = argparse.ArgumentParser(prog="python -m export ensemble", description="Combine model bundles into one.")
    p.add_argument("--members", nargs="+", required=True, help="member bundle folders")
    p.add_argument("--weights", nargs="+", type=float, help="one positive weight per member (fusion weighted/vote)")
    p.add_argument("--fusion", default="mean", help="mean, weighted or vote")
    p.add_argument("--out", required=True)
    p.add_argument("--name")
    p.add_argument("--tta", default="none", help="default TTA policy for the ensemble")
    p.add_argument("--tta-merge", default="mean")
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    build_ensemble(a.members, a.out, a.weights, a.fusion, a.name, a.tta, a.tta_merge, a.force)
    return 0


def _cmd_inspect(argv) -> int:
    from .audit import describe
    from .manifest import read_manifest

    p = argparse.ArgumentParser(prog="python -m export inspect", description="Print a bundle's manifest summary.")
    p.add_argument("bundle")
    p.add_argument("--json", action="store_true", help="print the raw manifest")
    a = p.parse_args(argv)
    m = read_manifest(a.bundle)
    print(json.dumps(m, indent=2) if a.json else describe(m))
    return 0


def _cmd_verify(argv) -> int:
    from .audit import verify_bundle

    p = argparse.ArgumentParser(prog="python -m export verify", description="Re-check checksums and parity.")
    p.add_argument("bundle")
    p.add_argument("--data", help="dataset whose validation images to compare on (default: synthetic batch)")
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--trusted-key", dest="trusted_keys", action="append", default=[], metavar="PUB",
                   help="also require a signature by one of these Ed25519 public keys (PEM; repeatable)")
    a = p.parse_args(argv)
    verify_bundle(a.bundle, a.data, a.tolerance, trusted_keys=a.trusted_keys)
    print("verify: ok")
    return 0


def _cmd_recompile(argv) -> int:
    from .portable import ISA_CHOICES
    from .recompile import RecompileOptions, recompile_bundle

    p = argparse.ArgumentParser(prog="python -m export recompile",
                                description="Compile the bundle's .pt2 again on this machine from the ExportedProgram "
                                            "it ships, check it against the bundle's TorchScript/ONNX, replace it.")
    p.add_argument("bundle")
    p.add_argument("--isa", default="auto", choices=ISA_CHOICES, help="CPUs to compile for (as --pt2-isa of export)")
    p.add_argument("--data", help="dataset whose validation images to compare on (default: synthetic batch)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs probability difference allowed")
    a = p.parse_args(argv)
    recompile_bundle(RecompileOptions(a.bundle, a.isa, a.data, a.tolerance))
    return 0


def _cmd_keygen(argv) -> int:
    from .signing import generate_keypair, key_id, load_public_key

    p = argparse.ArgumentParser(prog="python -m export keygen", description="Make an Ed25519 key pair for signing "
                                "bundles. Keep the private key off the serving machines; give them the .pub file.")
    p.add_argument("--out", required=True, help="folder for bundle-signing.key (mode 0600) and bundle-signing.pub")
    p.add_argument("--force", action="store_true", help="replace an existing key pair")
    a = p.parse_args(argv)
    priv, pub = generate_keypair(a.out, a.force)
    print(f"private key {priv} (keep it secret), public key {pub} (key id {key_id(load_public_key(pub))})")
    return 0


def _cmd_sign(argv) -> int:
    from .signing import sign_bundle

    p = argparse.ArgumentParser(prog="python -m export sign", description="Sign a bundle's manifest.json (Ed25519); "
                                "writes signature.json next to it. Sign after every change to the bundle.")
    p.add_argument("bundle")
    p.add_argument("--key", required=True, help="private key file from 'python -m export keygen'")
    a = p.parse_args(argv)
    print(f"signed: {sign_bundle(a.bundle, a.key)}")
    return 0


def main(argv=None) -> int:
    from trainer.data import DataError
    from trainer.engine.checkpoint import CheckpointError
    from trainer.tta import TTAError

    from .manifest import BundleError
    from .verify import ParityError

    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    warnings.filterwarnings("ignore", module="onnxscript")  # exporter chatter, not about our graph
    commands = {"ensemble": _cmd_ensemble, "inspect": _cmd_inspect, "triton": _cmd_triton, "verify": _cmd_verify,
                "recompile": _cmd_recompile, "keygen": _cmd_keygen, "sign": _cmd_sign}
    cmd = commands.get(argv[0] if argv else "")
    try:
        return cmd(argv[1:]) if cmd else _cmd_export(argv)
    except (BundleError, CheckpointError, DataError, TTAError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ParityError as exc:
        print(f"verification failed: {exc}", file=sys.stderr)
        return 1
