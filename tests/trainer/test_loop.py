"""The training loop's details: gradient accumulation, frozen norms, fused optimizers, RNG streams,
agreed loss checks, progress lines, dropped incomplete batches, class-weighted validation."""
import copy
import os

import pytest
import torch
from torch import nn

from conftest import TEST_AMP
from trainer.config import TrainConfig
from trainer.data import ImageSamples, PreprocessSpec, SeededShuffleSampler
from trainer.data.layout import DataError
from trainer.engine.distributed import DistInfo
from trainer.engine.loop import LoopState, _check_finite, train_epoch, validate
from trainer.engine.mixing import BatchMixer
from trainer.engine.optim import build_optimizer
from trainer.engine.schedules import LRSchedule
from trainer.engine.train import train
from trainer.data import Normalize


def toy_state(model, accum=1, lr=1.0, **kw) -> LoopState:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return LoopState(model=model, net=model, optimizer=opt, schedule=LRSchedule("step", lr, 100),
                     scaler=torch.amp.GradScaler("cpu", enabled=False), mixer=BatchMixer(3),
                     normalize=Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), device=torch.device("cpu"),
                     info=DistInfo(), num_classes=3, epochs=1, accum_steps=accum, log_every=1000, **kw)


def toy_batches(n, size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (size, 3, 4, 4), dtype=torch.uint8, generator=g),
             torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


def linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 3))


def test_last_accumulation_group_is_averaged_over_its_own_batches():
    """3 batches, accum 2: the second step holds one batch and must use its full gradient, not half."""
    batches = toy_batches(3)
    model = linear()
    ref = copy.deepcopy(model)
    st = toy_state(model, accum=2)
    st.start_epoch(0)
    train_epoch(st, batches, say=print, quiet=True)
    norm = st.normalize
    opt = torch.optim.SGD(ref.parameters(), lr=1.0)
    for group in (batches[:2], batches[2:]):
        opt.zero_grad()
        for x, y in group:
            (nn.functional.cross_entropy(ref(norm(x)), y) / len(group)).backward()
        opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)
    assert st.schedule.step == 2


def test_frozen_batchnorm_keeps_its_running_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 3))
    for p in list(model[0].parameters()) + list(model[1].parameters()):
        p.requires_grad_(False)
    before = model[1].running_mean.clone(), model[3].weight.detach().clone()
    st = toy_state(model, lr=0.1)
    st.start_epoch(0)
    train_epoch(st, toy_batches(2), say=print, quiet=True)
    assert torch.equal(model[1].running_mean, before[0])
    assert not torch.equal(model[3].weight, before[1])  # the head did train


def test_fused_adamw_stays_on_under_fp16_only_fused_sgd_is_turned_off():
    model = linear()
    assert build_optimizer(model, "adamw", 1e-3, 0.0, amp_dtype=torch.float16).defaults["fused"]
    assert not build_optimizer(model, "sgd", 1e-3, 0.0, amp_dtype=torch.float16).defaults.get("fused")
    assert build_optimizer(model, "sgd", 1e-3, 0.0, amp_dtype=torch.bfloat16).defaults["fused"]


def test_loading_a_sample_leaves_the_global_rng_alone(tiny_digits):
    """With workers=0 the dataset runs in the loop's process: mixup's draws must not depend on it."""
    from trainer.data import AugmentConfig, build_train_transform

    samples = [(str(p), 0) for p in sorted((tiny_digits / "train" / "0").glob("*.png"))[:2]]
    ds = ImageSamples(samples, transform=build_train_transform(AugmentConfig(16, 0.5)))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = ds[(0, 11)][0]
    b = ds[(1, 99)][0]
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(ds[(0, 11)][0], a) and not torch.equal(ds[(1, 98)][0], b)  # still seeded per sample


def test_shuffle_orders_do_not_collide_across_seeds_and_epochs():
    def order(seed, epoch):
        s = SeededShuffleSampler(64, seed)
        s.set_epoch(epoch)
        return [i for i, _ in s]

    assert order(0, 7) != order(1, 0)  # seed*7+epoch made these identical
    assert order(3, 2) == order(3, 2)
    s = SeededShuffleSampler(64, 0)
    s.set_epoch(1, skip=10)
    assert [i for i, _ in s] == order(0, 1)[10:] and len(s) == 54


def test_mixer_mixes_pixels_and_labels_in_the_same_proportion():
    """Every sample's pixels and targets mix with the same partner in the same proportion, and some
    batches really are mixed (a mixer that does nothing fails)."""
    torch.manual_seed(0)
    mixer = BatchMixer(3, mixup_alpha=0.4, cutmix_alpha=1.0)
    labels = torch.tensor([0, 1, 2, 1, 0, 2])  # each sample's partner (the flipped batch) has another label
    values = torch.arange(1.0, 7.0)
    x = values.view(6, 1, 1, 1).expand(6, 3, 8, 8).contiguous()
    t = nn.functional.one_hot(labels, 3).float()
    mixed = 0
    for _ in range(20):
        xm, tm = mixer(x, t)
        lam = tm[torch.arange(6), labels]
        torch.testing.assert_close(tm.sum(1), torch.ones(6))
        torch.testing.assert_close(xm.mean(dim=(1, 2, 3)), lam * values + (1 - lam) * values.flip(0))
        mixed += bool((lam < 0.999).any())
    assert mixed >= 10


