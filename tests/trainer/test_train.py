import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import FAST_TRAIN, REPO, TEST_AMP, run_cli, write_image
from trainer.config import TrainConfig
from trainer.engine.checkpoint import CHECKPOINT_FORMAT, atomic_save, load_checkpoint
from trainer.engine.train import train


def fast_cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), model="resnet18", img_size=32, crop_pct=1.0, batch_size=16,
                workers=0, hflip=0.0, scale_min=0.8, lr=0.05, warmup_epochs=0.5, epochs=2, quiet=True, amp=TEST_AMP)
    base.update(kw)
    return TrainConfig(**base)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_train_writes_checkpoints_metrics_plots_and_report(tiny_digits, tmp_path):
    summary = train(fast_cfg(tiny_digits, tmp_path / "run", ema=True))
    run = tmp_path / "run"
    for name in ("best.pt", "last.pt", "config.yaml", "metrics.jsonl", "summary.json", "curves.png",
                 "report/report.json", "report/confusion_matrix.png", "report/confusion_matrix.csv",
                 "report/per_class.csv"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.*"))
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"train_loss", "val_top1", "ema_val_top1", "lr", "images_per_sec"} <= set(rows[0])
    assert "val_top5" not in rows[0]  # 3 classes: top-5 is undefined, not a fake 100%
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["classes"] == ["0", "1", "7"]
    for key in ("model", "optimizer", "schedule", "scaler", "ema", "epoch", "step", "best_metric", "rng", "config",
                "preprocess"):
        assert key in ckpt, key
    assert ckpt["preprocess"]["crop_size"] == [32, 32]
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["num_samples"] == 24 and report["top5"] is None
    assert yaml.safe_load((run / "config.yaml").read_text())["model"] == "resnet18"
    assert summary["best_top1"] == max(max(r["val_top1"], r["ema_val_top1"]) for r in rows)


def test_exact_resume_mid_epoch_whatever_the_worker_count(tiny_digits, tmp_path):
    """Stopped in the middle of epoch 2 (of 2) with 2 loader workers, resumed with 1: the metrics and weights
    equal an uninterrupted run's with none (augmentation is seeded per sample, mixup by the loop)."""
    full = tmp_path / "full"
    train(fast_cfg(tiny_digits, full, epochs=2, deterministic=True, ema=True, mixup=0.2))
    part = tmp_path / "part"
    steps_per_epoch = 72 // 16  # the incomplete last batch is dropped
    train(fast_cfg(tiny_digits, part, epochs=2, deterministic=True, ema=True, mixup=0.2, workers=2,
                   max_steps=steps_per_epoch + 2))
    assert [r["epoch"] for r in read_jsonl(part / "metrics.jsonl")] == [1]  # epoch 2 is not marked complete
    ckpt = load_checkpoint(part / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["partial"]["batch"] == 2
    # continue through the CLI exactly as a user would after a crash
    res = run_cli("train", "--resume", str(part), "--max-steps", "0", "--workers", "1")
    assert res.returncode == 0, res.stderr
    a, b = read_jsonl(full / "metrics.jsonl"), read_jsonl(part / "metrics.jsonl")
    assert [r["epoch"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        for k in ("train_loss", "train_top1", "val_loss", "val_top1", "ema_val_loss", "lr"):
            assert ra[k] == rb[k], (ra["epoch"], k, ra[k], rb[k])
    wa = load_checkpoint(full / "last.pt")["model"]
    wb = load_checkpoint(part / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_training_learns_in_fp32_and_in_bf16(tiny_digits, tmp_path, amp):
    """The fixture recipe learns the digits whatever the precision: fp32 is what every CPU without
    bf16 (AVX2 only) runs under --amp auto, and the recipe used to collapse to one class there."""
    from trainer.engine.runtime import cpu_supports_bf16

    if amp == "bf16" and not cpu_supports_bf16():
        pytest.skip("this CPU has no bf16 support (emulated bf16 would be slow)")
    summary = train(fast_cfg(tiny_digits, tmp_path / "run", amp=amp, optimizer="adamw", lr=1e-3, warmup_epochs=0.0,
                             epochs=3, channels_last=False))
    assert summary["amp"] == ("bfloat16" if amp == "bf16" else "none")
    assert summary["best_top1"] >= 0.9, summary


def test_atomic_checkpoint_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"v": 1}, path)

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_checkpoint_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"format": CHECKPOINT_FORMAT, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="cannot be read"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_yaml_config_and_flag_precedence(tiny_digits, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": str(tiny_digits), "epochs": 1, "batch-size": 8, "lr": 0.01,
                                   "model": "resnet18", "img_size": 32, "crop_pct": 1.0, "workers": 0}))
    res = run_cli("train", "--config", str(cfg), "--lr", "0.02", "--out", str(tmp_path / "run"), "--quiet",
                  "--max-steps", "2")
    assert res.returncode == 0, res.stderr
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["lr"] == 0.02 and saved["batch_size"] == 8 and saved["epochs"] == 1
    cfg.write_text("epochs: 1\nlearning_rate: 0.1\n")
    res = run_cli("train", "--config", str(cfg), "--out", str(tmp_path / "run2"))
    assert res.returncode == 2 and "unknown setting(s) ['learning_rate']" in res.stderr


