"""The Self-KD baselines MixSKD is compared against: label smoothing, BYOT, DKS, CS-KD, PS-KD.

docs/method.md section 12 (12.1-12.5). Papers: label smoothing, Szegedy et al., "Rethinking the
Inception Architecture for Computer Vision", CVPR 2016; BYOT, Zhang et al., "Be Your Own Teacher",
ICCV 2019; DKS, Sun et al., "Deeply-Supervised Knowledge Synergy", CVPR 2019; CS-KD, Yun et al.,
"Regularizing Class-wise Predictions via Self-Knowledge Distillation", CVPR 2020; PS-KD, Kim et al.,
"Self-Knowledge Distillation with Progressive Refinement of Targets", ICCV 2021.

The losses are those of the released Self-KD-Lib (`methods/*.py`, called from its `main.py`), the
code behind the numbers the MixSKD paper reports, here run on MixSKD's network and schedule so that
only the objective differs. BYOT and DKS train the auxiliary branches (lists over heads, backbone
last, as model.MixSKDNet returns them); the others train a plain classifier. Every loss computes in
float32 whatever the logits' dtype, as losses.py does. Needs torch alone: `kd` is the KD of losses.py
(docs/method.md section 5), written again here so that this file can be copied on its own.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

BASELINE_TEMPERATURE = 4.0  # the released main.py's --T
LABEL_SMOOTHING = 0.1
PS_KD_ALPHA = 0.8  # alpha_T, the weight of the previous epoch's predictions at the last epoch
SELF_KD_METHODS = ("label-smooth", "byot", "dks", "cs-kd", "ps-kd")
BRANCHED = ("byot", "dks")  # the methods that train the auxiliary branches


def check_method(method):
    if method not in SELF_KD_METHODS:
        raise ValueError(f"unknown Self-KD method {method!r}; choose one of {', '.join(SELF_KD_METHODS)}")


def ce(logits, y):
    return F.cross_entropy(logits.float(), y)


def kd(student, teacher, temperature):
    """KD_T(s || t) = T^2 * KL(softmax(sg(t) / T) || softmax(s / T)), batch mean, in float32: losses.kd, the
    released DistillKL (docs/method.md sections 5 and 12.0)."""
    log_p_student = F.log_softmax(student.float() / temperature, dim=1)
    p_teacher = F.softmax(teacher.detach().float() / temperature, dim=1)
    return temperature**2 * F.kl_div(log_p_student, p_teacher, reduction="batchmean")


def label_smoothing_targets(y, num_classes, eps=LABEL_SMOOTHING):
    """Label smoothing targets, docs/method.md section 12.1: 1 - eps on the true class, eps / (C - 1)
    on each other class (as released; PyTorch's label_smoothing=eps puts eps / C there instead)."""
    targets = torch.full((y.shape[0], num_classes), eps / (num_classes - 1), device=y.device)
    return targets.scatter_(1, y[:, None], 1.0 - eps)


def soft_cross_entropy(logits, targets):
    """Cross-entropy with soft targets, docs/method.md sections 12.1 and 12.5:
    -(1/B) sum_i sum_c q_ic log softmax(z_i)_c, in float32."""
    return -(targets.float() * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


def label_smoothing_loss(logits, y, eps=LABEL_SMOOTHING):
    """Label smoothing, docs/method.md section 12.1: soft CE on label_smoothing_targets."""
    return soft_cross_entropy(logits, label_smoothing_targets(y, logits.shape[1], eps))


def byot_loss(feats, logits, y, temperature=BASELINE_TEMPERATURE, hint_weight=0.05):
    """BYOT, docs/method.md section 12.2: sum_h CE(z_h, y) + sum_a KD_T(z_a || z_f)
    + hint_weight * sum_a mean((F_a - sg(F_f))^2), f the backbone (last head), a the branches.

    The backbone's head teaches: its logits and feature map get no KD or hint gradient, which moves the branches'
    outputs; through the stages the branches share with it (branch k reads stage k), the terms still reach the
    backbone's earlier stages, and only its last stage and classifier learn from CE alone.
    Returns (total, terms) with terms {"ce", "kd", "feat"} detached, "feat" already weighted.
    """
    *branch_feats, backbone_feat = feats
    *branch_logits, backbone_logits = logits
    terms = {
        "ce": sum(ce(z, y) for z in logits),
        "kd": sum(kd(z, backbone_logits, temperature) for z in branch_logits),
        "feat": hint_weight * sum(F.mse_loss(f.float(), backbone_feat.detach().float()) for f in branch_feats),
    }
    return sum(terms.values()), {t: v.detach() for t, v in terms.items()}


def dks_loss(logits, y, temperature=BASELINE_TEMPERATURE):
    """DKS, docs/method.md section 12.3: sum_h CE(z_h, y) + sum_{h != g} KD_T(z_h || z_g), every
    ordered pair of heads with weight 1, the teacher z_g detached (inside kd)."""
    terms = {
        "ce": sum(ce(z, y) for z in logits),
        "kd": sum(kd(z_h, z_g, temperature) for h, z_h in enumerate(logits) for g, z_g in enumerate(logits)
                  if h != g),
    }
    return sum(terms.values()), {t: v.detach() for t, v in terms.items()}


def cs_kd_loss(logits, logits_partner, y, temperature=BASELINE_TEMPERATURE):
    """CS-KD, docs/method.md section 12.4: CE(z(x), y) + KD_T(z(x) || z(x')), x' an image of x's class,
    its logits detached: the partner only teaches."""
    terms = {"ce": ce(logits, y), "kd": kd(logits, logits_partner.detach(), temperature)}
    return sum(terms.values()), {t: v.detach() for t, v in terms.items()}


def ps_kd_alpha(epoch, epochs, alpha_T=PS_KD_ALPHA):
    """PS-KD's weight of the past predictions, docs/method.md section 12.5: alpha_T (t + 1) / epochs,
    t the 0-based epoch."""
    return alpha_T * (epoch + 1) / epochs


def ps_kd_targets(y, previous, alpha):
    """PS-KD soft targets, docs/method.md section 12.5: (1 - alpha) onehot(y) + alpha P[i].

    previous: B x C, the rows of the previous epoch's store for this batch (one-hot during epoch 0).
    """
    onehot = F.one_hot(y, previous.shape[1]).float()
    return (1.0 - alpha) * onehot + alpha * previous.float()


def ps_kd_loss(logits, targets):
    """PS-KD, docs/method.md section 12.5: soft CE on ps_kd_targets (no separate CE, no temperature)."""
    return soft_cross_entropy(logits, targets)


class PredictionStore:
    """PS-KD's store P, docs/method.md section 12.5: one probability vector per training image, N x C float32
    on the training device (20 MB for CIFAR-100's 50,000 x 100), one-hot before the first epoch.

    Every image is drawn once per epoch, read (`targets`) and then overwritten (`write`) in the same step, so
    a row read during an epoch still holds the previous epoch's prediction: one buffer serves both epochs, and
    the images an epoch does not draw (its dropped last batch) keep theirs. `written` marks the rows this
    process wrote this epoch, for the merge across processes at its end (runtime.merge_store)."""

    def __init__(self, labels, num_classes):
        self.probs = F.one_hot(labels, num_classes).float()
        self.written = torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)

    def targets(self, idx, y, alpha):
        """ps_kd_targets of the images at positions idx of the training set, from the previous epoch's rows."""
        return ps_kd_targets(y, self.probs[idx], alpha)

    def write(self, idx, logits):
        """This step's predictions, softmax(z) of the augmented views in train mode, detached, into their rows."""
        self.probs[idx] = logits.detach().float().softmax(1)
        self.written[idx] = True


class SelfKDObjective(nn.Module):
    """The objective of one step of a Self-KD baseline (docs/method.md section 12), shaped like
    losses.BaselineObjective: forward(inputs, y, extra=None) -> (total, terms, backbone logits on `inputs`).

    net: for "byot" and "dks" a network returning (feats, logits) over heads, backbone last
    (model.MixSKDNet or model.StagedMixSKDNet); otherwise a classifier returning logits.
    extra: for "cs-kd" the partner images, one per anchor in `inputs`; for "ps-kd" the B x C soft
    targets (ps_kd_targets on the previous epoch's store, computed by the caller, who writes the
    softmax of the returned logits, detached, into the store).
    """

    def __init__(self, net, method, temperature=BASELINE_TEMPERATURE):
        super().__init__()
        check_method(method)
        self.net, self.method, self.temperature = net, method, temperature

    def forward(self, inputs, y, extra=None):
        if self.method in BRANCHED:
            feats, logits = self.net(inputs)
            if self.method == "byot":
                total, terms = byot_loss(feats, logits, y, self.temperature)
            else:
                total, terms = dks_loss(logits, y, self.temperature)
            return total, terms, logits[-1]
        logits = self.net(inputs)
        if self.method == "cs-kd":
            # a second forward, in train mode as released: BatchNorm's running statistics see the
            # partners too, and the partners build no graph
            with torch.no_grad():
                logits_partner = self.net(extra)
            total, terms = cs_kd_loss(logits, logits_partner, y, self.temperature)
            return total, terms, logits
        if self.method == "ps-kd":  # the soft CE on PS-KD's targets, logged under its method's name
            loss, term = ps_kd_loss(logits, extra), "ps_kd"
        else:
            loss, term = label_smoothing_loss(logits, y), "label_smooth"
        return loss, {term: loss.detach()}, logits