def test_validation_uses_its_class_weights():
    model = linear()
    st = toy_state(model)
    batches = toy_batches(2, size=8)
    plain = validate(model, batches, st)
    weighted = validate(model, batches, st, torch.tensor([5.0, 1.0, 0.1]))
    assert plain["top1"] == weighted["top1"] and plain["count"] == weighted["count"] == 16
    assert abs(plain["loss"] - weighted["loss"]) > 1e-4
    y = torch.cat([b[1] for b in batches])
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        ref = nn.functional.cross_entropy(model(st.normalize(x)), y, weight=torch.tensor([5.0, 1.0, 0.1]))
    assert weighted["loss"] == pytest.approx(float(ref), rel=1e-5)


def _finite_check_rank(rank, path):
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"file://{path}.store")
    st = toy_state(linear())
    st.info = DistInfo(rank=rank, world_size=2)
    totals = torch.tensor([1.0, 1.0, 1.0, 4.0 if rank == 1 else -1.0], dtype=torch.float64)
    try:
        _check_finite(totals, st)
        outcome = "passed"
    except FloatingPointError as exc:
        outcome = str(exc)
    with open(f"{path}.{rank}", "w") as fh:
        fh.write(outcome)
    dist.destroy_process_group()


def test_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    """One rank's NaN loss raises on both ranks together, instead of leaving the others in a collective."""
    import torch.multiprocessing as mp

    mp.start_processes(_finite_check_rank, args=(str(tmp_path / "f"),), nprocs=2, start_method="fork")
    r0, r1 = ((tmp_path / f"f.{r}").read_text() for r in (0, 1))
    assert "non-finite" in r0 and "on another rank" in r0
    assert "batch 5" in r1


def fast_cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), model="resnet18", img_size=32, crop_pct=1.0, batch_size=16,
                workers=0, hflip=0.0, scale_min=0.8, lr=0.05, warmup_epochs=0.5, epochs=1, quiet=True, amp=TEST_AMP)
    base.update(kw)
    return TrainConfig(**base)


def test_incomplete_last_batch_is_dropped_in_training_only(tiny_digits, tmp_path):
    """72 training images with --batch-size 71 left a batch of one, which BatchNorm refuses."""
    summary = train(fast_cfg(tiny_digits, tmp_path / "run", batch_size=71, max_steps=1))
    assert summary["epochs_run"] == 1
    with pytest.raises(DataError, match="--batch-size 80 is larger than the 72 training images"):
        train(fast_cfg(tiny_digits, tmp_path / "run2", batch_size=80))


def test_progress_lines_with_eta_when_output_is_not_a_terminal(tiny_digits, tmp_path, capsys, monkeypatch):
    compiled = []
    # --compile hands the model to torch.compile (recorded here: compiling on CPU takes minutes)
    monkeypatch.setattr(torch, "compile", lambda m: compiled.append(m) or m)
    train(fast_cfg(tiny_digits, tmp_path / "run", quiet=False, log_every=2, max_steps=4, compile=True))
    assert len(compiled) == 1 and isinstance(compiled[0], nn.Module)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch 1/1 batch")]
    assert [ln.split()[3] for ln in lines] == ["2/4", "4/4"]
    assert all("img/s" in ln and "ETA epoch" in ln for ln in lines)


def test_image_damaged_behind_a_good_header_is_reported_not_replaced(tiny_copy, tmp_path, capsys):
    """Start-up reads only headers; pixels that fail later are listed by path at the end of the epoch."""
    import json

    from extras_support import cli

    for split, cls in (("train", "1"), ("val", "7")):
        f = sorted((tiny_copy / split / cls).glob("*.png"))[0]
        data = f.read_bytes()
        f.write_bytes(data[: len(data) * 2 // 3])   # header and size intact, pixel data cut
    # 72 training images in batches of 8: none is dropped, so the damaged one is met in epoch 1
    args = ["train", "--data", tiny_copy, "--epochs", "1", "--batch-size", "8", "--model", "resnet18", "--img-size",
            "32", "--workers", "0", "--amp", TEST_AMP, "--quiet"]
    run = tmp_path / "skip"
    assert cli(*args, "--out", run, "--on-bad-image", "skip", "--cache-images", "off") == 0
    listed = (run / "bad_images.txt").read_text()
    assert "train/1/" in listed and "val/7/" in listed
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["val_count"] == 23
    capsys.readouterr()
    assert cli(*args, "--out", tmp_path / "err") == 2
    err = capsys.readouterr().err
    assert "2 image(s) could not be decoded" in err and "--resume" in err and "train/1/" in err
    assert (tmp_path / "err" / "last.pt").exists()