def test_bad_images_error_lists_all_before_training(tiny_copy, tmp_path):
    (tiny_copy / "train" / "0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tiny_copy / "val" / "1" / "empty.jpg").write_bytes(b"")
    res = run_cli("train", "--data", str(tiny_copy), "--out", str(tmp_path / "run"), "--epochs", "1", *FAST_TRAIN)
    assert res.returncode == 2
    assert "2 unreadable image(s)" in res.stderr and "broken.png" in res.stderr and "empty.jpg" in res.stderr
    assert "--on-bad-image skip" in res.stderr
    assert not (tmp_path / "run" / "last.pt").exists()
    res = run_cli("train", "--data", str(tiny_copy), "--out", str(tmp_path / "run"), "--epochs", "1",
                  "--on-bad-image", "skip", *FAST_TRAIN)
    assert res.returncode == 0, res.stderr
    assert "broken.png" in (tmp_path / "run" / "bad_images.txt").read_text()
    assert json.loads((tmp_path / "run" / "report" / "report.json").read_text())["num_samples"] == 24  # the 24 good val images; empty.jpg left out


def test_cli_errors_are_clear_and_exit_2(tiny_digits, tmp_path):
    res = run_cli("train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r"), *FAST_TRAIN)
    assert res.returncode == 2 and "demo-data" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("train", "--data", str(tiny_digits), "--model", "resnet19", "--out", str(tmp_path / "r"))
    assert res.returncode == 2 and "unknown model 'resnet19'" in res.stderr
    res = run_cli("train", "--resume", str(tmp_path / "nothing"))
    assert res.returncode == 2 and "not found" in res.stderr
    res = run_cli("evaluate", "--checkpoint", str(tmp_path / "nope.pt"), "--data", str(tiny_digits))
    assert res.returncode == 2 and "not found" in res.stderr


