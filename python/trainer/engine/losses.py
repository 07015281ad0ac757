"""Losses: cross-entropy on soft targets (label smoothing, mixup/cutmix, class weights)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError


def smooth_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(N,) int -> (N, K) float: (1 - eps) * one_hot + eps / K."""
    if not 0.0 <= smoothing < 1.0:
        raise UserError(f"label smoothing must be in [0, 1), got {smoothing}")
    off = smoothing / num_classes
    t = torch.full((labels.shape[0], num_classes), off, device=labels.device, dtype=torch.float32)
    t.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)
    return t


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                       class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """mean_i sum_k -t_ik log softmax(z_i)_k; with class weights, a weighted mean where sample i
    weighs sum_k t_ik w_k (equals torch's weighted cross-entropy for hard targets)."""
    per_sample = -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
    if class_weights is None:
        return per_sample.mean()
    w = targets @ class_weights
    return (per_sample * w).sum() / w.sum()


def balanced_class_weights(labels: list[int], num_classes: int) -> torch.Tensor:
    """w_k = N / (K * n_k) (scikit-learn's 'balanced'); classes without samples get 0."""
    counts = torch.bincount(torch.tensor(labels), minlength=num_classes).float()
    w = torch.where(counts > 0, len(labels) / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return w
