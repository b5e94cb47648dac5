"""MixSKD checklist: one test per property of ../shared/SPEC.md, smallest case that shows it."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from losses import (TERMS, discriminator, discriminators, kd, loss_adv, loss_ce, loss_feat, loss_kd, loss_mix,
                    mixskd_loss, trained_parameters)
from mixup import cutmix, interp, mix_batch, mix_ce, mixup, sample_lam
from model import ARCHS, MixSKDNet, ResNet
from self_teacher import SelfTeacher

WIDTH, CLASSES, BATCH = 4, 10, 4


def count(module):
    return sum(p.numel() for p in module.parameters())


def tiny(recipe="paper", arch="resnet18", seed=0):
    """A narrow MixSKD net with its self-teacher and discriminators."""
    torch.manual_seed(seed)
    net = MixSKDNet(arch, CLASSES, WIDTH, stem_relu=recipe == "paper")
    channels = net.backbone.feature_channels
    return net, SelfTeacher(channels, CLASSES), discriminators(channels)


def batch(seed=0, n=BATCH):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def step_outputs(net, seed=0, mode="mixup"):
    x, y = batch(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    x_mix, perm, lam = mix_batch(x, 0.4, mode)
    feats, logits = net(torch.cat([x, x_mix]))
    return feats, logits, y, lam, perm


# ---------------------------------------------------------------- SPEC section 2: the network


@pytest.mark.parametrize("arch, backbone, branches, teacher, discs", [
    ("resnet18", 11_220_132, 30_060_076, 1_099_876, 263_688),
    ("resnet50", 23_705_252, 60_925_228, 16_982_116, None),
])
def test_parameter_counts_match_spec(arch, backbone, branches, teacher, discs):
    net = MixSKDNet(arch, 100)
    channels = net.backbone.feature_channels
    assert count(net.backbone) == backbone
    assert count(net.branches) == branches
    assert count(SelfTeacher(channels, 100)) == teacher
    if arch == "resnet18":
        assert count(net) + count(SelfTeacher(channels, 100)) == 42_380_084
        assert count(discriminators(channels)) == discs


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_head_gives_c_x_4_x_4_feature_map(arch):
    net = MixSKDNet(arch, CLASSES, WIDTH)
    feats, logits = net(torch.randn(2, 3, 32, 32))
    channels = 8 * WIDTH * ARCHS[arch][0].expansion
    assert net.backbone.feature_channels == channels
    assert [tuple(f.shape) for f in feats] == [(2, channels, 4, 4)] * 4
    assert [tuple(z.shape) for z in logits] == [(2, CLASSES)] * 4


def test_bare_backbone_equals_head_4():
    net, _, _ = tiny()
    net.eval()
    deployed = ResNet("resnet18", CLASSES, WIDTH)
    deployed.load_state_dict(net.backbone.state_dict())
    deployed.eval()
    x, _ = batch()
    torch.testing.assert_close(deployed(x), net(x)[1][-1], rtol=0, atol=0)


def test_branches_have_their_own_weights():
    net, _, _ = tiny()
    backbone_ptrs = {p.data_ptr() for p in net.backbone.parameters()}
    assert not backbone_ptrs & {p.data_ptr() for p in net.branches.parameters()}
    # fresh initialisation, not a copy of the backbone's stage 4
    assert not torch.equal(net.branches[2].layers[0][0].conv1.weight, net.backbone.layer4[0].conv1.weight)


def test_stem_relu_switch():
    x, _ = batch()
    with_relu = ResNet("resnet18", CLASSES, WIDTH, stem_relu=True)
    without = ResNet("resnet18", CLASSES, WIDTH, stem_relu=False)
    without.load_state_dict(with_relu.state_dict())
    assert with_relu.stem(x).min() >= 0
    assert without.stem(x).min() < 0
    torch.testing.assert_close(F.relu(without.stem(x)), with_relu.stem(x))


def test_unknown_arch_raises_naming_choices():
    with pytest.raises(ValueError, match="resnet18, resnet34, resnet50, resnet101"):
        ResNet("resnet20")


# ---------------------------------------------------------------- SPEC section 1: mixing


def test_lam_is_beta_distributed_in_open_interval():
    np.random.seed(0)
    lams = np.array([sample_lam(0.4) for _ in range(4000)])
    assert ((lams > 0) & (lams < 1)).all()
    assert abs(lams.mean() - 0.5) < 0.03  # Beta(a, a) has mean 1/2 ...
    assert abs(lams.var() - 0.25 / (2 * 0.4 + 1)) < 0.01  # ... and variance 1 / (4 (2a + 1))


@pytest.mark.parametrize("alpha", [0.0, -0.4])
def test_alpha_not_positive_raises(alpha):
    with pytest.raises(ValueError, match="alpha must be > 0"):
        sample_lam(alpha)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        mix_batch(torch.zeros(2, 3, 4, 4), alpha)


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_mixing_never_mutates_clean_batch_and_returns_a_permutation(mode):
    x, _ = batch()
    before = x.clone()
    x_mix, perm, lam = mix_batch(x, 0.4, mode)
    assert torch.equal(x, before)
    assert sorted(perm.tolist()) == list(range(BATCH))
    assert 0 < lam < 1 and x_mix.shape == x.shape


def test_eq1_mixup_pixelwise():
    x, _ = batch()
    perm = torch.tensor([2, 0, 3, 1])
    x_mix = mixup(x, 0.3, perm)
    for i in range(BATCH):
        torch.testing.assert_close(x_mix[i], 0.3 * x[i] + 0.7 * x[perm[i]])


def test_eq1prime_cutmix_lam_is_exact_kept_area():
    # image i is constant i, so each pixel of x_mix tells where it came from
    x = torch.arange(BATCH, dtype=torch.float).view(BATCH, 1, 1, 1).expand(BATCH, 3, 32, 32)
    perm = torch.tensor([1, 2, 3, 0])
    np.random.seed(3)
    for lam in np.linspace(0.05, 0.95, 19):
        x_mix, lam_kept = cutmix(x, float(lam), perm)
        kept = (x_mix == x).all(dim=1).float().mean(dim=(1, 2))
        assert torch.all(kept == lam_kept)
        pasted = (x_mix == x[perm]).all(dim=1).float().mean(dim=(1, 2))
        assert torch.all(pasted == 1 - lam_kept)


def test_eq2_interp_endpoints_and_midpoint():
    t = torch.randn(BATCH, 7)
    perm = torch.tensor([3, 2, 1, 0])
    assert torch.equal(interp(t, 1.0, perm), t)
    assert torch.equal(interp(t, 0.0, perm), t[perm])
    torch.testing.assert_close(interp(t, 0.5, perm), (t + t[perm]) / 2)


def test_eq3_mix_ce_endpoints():
    logits, y = torch.randn(BATCH, CLASSES), torch.tensor([1, 2, 3, 4])
    perm = torch.tensor([3, 2, 1, 0])
    torch.testing.assert_close(mix_ce(logits, y, 1.0, perm), F.cross_entropy(logits, y))
    torch.testing.assert_close(mix_ce(logits, y, 0.0, perm), F.cross_entropy(logits, y[perm]))
    expected = 0.25 * F.cross_entropy(logits, y) + 0.75 * F.cross_entropy(logits, y[perm])
    torch.testing.assert_close(mix_ce(logits, y, 0.25, perm), expected)


# ---------------------------------------------------------------- SPEC section 4: self-teacher


def test_eq4_self_teacher_is_linear_of_gap_of_conv1x1_of_concat():
    teacher = SelfTeacher(6, CLASSES)
    feats = [torch.randn(2, 6, 4, 4) for _ in range(4)]
    literal = teacher.fc(F.adaptive_avg_pool2d(teacher.conv(torch.cat(feats, 1)), 1).flatten(1))
    torch.testing.assert_close(teacher(feats), literal, rtol=1e-5, atol=1e-6)
    assert teacher.conv.weight.shape == (6, 24, 1, 1) and teacher.conv.bias is None


# ---------------------------------------------------------------- SPEC section 5: losses


def test_kd_is_zero_when_student_equals_teacher():
    z = torch.randn(BATCH, CLASSES)
    assert kd(z, z.clone(), 3.0).abs().item() < 1e-6


def test_kd_is_t_squared_times_kl_teacher_to_student():
    s, t = torch.randn(BATCH, CLASSES), torch.randn(BATCH, CLASSES)
    p_t, p_s = F.softmax(t / 3, 1), F.softmax(s / 3, 1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(1).mean()  # KL(teacher || student), batch mean
    torch.testing.assert_close(kd(s, t, 3.0), 9 * kl)
    assert not torch.allclose(kd(t, s, 3.0), kd(s, t, 3.0))  # the direction matters
    # scales with T^2: logits scaled by T at temperature T give the same distributions as at T = 1
    torch.testing.assert_close(kd(4 * s, 4 * t, 4.0), 16 * kd(s, t, 1.0))


def test_kd_no_gradient_reaches_teacher():
    s = torch.randn(BATCH, CLASSES, requires_grad=True)
    t = torch.randn(BATCH, CLASSES, requires_grad=True)
    kd(s, t, 3.0).backward()
    assert t.grad is None and s.grad.abs().sum() > 0


def test_eq5_ce_sums_heads_on_clean_images():
    zs, y = [torch.randn(BATCH, CLASSES) for _ in range(4)], torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(loss_ce(zs, y), sum(F.cross_entropy(z, y) for z in zs))


def test_eq6_mix_loss_covers_heads_and_both_teacher_outputs():
    zs = [torch.randn(BATCH, CLASSES) for _ in range(6)]
    y, perm = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 0, 3, 2])
    expected = sum(mix_ce(z, y, 0.3, perm) for z in zs)
    torch.testing.assert_close(loss_mix(zs[:4], zs[4], zs[5], y, 0.3, perm), expected)


def test_eq7_vanishes_when_each_student_matches_its_teacher():
    z_bar = [torch.randn(BATCH, CLASSES) for _ in range(4)]
    z_tilde = [z.clone() for z in z_bar[:3]] + [torch.randn(BATCH, CLASSES)]
    # backbone crossed: interpolated learns from teacher on mixed, mixed from teacher on interpolated
    teacher_mixed, teacher_interp = z_bar[3].clone(), z_tilde[3].clone()
    assert loss_kd(z_bar, z_tilde, teacher_interp, teacher_mixed, 3.0).abs() < 1e-5
    # uncrossed would not be zero
    assert loss_kd(z_bar, z_tilde, teacher_mixed, teacher_interp, 3.0) > 1e-2


def test_eq7_backbone_learns_from_teacher_crossed():
    z_bar = [torch.randn(BATCH, CLASSES, requires_grad=True) for _ in range(4)]
    z_tilde = [torch.randn(BATCH, CLASSES, requires_grad=True) for _ in range(4)]
    t_bar, t_tilde = torch.randn(BATCH, CLASSES, requires_grad=True), torch.randn(BATCH, CLASSES, requires_grad=True)
    loss = loss_kd(z_bar, z_tilde, t_bar, t_tilde, 3.0)
    expected = sum(kd(a, b, 3.0) + kd(b, a, 3.0) for a, b in zip(z_bar[:3], z_tilde[:3]))
    expected = expected + kd(z_bar[3], t_tilde, 3.0) + kd(z_tilde[3], t_bar, 3.0)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert t_bar.grad is None and t_tilde.grad is None  # the self-teacher is a detached target
    assert all(z.grad.abs().sum() > 0 for z in z_bar + z_tilde)


def test_eq8_feature_loss_is_mean_square_with_gradient_to_both_sides():
    f_bar = [torch.randn(2, 3, 4, 4, requires_grad=True) for _ in range(4)]
    f_tilde = [torch.randn(2, 3, 4, 4, requires_grad=True) for _ in range(4)]
    loss = loss_feat(f_bar, f_tilde)
    torch.testing.assert_close(loss, sum(((a - b) ** 2).mean() for a, b in zip(f_bar, f_tilde)))
    loss.backward()
    for a, b in zip(f_bar, f_tilde):
        torch.testing.assert_close(a.grad, -b.grad)
        assert a.grad.abs().sum() > 0


def test_eq9_targets_interpolated_10_mixed_01():
    torch.manual_seed(0)
    disc = discriminator(3)
    f_bar, f_tilde = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out = disc(torch.cat([f_bar.mean((2, 3)), f_tilde.mean((2, 3))]))
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    expected = F.binary_cross_entropy_with_logits(out, targets)
    torch.testing.assert_close(loss_adv([disc], [f_bar], [f_tilde], reverse=True), expected)


def test_eq10_discriminator_descends_while_features_get_reversed_gradient():
    torch.manual_seed(0)
    disc = discriminator(3)
    f_bar = torch.randn(2, 3, 4, 4, requires_grad=True)
    f_tilde = torch.randn(2, 3, 4, 4, requires_grad=True)

    loss_adv([disc], [f_bar], [f_tilde], reverse=False).backward()
    plain_feat_grad, plain_disc_grad = f_bar.grad.clone(), [p.grad.clone() for p in disc.parameters()]
    f_bar.grad = f_tilde.grad = None
    disc.zero_grad()
    loss_adv([disc], [f_bar], [f_tilde], reverse=True).backward()
    torch.testing.assert_close(f_bar.grad, -plain_feat_grad)
    for p, g in zip(disc.parameters(), plain_disc_grad):
        torch.testing.assert_close(p.grad, g)

    # a gradient step on each side alone: D makes L_adv smaller, the features make it larger
    def adv(d, a, b):
        return loss_adv([d], [a], [b], reverse=True).item()

    before = adv(disc, f_bar, f_tilde)
    moved_disc = copy.deepcopy(disc)
    with torch.no_grad():
        for p, q in zip(moved_disc.parameters(), disc.parameters()):
            p -= 0.5 * q.grad
        assert adv(moved_disc, f_bar, f_tilde) < before
        assert adv(disc, f_bar - 10 * f_bar.grad, f_tilde - 10 * f_tilde.grad) > before


def test_paper_recipe_every_parameter_gets_a_gradient():
    net, teacher, discs = tiny("paper")
    feats, logits, y, lam, perm = step_outputs(net)
    total, _ = mixskd_loss(feats, logits, y, lam, perm, teacher, discs, "paper")
    total.backward()
    for name, module in [("net", net), ("self_teacher", teacher), ("discriminators", discs)]:
        for pname, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname} got no gradient"
    params = trained_parameters("paper", net, teacher, discs)
    assert len(params) == len(list(net.parameters())) + len(list(teacher.parameters())) + len(list(discs.parameters()))


def test_self_teacher_learns_from_mix_loss_only_in_paper():
    net, teacher, discs = tiny("paper")
    feats, logits, y, lam, perm = step_outputs(net)
    total, _ = mixskd_loss(feats, logits, y, lam, perm, teacher, discs, "paper", weights={"mix": 0.0})
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_official_recipe_never_updates_self_teacher_or_discriminators():
    net, teacher, discs = tiny("official")
    assert not net.backbone.stem_relu
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    discs_before = {k: v.clone() for k, v in discs.state_dict().items()}
    net_before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(trained_parameters("official", net, teacher, discs), lr=0.1, momentum=0.9,
                          weight_decay=5e-4, nesterov=True)
    feats, logits, y, lam, perm = step_outputs(net)
    total, _ = mixskd_loss(feats, logits, y, lam, perm, teacher, discs, "official")
    total.backward()
    opt.step()
    assert all(p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k])
    for k, v in discs.state_dict().items():
        assert torch.equal(v, discs_before[k])
    assert any(not torch.equal(v, net_before[k]) for k, v in net.state_dict().items())


def test_official_total_is_ce_kd_feat_adv_without_mix():
    net, teacher, discs = tiny("official")
    feats, logits, y, lam, perm = step_outputs(net)
    total, terms = mixskd_loss(feats, logits, y, lam, perm, teacher, discs, "official")
    torch.testing.assert_close(total.detach(), terms["ce"] + terms["kd"] + terms["feat"] + terms["adv"],
                               rtol=0, atol=1e-6)
    assert terms["mix"] > 0  # computed and logged
    # official minimises L_adv: the feature gradient is the plain one, no reversal
    paper_total, paper_terms = mixskd_loss(feats, logits, y, lam, perm, teacher, discs, "paper")
    torch.testing.assert_close(paper_total.detach(), total.detach() + paper_terms["mix"], rtol=1e-6, atol=1e-5)


def test_official_adv_gradient_is_opposite_of_paper():
    net, teacher, discs = tiny("paper")
    feats, logits, y, lam, perm = step_outputs(net)
    feats = [f.detach().requires_grad_() for f in feats]
    logits = [z.detach() for z in logits]
    grads = {}
    for recipe in ("paper", "official"):
        only_adv = dict.fromkeys(TERMS, 0.0) | {"adv": 1.0}
        total, _ = mixskd_loss(feats, logits, y, lam, perm, teacher, discs, recipe, weights=only_adv)
        grads[recipe] = torch.autograd.grad(total, feats)
    for g_paper, g_official in zip(grads["paper"], grads["official"]):
        torch.testing.assert_close(g_paper, -g_official)
        assert g_paper.abs().sum() > 0


@pytest.mark.parametrize("term", TERMS)
def test_zero_weight_removes_its_term(term):
    net, teacher, discs = tiny("paper")
    feats, logits, y, lam, perm = step_outputs(net)
    total, terms = mixskd_loss(feats, logits, y, lam, perm, teacher, discs, "paper")
    without, _ = mixskd_loss(feats, logits, y, lam, perm, teacher, discs, "paper", weights={term: 0.0})
    torch.testing.assert_close(without, total - terms[term])
    doubled, _ = mixskd_loss(feats, logits, y, lam, perm, teacher, discs, "paper", weights={term: 2.0})
    torch.testing.assert_close(doubled, total + terms[term])


def test_unknown_recipe_and_weight_raise():
    net, teacher, discs = tiny()
    feats, logits, y, lam, perm = step_outputs(net)
    with pytest.raises(ValueError, match="paper, official"):
        mixskd_loss(feats, logits, y, lam, perm, teacher, discs, "released")
    with pytest.raises(ValueError, match="paper, official"):
        trained_parameters("released", net, teacher, discs)
    with pytest.raises(ValueError, match="unknown loss weights"):
        mixskd_loss(feats, logits, y, lam, perm, teacher, discs, weights={"kl": 1.0})


def test_lam_one_with_identity_pairing_has_no_mixup_signal():
    """At lam = 1 and perm = identity the mixed batch is the clean batch: interpolated and mixed
    outputs coincide (eval mode, so BatchNorm does not couple them), so L_feat vanishes and the
    branches' mutual KD vanishes."""
    net, teacher, discs = tiny()
    net.eval()
    x, y = batch()
    perm = torch.arange(BATCH)
    x_mix = mixup(x, 1.0, perm)
    feats, logits = net(torch.cat([x, x_mix]))
    _, terms = mixskd_loss(feats, logits, y, 1.0, perm, teacher, discs)
    assert terms["feat"] < 1e-10
    torch.testing.assert_close(terms["ce"], loss_ce([z[BATCH:] for z in logits], y))


