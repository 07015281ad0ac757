import math

import pytest
import torch
import torch.nn.functional as F

from trainer.engine.losses import balanced_class_weights, smooth_targets, soft_cross_entropy
from trainer.engine.mixing import BatchMixer
from trainer.engine.schedules import LRSchedule


def test_warmup_is_linear_from_warmup_lr():
    s = LRSchedule("cosine", base_lr=0.1, total_steps=100, warmup_steps=10, warmup_lr=0.001, min_lr=0.0)
    assert s.lr_at(0) == pytest.approx(0.001)
    assert s.lr_at(5) == pytest.approx(0.001 + (0.1 - 0.001) * 5 / 10)
    assert s.lr_at(10) == pytest.approx(0.1)


def test_cosine_values_against_formula():
    s = LRSchedule("cosine", base_lr=0.1, total_steps=110, warmup_steps=10, warmup_lr=0.0, min_lr=0.001)
    for step in (10, 35, 60, 85, 110):
        t = (step - 10) / 100
        expected = 0.001 + (0.1 - 0.001) * 0.5 * (1 + math.cos(math.pi * t))
        assert s.lr_at(step) == pytest.approx(expected)
    assert s.lr_at(60) == pytest.approx((0.1 + 0.001) / 2)
    assert s.lr_at(110) == pytest.approx(0.001)


def test_step_schedule_multiplies_by_gamma_at_milestones():
    s = LRSchedule("step", base_lr=0.1, total_steps=100, warmup_steps=5, warmup_lr=0.01, milestones=[30, 60],
                   gamma=0.1)
    assert s.lr_at(2) == pytest.approx(0.01 + 0.09 * 2 / 5)
    assert s.lr_at(29) == pytest.approx(0.1)
    assert s.lr_at(30) == pytest.approx(0.01)
    assert s.lr_at(59) == pytest.approx(0.01)
    assert s.lr_at(60) == pytest.approx(0.001)


def test_schedule_applies_per_step_and_round_trips_state():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    s = LRSchedule("cosine", base_lr=0.1, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(4):
        lrs.append(s.apply(opt))
        s.advance()
    assert opt.param_groups[0]["lr"] == pytest.approx(lrs[-1])
    s2 = LRSchedule("cosine", base_lr=0.1, total_steps=10, warmup_steps=2)
    s2.load_state_dict(s.state_dict())
    assert s2.lr_at(s2.step) == s.lr_at(s.step)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown scheduler"):
        LRSchedule("linear", 0.1, 10)


def test_label_smoothing_matches_formula_and_torch():
    torch.manual_seed(0)
    logits = torch.randn(8, 5)
    y = torch.randint(0, 5, (8,))
    eps = 0.1
    ours = soft_cross_entropy(logits, smooth_targets(y, 5, eps))
    logp = F.log_softmax(logits, dim=1)
    formula = ((1 - eps) * -logp[torch.arange(8), y] + eps * -logp.mean(dim=1)).mean()
    assert ours.item() == pytest.approx(formula.item(), rel=1e-6)
    assert ours.item() == pytest.approx(F.cross_entropy(logits, y, label_smoothing=eps).item(), rel=1e-6)


def test_class_weighted_loss_matches_torch_for_hard_targets():
    torch.manual_seed(1)
    logits = torch.randn(16, 4)
    y = torch.randint(0, 4, (16,))
    w = torch.tensor([1.0, 2.0, 0.5, 3.0])
    ours = soft_cross_entropy(logits, smooth_targets(y, 4, 0.0), w)
    assert ours.item() == pytest.approx(F.cross_entropy(logits, y, weight=w).item(), rel=1e-6)


def test_balanced_weights_are_inverse_frequency():
    w = balanced_class_weights([0, 0, 0, 1], 3)
    assert w.tolist() == pytest.approx([4 / (3 * 3), 4 / (3 * 1), 0.0])


def test_mixup_targets_stay_distributions():
    torch.manual_seed(0)
    mixer = BatchMixer(3, mixup_alpha=0.4, cutmix_alpha=1.0)
    x = torch.rand(6, 3, 8, 8)
    t = smooth_targets(torch.tensor([0, 1, 2, 0, 1, 2]), 3)
    for _ in range(5):
        xm, tm = mixer(x, t)
        assert xm.shape == x.shape
        assert torch.allclose(tm.sum(1), torch.ones(6))
