"""Knowledge distillation: a student trained against frozen teacher(s), through the normal training loop.

    python -m trainer distill --teacher runs/r18/best.pt --model mobilenet_v3_small --kd-alpha 0.7 \
        --kd-temperature 4 --data data/digits --img-size 32 --crop-pct 1.0 --hflip 0 --epochs 8 --out runs/kd

Loss (Hinton et al.): ``(1 - a) * CE(y, s) + a * T^2 * KL(p_t || softmax(s / T))`` with the KL averaged
over the batch, where ``p_t`` is the teacher's ``softmax(t / T)`` (for several teachers, the mean of
their tempered probabilities). ``CE(y, s)`` is the loop's own loss, so label smoothing, mixup/cutmix
and class weights still apply to it. With ``--kd-hard`` (DeiT's hard-label distillation, here on the
student's single head) the second term is ``a * CE(argmax p_t, s)`` and T is not used.

Teacher input: each teacher sees *the student's augmented batch* (the same random crop, flip and
mixup), converted to the teacher's own normalisation and resized to the teacher's input size. It
must be the same view: distillation matches the student to the teacher on identical pixels; a
separate teacher pipeline would re-crop the image and produce targets for a different picture.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import TrainConfig, _f
from .losses import soft_cross_entropy
from .runtime import autocast
from ..errors import UserError


def kd_loss(student_logits: torch.Tensor, teacher_probs_t: torch.Tensor, targets: torch.Tensor, alpha: float,
            temperature: float, hard: bool = False, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """student_logits (N, K); teacher_probs_t (N, K): teacher probabilities at temperature T (hard: at T=1 or
    any T, only the argmax is used); targets (N, K) soft label targets for the CE term."""
    s = student_logits.float()
    ce = soft_cross_entropy(s, targets, class_weights)
    if hard:
        kd = F.cross_entropy(s, teacher_probs_t.argmax(1))
    else:
        log_s = F.log_softmax(s / temperature, dim=1)
        # KL(p_t || p_s) = sum p_t (log p_t - log p_s); 'batchmean' divides by N (the true KL mean)
        kd = F.kl_div(log_s, teacher_probs_t.float(), reduction="batchmean") * temperature ** 2
    return (1.0 - alpha) * ce + alpha * kd


@dataclass
class DistillConfig(TrainConfig):
    """TrainConfig plus the distillation settings (so config.yaml and checkpoints carry them, and resume works)."""
    teacher: list[str] = _f((), "teacher checkpoint(s); several are an ensemble (mean of their probabilities)",
                            nargs="+")
    kd_alpha: float = _f(0.5, "weight of the distillation term (0: plain training, 1: teacher only)")
    kd_temperature: float = _f(4.0, "softmax temperature T for teacher and student (the KL term is scaled by T^2)")
    kd_hard: bool = _f(False, "hard-label distillation (DeiT): cross-entropy to the teacher's top-1 instead of KL")


class TeacherError(UserError):
    pass


class Distiller:
    """Frozen teacher(s) + the KD loss; passed to ``engine.train.train(cfg, distiller=...)``."""

    def __init__(self, teachers: list[str | os.PathLike], alpha: float = 0.5, temperature: float = 4.0,
                 hard: bool = False):
        from ..inference import model_from_checkpoint
        from .checkpoint import file_sha256

        if not teachers:
            raise TeacherError("give at least one --teacher checkpoint (RUN_DIR/best.pt)")
        if not 0.0 <= alpha <= 1.0:
            raise UserError(f"--kd-alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise UserError(f"--kd-temperature must be positive, got {temperature}")
        self.alpha, self.temperature, self.hard = alpha, temperature, hard
        self.models, self.specs, self.records = [], [], []
        for t in teachers:
            p = Path(t)
            if not p.exists():
                raise TeacherError(f"teacher checkpoint '{t}' not found; train a teacher first "
                                   "(python -m trainer train ... --out runs/teacher) and pass runs/teacher/best.pt")
            loaded = model_from_checkpoint(p)
            for q in loaded.model.parameters():
                q.requires_grad_(False)
            self.models.append(loaded.model.eval())
            self.specs.append(loaded.preprocess)
            path = loaded.checkpoint["path"]
            self.records.append({"path": str(path), "sha256": file_sha256(path), "arch": loaded.spec.name,
                                 "classes": loaded.classes, "weights": loaded.weights})
        self.student_mean = self.student_std = None

    def describe(self) -> dict:
        """Written into every checkpoint of the run (``ckpt['distill']``)."""
        return {"teachers": [{k: v for k, v in r.items() if k != "classes"} for r in self.records],
                "alpha": self.alpha, "temperature": self.temperature, "hard": self.hard}

    def check_resume(self, previous: dict | None) -> None:
        """A resumed run must use the very same teacher files (same sha256) and settings."""
        if not previous:
            raise TeacherError("the run being resumed was not a distillation run; resume it with 'train --resume'")
        old = [(t["path"], t["sha256"]) for t in previous["teachers"]]
        new = [(r["path"], r["sha256"]) for r in self.records]
        if [s for _, s in old] != [s for _, s in new]:
            raise TeacherError(f"the teacher files changed since the run started (recorded: {old}; now: {new}); "
                               "resume with the original teachers or start a new run")

    def prepare(self, classes: list[str], device: torch.device, cfg: TrainConfig, amp_dtype=None) -> None:
        for r in self.records:
            if r["classes"] != list(classes):
                raise TeacherError(f"teacher {r['path']} predicts {r['classes']} but the data has {list(classes)}; "
                                   "a teacher must be trained on the same classes")
        self.models = [m.to(device) for m in self.models]
        self.device, self.amp_dtype = device, amp_dtype
        self.student_mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1) * 255.0
        self.student_std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1) * 255.0
        self.teacher_norm = [(torch.tensor(s.mean, device=device).view(1, 3, 1, 1) * 255.0,
                              torch.tensor(s.std, device=device).view(1, 3, 1, 1) * 255.0) for s in self.specs]

    @torch.no_grad()
    def teacher_probs(self, x: torch.Tensor) -> torch.Tensor:
        """x: the student's normalised batch (N, 3, H, W) -> mean tempered teacher probabilities (N, K) float32."""
        pixels = x.float() * self.student_std + self.student_mean  # back to [0, 255] pixels
        temp = 1.0 if self.hard else self.temperature
        total = None
        for model, spec, (mean, std) in zip(self.models, self.specs, self.teacher_norm):
            xt = pixels
            if tuple(xt.shape[-2:]) != tuple(spec.crop_size):
                xt = F.interpolate(xt, size=tuple(spec.crop_size), mode=spec.interpolation, antialias=True,
                                   align_corners=False)
            with autocast(self.device, self.amp_dtype):
                logits = model(((xt - mean) / std).contiguous()).float()
            p = torch.softmax(logits / temp, dim=1)
            total = p if total is None else total + p
        return total / len(self.models)

    def loss(self, student_logits: torch.Tensor, targets: torch.Tensor, x: torch.Tensor,
             class_weights: torch.Tensor | None = None) -> torch.Tensor:
        return kd_loss(student_logits, self.teacher_probs(x), targets, self.alpha, self.temperature, self.hard,
                       class_weights)


def distill(cfg: DistillConfig) -> dict:
    """Build the teachers from ``cfg`` and run the ordinary training loop with the KD loss."""
    from .checkpoint import load_checkpoint
    from .train import train

    distiller = Distiller(list(cfg.teacher), cfg.kd_alpha, cfg.kd_temperature, cfg.kd_hard)
    if cfg.resume:
        distiller.check_resume(load_checkpoint(Path(cfg.resume) / "last.pt").get("distill"))
    return train(cfg, distiller=distiller)
