"""The learning-rate schedule of a run: warmup, step decays or cosine, and the defaults of short runs.

docs/method.md section 7 (CIFAR: per-iteration warmup over 5 epochs, x0.1 at epochs 105 and 155 of 205) and
section 9 (ImageNet: 5 warmup epochs, then a per-epoch cosine), with two departures for runs far shorter than
the paper's, measured in docs/stability.md: a warmup floor (WARMUP_FLOOR iterations, or WARMUP_FLOOR_SHARE of a
shorter run) and a gradient-norm clip (CLIP_NORM, applied by settings.py) for MixSKD runs too short to warm up
that long or of a library network. A run continued with --extend never goes above the lr it last used.
"""
import math

SPEC_EPOCHS, SPEC_MILESTONES, SPEC_WARMUP_EPOCHS = 205, (105, 155), 5  # CIFAR, docs/method.md section 7
IMAGENET_EPOCHS = 305  # docs/method.md section 9: 5 warmup epochs, then a cosine over 300
WARMUP_FLOOR, WARMUP_FLOOR_SHARE, CLIP_NORM = 500, 0.25, 2.0  # measured: docs/stability.md


def default_warmup_iterations(epochs, steps_per_epoch, setting="cifar"):
    """The recipe's 5 warmup epochs (sections 7 and 9), shortened by epochs / 205 (305 on ImageNet) in a
    shorter run, but never below WARMUP_FLOOR iterations, or WARMUP_FLOOR_SHARE of a run shorter than
    that: a warmup that rounds to a few iterations lets the self-teacher diverge (docs/stability.md). The
    recipe's full runs (3,905 iterations on CIFAR) are above the floor, so they warm up exactly as specified."""
    spec_epochs = IMAGENET_EPOCHS if setting == "imagenet" else SPEC_EPOCHS
    spec = SPEC_WARMUP_EPOCHS * steps_per_epoch * min(epochs, spec_epochs) / spec_epochs
    floor = min(WARMUP_FLOOR, WARMUP_FLOOR_SHARE * epochs * steps_per_epoch)
    return max(1, round(max(spec, floor)))  # never 0: a run of one step still starts below the base lr


def lr_at(step, s):
    """The lr of global step `step` of a run of settings s (settings.Settings). docs/method.md section 7:
    lr_i = lr (i + 1) / (warmup iterations) during warmup, then lr times 0.1 for every milestone epoch reached.
    docs/method.md section 9 (ImageNet): after the warmup, per epoch, lr 0.5 (1 + cos(pi (epoch - warmup) /
    (epochs - warmup))). A run continued with --extend never goes above the lr it last used (s.lr_ceiling) from
    the epoch it was extended at, unless --extend-schedule new."""
    if step < s.warmup_iterations:
        return s.lr * (step + 1) / s.warmup_iterations
    epoch = step // s.steps_per_epoch
    if s.schedule == "cosine":
        warmup_epochs = s.warmup_iterations / s.steps_per_epoch
        progress = (epoch - warmup_epochs) / (s.epochs - warmup_epochs)
        lr = s.lr * 0.5 * (1 + math.cos(math.pi * progress))
    else:
        lr = s.lr * 0.1 ** sum(epoch >= m for m in s.milestones)
    ceiling = s.lr_ceiling
    return min(lr, ceiling) if ceiling is not None and epoch >= s.extended_at else lr


def schedule_text(s, start_epoch):
    """The lr of the epochs still to run, for the header: 'lr 0.1 in epochs 6-105, 0.01 in 106-155, ...'
    (the lr each epoch ends at), after the warmup."""
    spans, steps = [], s.steps_per_epoch
    for epoch in range(start_epoch, s.epochs):
        lr = lr_at((epoch + 1) * steps - 1, s)
        if spans and spans[-1][2] == f"{lr:.3g}":
            spans[-1][1] = epoch + 1
        else:
            spans.append([epoch + 1, epoch + 1, f"{lr:.3g}"])
    if s.schedule == "cosine" and len(spans) > 2:
        return f"lr {spans[0][2]} in epoch {spans[0][0]}, cosine to {spans[-1][2]} in epoch {spans[-1][1]}"
    return "lr " + ", ".join(f"{lr} in epoch{'s' * (a < b)} {a}{f'-{b}' * (a < b)}" for a, b, lr in spans)
