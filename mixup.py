"""Mixup pairing for MixSKD: lam, perm, Mixup, CutMix, interpolation, mixed CE.

docs/method.md section 1, Eqs. (1), (1'), (2), (3). Paper: Yang et al., "MixSKD: Self-Knowledge Distillation
from Mixup for Image Recognition", ECCV 2022 (arXiv 2208.05768); Mixup: Zhang et al. 2018; CutMix:
Yun et al. 2019.

Unlike most mixup helpers, nothing here mutates its input, and the permutation is returned: MixSKD
needs `perm` and `lam` again to interpolate every output computed on the clean batch.
Randomness: `lam` and the CutMix box come from NumPy's global generator and `perm` from torch's,
so seeding both (and saving their states) makes a run reproducible and resumable.
"""
import numpy as np
import torch
import torch.nn.functional as F

MIX_MODES = ("mixup", "cutmix")


def sample_lam(alpha):
    """One lam ~ Beta(alpha, alpha) for the whole batch (docs/method.md section 1)."""
    if not alpha > 0:
        raise ValueError(f"mixup alpha must be > 0, got {alpha}; MixSKD uses 0.4 on CIFAR, 0.2 on ImageNet")
    return float(np.random.beta(alpha, alpha))


def sample_perm(batch_size, device=None):
    """A random pairing: sample i is mixed with sample perm[i]. Drawn on the device, no host sync."""
    return torch.randperm(batch_size, device=device)


def mixup(x, lam, perm):
    """Mixup, Eq. (1): x_mix = lam * x + (1 - lam) * x[perm]. Returns a new tensor."""
    return lam * x + (1.0 - lam) * x[perm]


def rand_bbox(height, width, lam):
    """A box covering about (1 - lam) of the image, centred uniformly, clipped at the border.

    Returns (y1, y2, x1, x2) as Python ints, so slicing with it needs no device sync.
    """
    cut_ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut_ratio), int(width * cut_ratio)
    cy, cx = np.random.randint(height), np.random.randint(width)
    y1, y2 = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height))
    x1, x2 = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width))
    return y1, y2, x1, x2


def cutmix(x, lam, perm):
    """CutMix, Eq. (1'): paste a box from x[perm]; returns (x_mix, corrected lam).

    The box is clipped at the border, so its area is not exactly (1 - lam); the returned lam is the
    exact kept-area fraction, and MixSKD uses that value everywhere downstream.
    """
    height, width = x.shape[-2:]
    y1, y2, x1, x2 = rand_bbox(height, width, lam)
    x_mix = x.clone()
    x_mix[..., y1:y2, x1:x2] = x[perm][..., y1:y2, x1:x2]
    return x_mix, 1.0 - (y2 - y1) * (x2 - x1) / (height * width)


def mix_batch(x, alpha, mode="mixup"):
    """Draw lam and perm for this step and mix the batch: returns (x_mix, perm, lam)."""
    if mode not in MIX_MODES:
        raise ValueError(f"unknown mix mode {mode!r}; choose one of {', '.join(MIX_MODES)}")
    lam = sample_lam(alpha)
    perm = sample_perm(x.shape[0], x.device)
    if mode == "cutmix":
        x_mix, lam = cutmix(x, lam, perm)
    else:
        x_mix = mixup(x, lam, perm)
    return x_mix, perm, lam


def interp(t, lam, perm):
    """Interpolation of a per-sample tensor computed on the clean batch, Eq. (2)."""
    return lam * t + (1.0 - lam) * t[perm]


def mix_ce(logits, y, lam, perm):
    """Mixed cross-entropy, Eq. (3): lam * CE(z, y) + (1 - lam) * CE(z, y[perm]), in float32
    whatever the logits' dtype (autocast)."""
    logits = logits.float()
    return lam * F.cross_entropy(logits, y) + (1.0 - lam) * F.cross_entropy(logits, y[perm])
