"""Helpers for the export tests (a module, not a conftest: tests/trainer imports 'conftest' by name)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_CLASSES = ["0", "1", "7"]  # the classes of the tiny_digits fixture


def write_checkpoint(path: Path, arch: str, classes=TINY_CLASSES, img_size: int = 32, seed: int = 0,
                     num_classes: int | None = None, bn_images: torch.Tensor | None = None) -> Path:
    """An untrained model saved the way trainer.engine.train._checkpoint saves a trained one.

    bn_images: (N, 3, H, W) uint8; BatchNorm running statistics are set to these images' own (one
    forward pass in train mode). Untrained mobilenet_v2/v3 and efficientnet_v2_s at 32 px otherwise give
    the same probabilities for every image (their initial statistics do not fit the activations), and a
    parity check on constant outputs proves little."""
    from trainer.data import Normalize, PreprocessSpec
    from trainer.engine.checkpoint import CHECKPOINT_FORMAT, atomic_save
    from trainer.models import create_model

    torch.manual_seed(seed)
    model = create_model(arch, len(classes), img_size).eval()
    pre = PreprocessSpec.for_size(img_size, crop_pct=1.0)
    if bn_images is not None:
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: exactly this batch's statistics
        with torch.no_grad():
            model.train()(Normalize(pre.mean, pre.std)(bn_images))
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    atomic_save({"format": CHECKPOINT_FORMAT, "arch": arch, "num_classes": num_classes or len(classes),
                 "classes": list(classes), "preprocess": pre.to_dict(), "config": {"data": "synthetic"},
                 "model": model.state_dict(), "ema": None, "epoch": 0, "best_metric": None, "best_epoch": None,
                 "best_source": "model", "metrics": {}}, path)
    return path


def cpp_formats(keys) -> list[str]:
    """The artifacts among ``keys`` (a bundle's formats) that the C++ runtime reads: TorchScript, then .pt2."""
    return [f for f in ("torchscript", "pt2") if f in keys]


def train_images(data: Path, img_size: int = 32) -> torch.Tensor:
    """(N, 3, S, S) uint8: the train split of ``data`` preprocessed as write_checkpoint's checkpoints say."""
    from trainer.data import PreprocessSpec, decode_image, eval_transform

    spec = PreprocessSpec.for_size(img_size, crop_pct=1.0)
    return torch.stack([eval_transform(decode_image(p), spec) for p in sorted((data / "train").rglob("*.png"))])


def export_cli(*args: str, capsys=None) -> tuple[int, str]:
    """Run ``python -m export ARGS`` in-process; returns (exit code, stderr)."""
    from export.cli import main

    code = main([str(a) for a in args])
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


# ---- bundle.schema.json as the key table of docs/BUNDLE.md (tests/export/test_schema_docs.py) ----------
def _resolve(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def schema_type(schema: dict, node: dict) -> str:
    if node.get("$ref", "").endswith("/sha256"):
        return "sha256 hex"
    node = _resolve(schema, node)
    if "const" in node:
        return json.dumps(node["const"])
    if "enum" in node:
        return " or ".join(json.dumps(e) for e in node["enum"])
    if "prefixItems" in node:
        return "[" + ", ".join(schema_type(schema, p) for p in node["prefixItems"]) + "]"
    t = node.get("type", "any")
    if t == "array" and "items" in node:
        return f"array of {schema_type(schema, node['items'])}"
    if t == "object" and isinstance(node.get("additionalProperties"), dict) and "properties" not in node:
        inner = _resolve(schema, node["additionalProperties"])
        return "object of " + ("artifact" if "properties" in inner else schema_type(schema, node["additionalProperties"]))
    return " or ".join(t) if isinstance(t, list) else t


def _walk(schema: dict, node: dict, prefix: str, out: dict) -> None:
    node = _resolve(schema, node)
    if node.get("type") == "array" and "items" in node:
        _walk(schema, node["items"], prefix + "[]", out)
        return
    if isinstance(node.get("additionalProperties"), dict) and "properties" in _resolve(
            schema, node["additionalProperties"]):
        _walk(schema, node["additionalProperties"], prefix + ".KEY", out)
        return
    required = set(node.get("required", ()))
    for key, sub in node.get("properties", {}).items():
        path = f"{prefix}.{key}" if prefix else key
        out[path] = ("yes" if key in required else "no", schema_type(schema, sub))
        _walk(schema, sub, path, out)


def load_schema() -> dict:
    from export.manifest import SCHEMA_FILE

    return json.loads(SCHEMA_FILE.read_text())


def schema_rows(schema: dict | None = None) -> dict[str, tuple[str, str]]:
    """key path -> (required, type) of bundle.schema.json (or ``schema``); top-level keys say which kinds
    require them."""
    schema = schema or load_schema()
    per_kind = {}
    for kind in ("model", "ensemble"):
        per_kind[kind] = {}
        _walk(schema, schema["$defs"][kind], "", per_kind[kind])
    rows = {}
    for kind, fields in per_kind.items():
        for path, (req, typ) in fields.items():
            if "." in path or "[" in path:
                rows[path] = (req, typ)
                continue
            kinds = [k for k in per_kind if per_kind[k].get(path, ("no",))[0] == "yes"]
            types = list(dict.fromkeys(per_kind[k][path][1] for k in per_kind if path in per_kind[k]))
            rows[path] = ({0: "no", 1: kinds[0] if kinds else "no", 2: "both"}[len(kinds)], " or ".join(types))
    return rows


def undocumented_keys(manifest: dict) -> list[str]:
    """Key paths of a written manifest that bundle.schema.json (and so docs/BUNDLE.md's table) lacks: the
    schema leaves artifact entries, provenance and metrics open, so validation alone would not notice."""
    rows, missing = schema_rows(), []

    def walk(obj: dict, prefix: str) -> None:
        for key, value in obj.items():
            path = f"{prefix}.{key}" if prefix else key
            if prefix == "artifacts":
                walk(value, "artifacts.KEY")
                continue
            if path not in rows:
                missing.append(path)
            elif isinstance(value, dict) and rows[path][1] in ("object", "object of artifact"):
                walk(value, path)
            elif isinstance(value, list) and rows[path][1] == "array of object":
                for item in value:
                    walk(item, path + "[]")

    walk(manifest, "")
    return sorted(set(missing))