@pytest.mark.parametrize("recipe", ["paper", "official"])
def test_overfits_one_small_batch(recipe):
    """Thirty steps on one fixed batch of 8 drive the loss and the backbone's CE clearly down:
    this fails when gradients are wired wrong (detached heads, reversed signs, frozen backbone)."""
    torch.manual_seed(0)
    net = MixSKDNet("resnet18", CLASSES, 8, stem_relu=recipe == "paper")
    teacher, discs = SelfTeacher(64, CLASSES), discriminators(64)
    opt = torch.optim.SGD(trained_parameters(recipe, net, teacher, discs), lr=0.02, momentum=0.9, nesterov=True)
    x, y = batch(n=8)
    np.random.seed(0)

    def backbone_ce():
        net.eval()
        with torch.no_grad():
            ce = F.cross_entropy(net.backbone(x), y).item()
        net.train()
        return ce

    ce_before, totals = backbone_ce(), []
    for _ in range(30):
        x_mix, perm, lam = mix_batch(x, 0.4)
        feats, logits = net(torch.cat([x, x_mix]))
        total, _ = mixskd_loss(feats, logits, y, lam, perm, teacher, discs, recipe)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        totals.append(total.item())
    assert np.mean(totals[-5:]) < 0.5 * np.mean(totals[:5])
    assert backbone_ce() < 0.4 * ce_before
