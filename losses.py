"""MixSKD objectives: KD, the five loss terms, the discriminators, each recipe's total, the baselines'.

docs/method.md section 5, Eqs. (5)-(10'), and section 9 (the released ImageNet script's objective). Paper:
Yang et al., "MixSKD: Self-Knowledge Distillation from Mixup for Image Recognition", ECCV 2022,
section 3.

Notation (docs/method.md section 3): for every head k, the interpolation of its outputs on the clean batch
(`feats_interp`, `logits_interp`) and its outputs on the mixed batch (`feats_mixed`,
`logits_mixed`) distill into each other. `teacher_interp`, `teacher_mixed` are the self-teacher's
logits on the interpolated and on the mixed feature maps.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixup import interp, mix_ce

RECIPES = ("paper", "official", "official-imagenet")
TERMS = ("ce", "mix", "kd", "feat", "adv")


def check_recipe(recipe):
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")


def kd(student, teacher, temperature):
    """KD(s || t) = T^2 * KL(softmax(sg(t) / T) || softmax(s / T)), batch mean (docs/method.md section 5).

    In float32 whatever the logits' dtype: softmaxes in bf16 under autocast make the KL come out
    negative (-0.05 measured on CPU).
    """
    log_p_student = F.log_softmax(student.float() / temperature, dim=1)
    p_teacher = F.softmax(teacher.detach().float() / temperature, dim=1)
    return temperature**2 * F.kl_div(log_p_student, p_teacher, reduction="batchmean")


def loss_ce(logits_clean, y):
    """Task loss on clean images, Eq. (5): sum over heads of CE(z_k(x), y), in float32."""
    return sum(F.cross_entropy(z.float(), y) for z in logits_clean)


def loss_mix(logits_mixed, teacher_interp, teacher_mixed, y, lam, perm):
    """Mixup loss, Eq. (6): every head and the self-teacher (both inputs) on the mixup labels."""
    heads = sum(mix_ce(z, y, lam, perm) for z in logits_mixed)
    return heads + mix_ce(teacher_interp, y, lam, perm) + mix_ce(teacher_mixed, y, lam, perm)


def loss_kd(logits_interp, logits_mixed, teacher_interp, teacher_mixed, temperature):
    """Logit self-KD, Eq. (7).

    Branches (all heads but the last) distill mutually between interpolated and mixed logits; the
    backbone (last head) learns from the self-teacher, crossed: its interpolated logits from the
    teacher on mixed features, its mixed logits from the teacher on interpolated features.
    """
    branches = sum(
        kd(z_bar, z_tilde, temperature) + kd(z_tilde, z_bar, temperature)
        for z_bar, z_tilde in zip(logits_interp[:-1], logits_mixed[:-1])
    )
    backbone = kd(logits_interp[-1], teacher_mixed, temperature) + kd(logits_mixed[-1], teacher_interp, temperature)
    return branches + backbone


def loss_feat(feats_interp, feats_mixed):
    """Feature self-KD, Eq. (8): sum_k mean((F_bar_k - F_tilde_k)^2), gradient to both sides."""
    return sum(F.mse_loss(f_bar, f_tilde) for f_bar, f_tilde in zip(feats_interp, feats_mixed))


class GradReverse(torch.autograd.Function):
    """Gradient reversal: identity forward, negated gradient backward (Eq. (10))."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


def discriminator(channels, hidden=128):
    """D_k of Eq. (9) after its GAP: Linear(C, 128) -> ReLU -> Linear(128, 2)."""
    return nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 2))


def discriminators(channels, num_heads=4):
    """D_1..D_4 as registered modules, so they are optimised and saved (unlike docs/method.md section 6, item 3)."""
    return nn.ModuleList(discriminator(channels) for _ in range(num_heads))


def loss_adv(discs, feats_interp, feats_mixed, reverse):
    """Discriminator loss, Eq. (9): tell interpolated ([1, 0]) from mixed ([0, 1]) features.

    reverse=True (recipe `paper`) puts a gradient reversal between the pooled features and D_k: the
    discriminators descend L_adv while the network ascends it. reverse=False (recipe `official`)
    lets the network descend L_adv through D_k, as the released script does.
    """
    batch = feats_interp[0].shape[0]
    targets = torch.zeros(2 * batch, 2, device=feats_interp[0].device)
    targets[:batch, 0] = 1.0
    targets[batch:, 1] = 1.0
    total = 0.0
    for disc, f_bar, f_tilde in zip(discs, feats_interp, feats_mixed):
        pooled = torch.cat([f_bar.mean((2, 3)), f_tilde.mean((2, 3))])
        if reverse:
            pooled = GradReverse.apply(pooled)
        total = total + F.binary_cross_entropy_with_logits(disc(pooled).float(), targets)
    return total


def trained_parameters(recipe, net, self_teacher, discs):
    """The parameters a recipe optimises: all of them for `paper` (Eq. (10)); the network alone for
    `official` (Eq. (10')), where self-teacher and discriminators stay at initialisation; network and
    self-teacher for `official-imagenet` (docs/method.md section 9), whose discriminators stay fixed."""
    check_recipe(recipe)
    modules = {"paper": [net, self_teacher, discs], "official": [net],
               "official-imagenet": [net, self_teacher]}[recipe]
    return [p for m in modules for p in m.parameters()]