def test_freeze_then_unfreeze_and_class_balance_options(tiny_digits, tmp_path):
    """Epoch 1 (frozen) leaves the backbone's weights and BatchNorm statistics as pretrained; epoch 2
    (unfrozen) moves both. A dozen other options ride along and must not break either."""
    import dataclasses

    from trainer.models import create_model

    base = create_model("resnet18", 1000, 32)
    torch.save(base.state_dict(), tmp_path / "pre.pth")
    cfg = fast_cfg(tiny_digits, tmp_path / "run", epochs=2, pretrained=str(tmp_path / "pre.pth"),
                   freeze_backbone=True, unfreeze_at=1, class_weights="auto", balanced_sampler=True,
                   optimizer="adamw", lr=1e-3, accum_steps=2, clip_grad=1.0, label_smoothing=0.1, cutmix=1.0,
                   auto_augment="trivialaugment", random_erasing=0.25, scheduler="step", milestones=[1],
                   max_steps=2)   # 4 batches, 2 per step: epoch 1 exactly
    train(cfg)
    frozen = load_checkpoint(tmp_path / "run" / "last.pt")
    assert frozen["epoch"] == 1
    backbone = ("conv1.weight", "bn1.running_mean", "bn1.running_var", "layer4.1.bn2.running_var")
    for k in backbone:
        assert torch.equal(frozen["model"][k], base.state_dict()[k]), k
    train(dataclasses.replace(cfg, resume=str(tmp_path / "run"), max_steps=None))
    thawed = load_checkpoint(tmp_path / "run" / "last.pt")
    assert thawed["epoch"] == 2
    for k in backbone:
        assert not torch.equal(thawed["model"][k], base.state_dict()[k]), k
    assert thawed["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)  # the step milestone at epoch 1


def test_evaluate_cli_json_and_files(tiny_digits, tmp_path):
    train(fast_cfg(tiny_digits, tmp_path / "run", epochs=1))
    res = run_cli("evaluate", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--data", str(tiny_digits),
                  "--json", "--out", str(tmp_path / "ev"), "--workers", "0")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["num_samples"] == 24 and len(report["per_class"]) == 3
    assert len(report["confusion_matrix"]) == 3 and sum(map(sum, report["confusion_matrix"])) == 24
    assert (tmp_path / "ev" / "confusion_matrix.png").stat().st_size > 1000
    # evaluating on a folder of class folders works too, with the checkpoint's class order
    res = run_cli("evaluate", "--checkpoint", str(tmp_path / "run"), "--data", str(tiny_digits / "val"), "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["num_samples"] == 24


def test_existing_run_is_never_overwritten_by_accident(tiny_digits, tmp_path):
    train(fast_cfg(tiny_digits, tmp_path / "run", epochs=1))
    before = (tmp_path / "run" / "last.pt").read_bytes()
    res = run_cli("train", "--data", str(tiny_digits), "--out", str(tmp_path / "run"), "--epochs", "1", *FAST_TRAIN)
    assert res.returncode == 2 and "--resume" in res.stderr and "--overwrite" in res.stderr
    assert (tmp_path / "run" / "last.pt").read_bytes() == before
    train(fast_cfg(tiny_digits, tmp_path / "run", epochs=1, overwrite=True, seed=5))
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 1  # the old run's lines are gone


def test_evaluate_refuses_classes_the_model_does_not_know(tiny_digits, tmp_path):
    train(fast_cfg(tiny_digits, tmp_path / "run", epochs=1))
    write_image(tmp_path / "other" / "cat" / "a.png")
    res = run_cli("evaluate", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--data", str(tmp_path / "other"))
    assert res.returncode == 2 and "'cat'" in res.stderr


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tiny_digits, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "trainer",
           "train", "--data", str(tiny_digits), "--out", str(tmp_path / "ddp"), "--epochs", "2", *FAST_TRAIN]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    # both ranks' last lines: a failure on one rank shows up on the other as "connection closed by peer"
    ranks = ["\n".join([ln for ln in res.stderr.splitlines() if ln.startswith(f"[rank{r}]")][-25:]) for r in (0, 1)]
    assert res.returncode == 0, "\n".join(ranks) + "\n" + res.stderr[-1500:]
    rows = read_jsonl(tmp_path / "ddp" / "metrics.jsonl")
    assert len(rows) == 2  # only rank 0 writes
    # validation counted every one of the 24 images exactly once across both ranks
    assert all(r["val_count"] == 24 for r in rows)
    report = json.loads((tmp_path / "ddp" / "report" / "report.json").read_text())
    assert report["num_samples"] == 24
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["world_size"] == 2


def test_models_and_help_commands():
    res = run_cli("models", "--json")
    assert res.returncode == 0 and len(json.loads(res.stdout)) == 33
    res = run_cli("train", "--help")
    assert res.returncode == 0
    for flag in ("--lr", "--scheduler", "--warmup-epochs", "--label-smoothing", "--pretrained", "--resume",
                 "--config", "--device", "--amp", "--ema", "--seed", "--on-bad-image", "--val-fraction"):
        assert flag in res.stdout
