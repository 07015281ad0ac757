"""Knowledge distillation: the loss against its formula, teachers (ensemble, other input size), resume."""
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from extras_support import cli, perturbed_copy, tiny_checkpoint
from trainer.engine.checkpoint import load_checkpoint
from trainer.engine.distill import DistillConfig, Distiller, TeacherError, distill, kd_loss
from trainer.engine.losses import smooth_targets


def reference_kd(s, t_probs, y, alpha, T):
    """(1 - a) * CE(y, s) + a * T^2 * KL(p_t || softmax(s / T)), KL averaged over the batch, by hand."""
    n, k = s.shape
    ce = sum(-math.log(math.exp(s[i, y[i]]) / sum(math.exp(s[i, j]) for j in range(k))) for i in range(n)) / n
    kl = 0.0
    for i in range(n):
        z = sum(math.exp(s[i, j] / T) for j in range(k))
        for j in range(k):
            p, q = t_probs[i, j], math.exp(s[i, j] / T) / z
            kl += p * math.log(p / q)
    return (1 - alpha) * ce + alpha * T * T * kl / n


def test_kd_loss_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 5, generator=g, dtype=torch.float64) * 3
    t = torch.randn(4, 5, generator=g, dtype=torch.float64) * 3
    y = torch.tensor([0, 3, 1, 4])
    for alpha, T in ((0.5, 4.0), (0.9, 2.0), (0.3, 1.0)):
        pt = torch.softmax(t / T, 1)
        got = kd_loss(s, pt, smooth_targets(y, 5), alpha, T)
        want = reference_kd(s.numpy(), pt.numpy(), y.tolist(), alpha, T)
        assert float(got) == pytest.approx(want, rel=1e-5)
    # alpha 0 is plain cross-entropy; hard mode is CE to the teacher's top-1
    assert float(kd_loss(s, pt, smooth_targets(y, 5), 0.0, 4.0)) == pytest.approx(float(F.cross_entropy(s.float(), y)),
                                                                                 rel=1e-5)
    hard = kd_loss(s, torch.softmax(t, 1), smooth_targets(y, 5), 0.4, 4.0, hard=True)
    want = 0.6 * F.cross_entropy(s.float(), y) + 0.4 * F.cross_entropy(s.float(), t.argmax(1))
    assert float(hard) == pytest.approx(float(want), rel=1e-5)
    # the gradient of the soft term vanishes when the student already matches the teacher
    s2 = (t * 1.0).float().requires_grad_(True)
    kd_loss(s2, torch.softmax(t.float() / 3, 1), smooth_targets(y, 5), 1.0, 3.0).backward()
    assert s2.grad.abs().max() < 1e-6


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_digits):
    return tiny_checkpoint(tmp_path_factory, tiny_digits)


def test_teacher_ensemble_probs_use_each_teachers_size_and_normalisation(teacher, tmp_path):
    t2 = perturbed_copy(teacher, tmp_path / "t2.pt", scale=0.3)
    d = Distiller([teacher, t2], alpha=0.5, temperature=2.0)
    cfg = DistillConfig(img_size=48, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    d.prepare(["0", "1", "7"], torch.device("cpu"), cfg)
    pixels = torch.randint(0, 256, (2, 3, 48, 48)).float()
    student_x = (pixels - 127.5) / 63.75  # the student's own normalisation
    got = d.teacher_probs(student_x)
    # reference: each teacher on the same pixels resized to its 32x32 input, with its ImageNet normalisation
    small = F.interpolate(pixels, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    spec = d.specs[0]
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.std).view(1, 3, 1, 1) * 255
    with torch.no_grad():
        want = sum(torch.softmax(m((small - mean) / std) / 2.0, 1) for m in d.models) / 2
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert all(not p.requires_grad for m in d.models for p in m.parameters())
    with pytest.raises(TeacherError, match="predicts"):
        d.prepare(["0", "1", "2"], torch.device("cpu"), cfg)


def test_missing_teacher_and_bad_settings(tmp_path, tiny_digits, capsys):
    assert cli("distill", "--teacher", tmp_path / "nope.pt", "--data", tiny_digits, "--out", tmp_path / "r") == 2
    assert "teacher checkpoint" in capsys.readouterr().err
    assert cli("distill", "--data", tiny_digits, "--out", tmp_path / "r") == 2
    assert "give at least one --teacher" in capsys.readouterr().err
    with pytest.raises(ValueError, match="kd-alpha"):
        Distiller([tmp_path], alpha=1.5)


@pytest.mark.slow
def test_distill_run_records_teachers_and_resumes(teacher, tiny_digits, tmp_path, capsys):
    teacher = Path(shutil.copy(teacher, tmp_path / "teacher.pt"))  # a private copy: this test alters it
    out = tmp_path / "kd"
    args = ["distill", "--teacher", teacher, "--model", "resnet18", "--img-size", "40", "--crop-pct", "1.0",
            "--data", tiny_digits, "--epochs", "2", "--batch-size", "24", "--workers", "0", "--hflip", "0",
            "--optimizer", "adamw", "--lr", "0.002", "--warmup-epochs", "0", "--kd-alpha", "0.7",
            "--kd-temperature", "3", "--amp", "none", "--quiet", "--out", out]
    assert cli(*args, "--max-steps", "3") == 0  # stops after epoch 1 (3 steps per epoch)
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["config"]["kd_alpha"] == 0.7 and ckpt["config"]["teacher"] == [str(teacher)]
    rec = ckpt["distill"]["teachers"][0]
    assert rec["path"] == str(teacher) and len(rec["sha256"]) == 64 and ckpt["preprocess"]["crop_size"] == [40, 40]
    assert cli("distill", "--resume", out, "--max-steps", "0", "--quiet") == 0
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 6 and ckpt["distill"]["temperature"] == 3.0
    # a changed teacher file is refused on resume
    perturbed_copy(teacher, teacher, scale=0.01)
    with pytest.raises(TeacherError, match="teacher files changed"):
        distill(DistillConfig(**{**ckpt["config"], "resume": str(out), "epochs": 3}))
    assert cli("train", "--resume", out, "--quiet") == 2  # a distillation run is not resumed as plain training
    assert "unknown setting" in capsys.readouterr().err
