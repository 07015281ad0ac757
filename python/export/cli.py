"""Command line: ``python -m export --help``.

    python -m export --checkpoint runs/digits/best.pt --format all --out bundles/digits --data data/digits
    python -m export --checkpoint runs/digits/best.pt --format all --out bundles/digits --data data/digits \
        --device cuda --precision fp32 fp16       # + TorchScript and .pt2 compiled for the GPU (docs/export.md)
    python -m export --checkpoint runs/digits/best.pt --format onnx --quantize int8 \
        --calibration data/digits/train --data data/digits --out bundles/digits-int8
    python -m export ensemble --members bundles/a bundles/b --fusion mean --out bundles/ab
    python -m export inspect bundles/digits
    python -m export verify bundles/digits [--data data/digits] [--trusted-key keys/bundle-signing.pub]
    python -m export keygen --out keys/            # Ed25519 pair: bundle-signing.key (0600), bundle-signing.pub
    python -m export sign bundles/digits --key keys/bundle-signing.key     # writes bundles/digits/signature.json

Exit codes: 0 success, 1 an artifact failed its parity check (nothing written), 2 a user error
(missing or corrupt checkpoint, unknown format, tampered bundle, ...), printed without a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings

COMMANDS = ("ensemble", "inspect", "verify", "keygen", "sign")


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description="Build a verified bundle from a checkpoint. "
                                "Other commands: python -m export {ensemble,inspect,verify,keygen,sign} --help")
    p.add_argument("--checkpoint", required=True, help="training checkpoint (RUN/best.pt or a run directory)")
    p.add_argument("--out", required=True, help="bundle folder to create")
    p.add_argument("--format", nargs="+", default=["all"], help="torchscript, onnx, pt2 or all (several allowed)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset")
    p.add_argument("--max-batch", type=int, default=64, help="largest batch the artifacts accept (>= 2)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (default: whichever validated best)")
    p.add_argument("--weights", choices=["auto", "model", "ema"], default=None, help="which weights to export")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="check every artifact against eager PyTorch (default on)")
    p.add_argument("--quantize", choices=["int8"], default=None, help="also write model.int8.onnx")
    p.add_argument("--calibration", help="folder of calibration images for --quantize (e.g. DATA/train)")
    p.add_argument("--calibration-count", type=int, default=256, help="calibration images to use")
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
    return p


def _cmd_export(argv) -> int:
    from .build import ExportOptions, build_bundle

    a = _export_parser().parse_args(argv)
    weights = a.weights or ("ema" if a.ema else "auto")
    opts = ExportOptions(checkpoint=a.checkpoint, out=a.out, formats=a.format, opset=a.opset,
                         max_batch=a.max_batch, weights=weights, verify=a.verify, quantize=a.quantize,
                         calibration=a.calibration, calibration_count=a.calibration_count, data=a.data,
                         name=a.name, tta=a.tta, tta_merge=a.tta_merge, tolerance=a.tolerance, force=a.force,
                         pt2_static_batches=sorted(set(a.pt2_static_batches)), device=a.device,
                         precisions=list(dict.fromkeys(a.precision)), cuda_tolerance=a.cuda_tolerance,
                         half_tolerance=a.half_tolerance)
    _, manifest = build_bundle(opts)
    if a.json:
        print(json.dumps(manifest, indent=2))
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
    cmd = {"ensemble": _cmd_ensemble, "inspect": _cmd_inspect, "verify": _cmd_verify, "keygen": _cmd_keygen,
           "sign": _cmd_sign}.get(argv[0] if argv else "")
    try:
        return cmd(argv[1:]) if cmd else _cmd_export(argv)
    except (BundleError, CheckpointError, DataError, TTAError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ParityError as exc:
        print(f"verification failed: {exc}", file=sys.stderr)
        return 1
