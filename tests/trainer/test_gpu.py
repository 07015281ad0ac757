"""CUDA paths of the trainer; skipped on machines without a GPU (CI), run with `pytest -m gpu`."""
import json

import pytest
import torch

from trainer.config import TrainConfig
from trainer.engine.runtime import resolve_amp
from trainer.engine.train import train

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("amp", ["fp16", "bf16", "none"])
def test_train_on_cuda_with_each_precision(tiny_digits, tmp_path, amp):
    cfg = TrainConfig(data=str(tiny_digits), out=str(tmp_path / amp), model="resnet18", img_size=32, crop_pct=1.0,
                      batch_size=16, workers=0, hflip=0.0, epochs=2, quiet=True, device="cuda", amp=amp, ema=True)
    summary = train(cfg)
    assert summary["device"].startswith("cuda")
    rows = [json.loads(x) for x in (tmp_path / amp / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["train_loss"] == r["train_loss"] for r in rows)  # finite, not NaN
    expected = {"fp16": torch.float16, "bf16": torch.bfloat16, "none": None}[amp]
    assert resolve_amp(amp, torch.device("cuda")) == expected


def test_cuda_checkpoint_evaluates_on_cpu(tiny_digits, tmp_path):
    from trainer.evaluation import evaluate_checkpoint

    cfg = TrainConfig(data=str(tiny_digits), out=str(tmp_path / "run"), model="resnet18", img_size=32, crop_pct=1.0,
                      batch_size=16, workers=0, hflip=0.0, epochs=1, quiet=True, device="cuda")
    train(cfg)
    gpu = evaluate_checkpoint(tmp_path / "run" / "best.pt", data=str(tiny_digits), device="cuda")
    cpu = evaluate_checkpoint(tmp_path / "run" / "best.pt", data=str(tiny_digits), device="cpu")
    assert gpu["num_samples"] == cpu["num_samples"] == 24
    assert abs(gpu["loss"] - cpu["loss"]) < 1e-3
