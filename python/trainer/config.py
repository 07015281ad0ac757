"""One typed training config: dataclass defaults < --config YAML < --resume checkpoint < flags.

The resolved config is written to the run directory (config.yaml) and into every checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserError


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # data
    data: str = _f("data/digits", "dataset root: train/ + val/ class folders, a folder of class "
                   "folders (with --val-fraction), or train.txt/val.txt list files")
    val_fraction: float | None = _f(None, "hold out this fraction of each class for validation "
                                    "(layouts without a validation split)")
    on_bad_image: str = _f("error", "unreadable images: 'error' stops with the list of them (at start-up from "
                           "file headers, or at the end of the epoch that found them); 'skip' leaves them out "
                           "and lists them in RUN/bad_images.txt", choices=["error", "skip"])
    cache_images: str = _f("auto", "keep decoded images in memory: auto (when their header sizes fit in "
                           "1 GiB; decoded before the first step), on, off", choices=["auto", "on", "off"])
    workers: int = _f(-1, "data-loading worker processes (-1: one per spare core)")
    # model
    model: str = _f("resnet18", "architecture ('python -m trainer models' lists them)")
    pretrained: str | None = _f(None, "start from pretrained weights: a name ('imagenet': the library's default "
                                "ImageNet weights; a torchvision weight set such as IMAGENET1K_V2; 'advprop' for "
                                "efficientnet-pytorch; a timm tag), fetched once into the library's cache "
                                "($TORCH_HOME, Hugging Face's for timm); or a local state dict file")
    freeze_backbone: bool = _f(False, "train only the classifier head at first")
    unfreeze_at: int | None = _f(None, "epoch (0-based) at which a frozen backbone starts training")
    # input and augmentation; unset eval preprocessing comes from the named --pretrained weights' own
    # transforms, else 224 px / 0.875 / bilinear / ImageNet mean and std (see preprocessing_defaults)
    img_size: int | None = _f(None, "square input size in pixels (default: the named weights' crop size, else 224)")
    crop_pct: float | None = _f(None, "eval: resize the shorter side to img_size / crop_pct, then center-crop "
                                "(default: the named weights', else 0.875)")
    interpolation: str | None = _f(None, "resize interpolation (default: the named weights', else bilinear)",
                                   choices=["bilinear", "bicubic"])
    mean: list[float] | None = _f(None, "per-channel mean (RGB, 0..1; default: the named weights', else ImageNet's)",
                                  nargs=3)
    std: list[float] | None = _f(None, "per-channel std (RGB, 0..1; default: the named weights', else ImageNet's)",
                                 nargs=3)
    scale_min: float = _f(0.08, "random-resized-crop: smallest area fraction")
    hflip: float = _f(0.5, "probability of a horizontal flip")
    vflip: float = _f(0.0, "probability of a vertical flip")
    auto_augment: str = _f("none", "augmentation policy", choices=["none", "randaugment", "trivialaugment"])
    random_erasing: float = _f(0.0, "probability of random erasing")
    mixup: float = _f(0.0, "mixup alpha (0: off)")
    cutmix: float = _f(0.0, "cutmix alpha (0: off)")
    mix_prob: float = _f(1.0, "probability of applying mixup/cutmix to a batch")
    # optimisation
    epochs: int = _f(30, "number of epochs")
    batch_size: int = _f(64, "batch size per process")
    optimizer: str = _f("sgd", "optimizer", choices=["sgd", "adamw"])
    lr: float = _f(0.1, "peak learning rate")
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(False, "Nesterov momentum (SGD)")
    weight_decay: float = _f(5e-4, "weight decay (not applied to norm and bias parameters)")
    scheduler: str = _f("cosine", "lr schedule after warmup", choices=["cosine", "step"])
    warmup_epochs: float = _f(1.0, "linear warmup length in epochs")
    warmup_lr: float = _f(1e-4, "learning rate at the start of warmup")
    min_lr: float = _f(1e-5, "final learning rate of the cosine schedule")
    milestones: list[int] = _f((), "step schedule: epochs at which lr is multiplied by gamma", nargs="*")
    gamma: float = _f(0.1, "step schedule: lr factor at each milestone")
    label_smoothing: float = _f(0.0, "label smoothing epsilon")
    class_weights: str = _f("none", "'auto': weight the loss by inverse class frequency",
                            choices=["none", "auto"])
    balanced_sampler: bool = _f(False, "sample classes uniformly (with replacement)")
    clip_grad: float | None = _f(None, "clip the gradient norm to this value")
    accum_steps: int = _f(1, "accumulate gradients over this many batches per optimizer step")
    ema: bool = _f(False, "keep an exponential moving average of the weights (evaluated and saved)")
    ema_decay: float = _f(0.999, "EMA decay per optimizer step")
    patience: int | None = _f(None, "stop after this many epochs without a better validation top-1")
    # speed
    amp: str = _f("auto", "mixed precision: auto (bf16 on CPUs with bf16 support and on CUDA; fp16 on "
                  "older GPUs), bf16, fp16 (CUDA), none", choices=["auto", "bf16", "fp16", "none"])
    channels_last: bool = _f(True, "use channels-last memory format")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N", )
    threads: int | None = _f(None, "intra-op CPU threads (default: torch's choice)")
    sync_bn: bool = _f(False, "DDP: synchronise BatchNorm statistics across processes (small per-GPU batches)")
    compile: bool = _f(False, "run the model through torch.compile (slow first steps, faster after)")
    log_every: int = _f(50, "when output is not a terminal, print loss, images/s and ETA every N batches")
    # reproducibility and output
    seed: int = _f(0, "random seed (data order, augmentation, init)")
    deterministic: bool = _f(False, "use deterministic algorithms (bit-exact resume)")
    out: str = _f("runs/latest", "run directory (checkpoints, metrics, plots, report)")
    resume: str | None = _f(None, "continue the run in this directory from its last.pt")
    overwrite: bool = _f(False, "start over in --out even if it holds an earlier run (its files are replaced)")
    quiet: bool = _f(False, "print nothing but errors")
    max_steps: int | None = _f(None, "stop after this many optimizer steps (0 or unset: no limit; for tests and profiling)")

    def with_preprocessing_defaults(self) -> "TrainConfig":
        """This config with unset preprocessing filled in (from the named --pretrained weights' transforms)."""
        unset = [k for k in ("img_size", "crop_pct", "interpolation", "mean", "std") if getattr(self, k) is None]
        if not unset:
            return self
        from .models import get_spec, preprocessing_defaults

        defaults = preprocessing_defaults(get_spec(self.model), self.pretrained)
        return dataclasses.replace(self, **{k: defaults[k] for k in unset})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"{source}: unknown setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


def load_yaml(path: str | Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise UserError(f"config file '{path}' not found") from None
    except yaml.YAMLError as exc:
        raise UserError(f"config file '{path}' is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a mapping of setting: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def add_config_arguments(parser: argparse.ArgumentParser, cls=TrainConfig) -> None:
    """One flag per dataclass field; every flag defaults to None so we know what was given."""
    parser.add_argument("--config", help="YAML file of settings; flags override it")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        helptext = meta.pop("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        helptext = f"{helptext} (default: {default})"
        if f.type in ("bool", bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=helptext)
            continue
        typ = {"int": int, "float": float, "str": str, "int | None": int, "float | None": float,
               "str | None": str, "list[float]": float, "list[float] | None": float, "list[int]": int, "list[str]": str}[str(f.type)]
        parser.add_argument(flag, dest=f.name, type=typ, default=None, help=helptext, **meta)


def resolve_config(args: argparse.Namespace, base: dict | None = None, cls=TrainConfig):
    """dataclass defaults < YAML (--config) < base (e.g. the resumed run's config) < given flags."""
    merged: dict = {}
    if getattr(args, "config", None):
        merged.update(load_yaml(args.config))
    if base:
        merged.update(base)
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            merged[f.name] = v
    return cls.from_dict(merged, source=getattr(args, "config", None) or "settings")


def write_config(cfg, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    tmp.replace(path)