def mixskd_loss(feats, logits, y, lam, perm, self_teacher, discs, recipe="paper", weights=None, temperature=3.0):
    """The MixSKD objective of one step: Eq. (10) (`paper`), (10') (`official`) or the released
    ImageNet script's (`official-imagenet`, docs/method.md section 9).

    feats, logits: lists over heads (backbone last) of the network's outputs on cat([x, x_mix]).
    y: labels of the clean batch x; lam, perm: the step's pairing (mixup.mix_batch).
    weights: {term: weight} for the terms in TERMS, default 1 each; a weight of 0 removes its term.
    Returns (total, terms): the loss to backpropagate and every term, detached, for logging.

    Recipe `official` (docs/method.md section 6): L_mix is computed for the log but not optimised, so the
    self-teacher runs without a graph (its logits are detached targets in Eq. (7) anyway), and the
    network minimises L_adv through discriminators that the caller keeps out of the optimiser.
    Recipe `official-imagenet` (docs/method.md section 9): Eq. (10) with L_mix optimised, but, as `official`,
    fixed discriminators that the network minimises, without gradient reversal.
    """
    check_recipe(recipe)
    weights = {**dict.fromkeys(TERMS, 1.0), **(weights or {})}
    if set(weights) != set(TERMS):
        raise ValueError(f"unknown loss weights {sorted(set(weights) - set(TERMS))}; terms are {', '.join(TERMS)}")
    optimise_mix = recipe != "official"  # the released CIFAR script alone leaves L_mix out
    reverse = recipe == "paper"  # the min-max game; the released scripts minimise L_adv instead
    batch = y.shape[0]
    feats_mixed = [f[batch:] for f in feats]
    logits_mixed = [z[batch:] for z in logits]
    # Interpolate each head's clean outputs once; every term below reuses them.
    feats_interp = [interp(f[:batch], lam, perm) for f in feats]
    logits_interp = [interp(z[:batch], lam, perm) for z in logits]

    with torch.set_grad_enabled(optimise_mix and torch.is_grad_enabled()):
        teacher_interp = self_teacher(feats_interp)
        teacher_mixed = self_teacher(feats_mixed)
        terms = {"mix": loss_mix(logits_mixed, teacher_interp, teacher_mixed, y, lam, perm)}
    terms["ce"] = loss_ce([z[:batch] for z in logits], y)
    terms["kd"] = loss_kd(logits_interp, logits_mixed, teacher_interp, teacher_mixed, temperature)
    terms["feat"] = loss_feat(feats_interp, feats_mixed)
    terms["adv"] = loss_adv(discs, feats_interp, feats_mixed, reverse=reverse)

    optimised = TERMS if optimise_mix else tuple(t for t in TERMS if t != "mix")
    total = sum(weights[t] * terms[t] for t in optimised if weights[t] != 0)
    return total, {t: terms[t].detach() for t in TERMS}


class MixSKDObjective(nn.Module):
    """The MixSKD objective of one step as a module: the network's forward on cat([x, x_mix]), then
    `mixskd_loss`, Eqs. (5)-(10) for `paper`, (10') for `official`.

    It holds the network, the self-teacher and the discriminators, so that one DistributedDataParallel
    wrapper averages every trained gradient and torch.compile sees forward and losses as one graph. What
    the recipe does not train (`trained_parameters`) is frozen here: requires_grad False, so it neither
    enters an optimiser built from the trainable parameters nor piles up a .grad that nothing zeroes.
    forward(inputs, y, lam, perm) -> (total, terms, backbone logits on all of `inputs`).
    """

    def __init__(self, net, self_teacher, discs, recipe="paper", weights=None, temperature=3.0):
        super().__init__()
        self.net, self.self_teacher, self.discs = net, self_teacher, discs
        self.recipe, self.weights, self.temperature = recipe, weights, temperature
        trained = {id(p) for p in trained_parameters(recipe, net, self_teacher, discs)}
        for p in self.parameters():
            p.requires_grad_(id(p) in trained)

    def forward(self, inputs, y, lam, perm):
        feats, logits = self.net(inputs)
        total, terms = mixskd_loss(feats, logits, y, lam, perm, self.self_teacher, self.discs, self.recipe,
                                   self.weights, self.temperature)
        return total, terms, logits[-1]


class BaselineObjective(nn.Module):
    """The baselines of docs/method.md section 7, shaped like MixSKDObjective: the network alone, with CE on
    clean images (lam None) or the mixed CE of Eq. (3) on Mixup or CutMix images."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, inputs, y, lam=None, perm=None):
        logits = self.net(inputs)
        if lam is None:
            loss = F.cross_entropy(logits.float(), y)
            return loss, {"ce": loss.detach()}, logits
        loss = mix_ce(logits, y, lam, perm)
        return loss, {"mix": loss.detach()}, logits
