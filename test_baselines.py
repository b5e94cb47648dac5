"""Self-KD baselines checklist: one test per property of docs/method.md section 12, smallest case that shows it.

Each loss is checked against an independent derivation written here (explicit loops over samples,
classes and heads; nothing from baselines.py or losses.kd), at T = 4 where a temperature enters, and
each detach is checked on the gradients of leaf logits and feature maps.
"""
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import cli
import data
import errors
import eval as evaluation
import folders
import report
import runtime
import train
from baselines import (
    BRANCHED,
    SELF_KD_METHODS,
    PredictionStore,
    SelfKDObjective,
    byot_loss,
    cs_kd_loss,
    dks_loss,
    label_smoothing_loss,
    label_smoothing_targets,
    ps_kd_alpha,
    ps_kd_loss,
    ps_kd_targets,
    soft_cross_entropy,
)
from conftest import batch, metric_lines, settings_of
from model import MixSKDNet, ResNet

WIDTH, CLASSES, BATCH, T = 4, 10, 4, 4.0


def leaves(*shape, n=1, seed=0):
    """n random tensors that collect gradients, spread wide enough that the temperature matters."""
    g = torch.Generator().manual_seed(seed)
    return [(3 * torch.randn(*shape, generator=g)).requires_grad_() for _ in range(n)]


def ref_soft_ce(z, q):
    """-(1/B) sum_i sum_c q_ic log softmax(z_i)_c, one sample and one class at a time."""
    total = 0.0
    for i in range(z.shape[0]):
        log_p = z[i] - torch.logsumexp(z[i], 0)
        total = total - sum(q[i, c] * log_p[c] for c in range(z.shape[1]))
    return total / z.shape[0]


def ref_ce(z, y):
    return ref_soft_ce(z, F.one_hot(y, z.shape[1]).float())


def ref_kd(student, teacher, temperature=T):
    """T^2 KL(softmax(t / T) || softmax(s / T)), batch mean, written out per sample."""
    total = 0.0
    for s_i, t_i in zip(student, teacher.detach()):
        log_q, log_p = (t_i / temperature).log_softmax(0), (s_i / temperature).log_softmax(0)
        total = total + (log_q.exp() * (log_q - log_p)).sum()
    return temperature**2 * total / student.shape[0]


def close(a, b):
    torch.testing.assert_close(torch.as_tensor(a).float(), torch.as_tensor(b).float(), rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------- docs/method.md section 12.1: label smoothing


def test_12_1_targets_put_eps_over_c_minus_1_on_the_other_classes():
    y = torch.tensor([0, 3, 9, 3])
    q = label_smoothing_targets(y, CLASSES, 0.1)
    for i in range(BATCH):
        for c in range(CLASSES):
            assert q[i, c].item() == pytest.approx(0.9 if c == y[i] else 0.1 / 9)
    close(q.sum(1), torch.ones(BATCH))


def test_12_1_loss_matches_reference_and_is_not_pytorchs_label_smoothing():
    (z,) = leaves(BATCH, CLASSES)
    y = torch.tensor([0, 3, 9, 3])
    q = torch.full((BATCH, CLASSES), 0.1 / 9)
    q[torch.arange(BATCH), y] = 0.9
    loss = label_smoothing_loss(z, y)
    close(loss, ref_soft_ce(z, q))
    pytorch = F.cross_entropy(z, y, label_smoothing=0.1)  # eps / C off the true class
    assert abs(loss.item() - pytorch.item()) > 1e-3
    # the released targets are PyTorch's at eps C / (C - 1)
    close(loss, F.cross_entropy(z, y, label_smoothing=0.1 * CLASSES / (CLASSES - 1)))


def test_12_1_soft_cross_entropy_with_one_hot_targets_is_cross_entropy():
    (z,) = leaves(BATCH, CLASSES)
    y = torch.tensor([1, 2, 3, 4])
    close(soft_cross_entropy(z, F.one_hot(y, CLASSES)), F.cross_entropy(z, y))


# ------------------------------------------------------------------------------ docs/method.md section 12.2: BYOT


def test_12_2_byot_matches_reference():
    logits = leaves(BATCH, CLASSES, n=4)
    feats = leaves(BATCH, 8, 4, 4, n=4, seed=1)
    y = torch.tensor([1, 2, 3, 4])
    total, terms = byot_loss(feats, logits, y, temperature=T)
    ref = {"ce": sum(ref_ce(z, y) for z in logits),
           "kd": sum(ref_kd(z, logits[3]) for z in logits[:3]),
           "feat": 0.05 * sum(((f - feats[3].detach()) ** 2).sum() / f.numel() for f in feats[:3])}
    for t in ("ce", "kd", "feat"):
        close(terms[t], ref[t])
        assert not terms[t].requires_grad
    close(total, ref["ce"] + ref["kd"] + ref["feat"])


def test_12_2_byot_backbone_head_gets_ce_alone_and_its_feature_map_only_teaches():
    logits = leaves(BATCH, CLASSES, n=4)
    feats = leaves(BATCH, 8, 4, 4, n=4, seed=1)
    y = torch.tensor([1, 2, 3, 4])
    byot_loss(feats, logits, y, temperature=T)[0].backward()
    backbone = logits[3].detach().requires_grad_()
    ref_ce(backbone, y).backward()
    close(logits[3].grad, backbone.grad)  # no KD gradient into the teacher z_f
    assert feats[3].grad is None  # the hint never moves the backbone's feature map
    for f in feats[:3]:  # ... and pulls each branch's towards it
        close(f.grad, 0.05 * 2 * (f - feats[3]).detach() / f.numel())


def test_12_2_byot_kd_and_hint_reach_the_stages_the_branches_share_with_the_backbone():
    """The backbone's head gets CE alone, but its weights do not: branch k reads stage k's output, so BYOT's KD and
    hint terms reach conv1 and layer1-layer3; only layer4 and fc learn from CE alone (docs/method.md 12.2)."""
    torch.manual_seed(0)
    net = MixSKDNet("resnet18", CLASSES, WIDTH)
    x, y = batch()
    feats, logits = net(x)
    total, terms = byot_loss(feats, logits, y, temperature=T)
    (total - sum(F.cross_entropy(z.float(), y) for z in logits)).backward()  # the KD and hint terms alone
    reached = {name.split(".")[1] for name, p in net.backbone.named_parameters(prefix="backbone")
               if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached == {"conv1", "bn1", "layer1", "layer2", "layer3"}


# ------------------------------------------------------------------------------- docs/method.md section 12.3: DKS


def test_12_3_dks_sums_every_ordered_pair_of_heads():
    logits = leaves(BATCH, CLASSES, n=4)
    y = torch.tensor([1, 2, 3, 4])
    total, terms = dks_loss(logits, y, temperature=T)
    pairs = [(h, g) for h in range(4) for g in range(4) if h != g]
    assert len(pairs) == 12
    close(terms["kd"], sum(ref_kd(logits[h], logits[g]) for h, g in pairs))
    close(terms["ce"], sum(ref_ce(z, y) for z in logits))
    close(total, terms["ce"] + terms["kd"])


def test_12_3_dks_every_head_learns_only_as_student():
    logits = leaves(BATCH, CLASSES, n=4)
    y = torch.tensor([1, 2, 3, 4])
    dks_loss(logits, y, temperature=T)[0].backward()
    for h in range(4):
        z = logits[h].detach().requires_grad_()
        (ref_ce(z, y) + sum(ref_kd(z, logits[g]) for g in range(4) if g != h)).backward()
        close(logits[h].grad, z.grad)


# ----------------------------------------------------------------------------- docs/method.md section 12.4: CS-KD


def test_12_4_cs_kd_matches_reference_and_the_partner_only_teaches():
    z, z_partner = leaves(BATCH, CLASSES, n=2)
    y = torch.tensor([1, 2, 3, 4])
    total, terms = cs_kd_loss(z, z_partner, y, temperature=T)
    close(terms["ce"], ref_ce(z, y))
    close(terms["kd"], ref_kd(z, z_partner))  # T^2 = 16 included
    total.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert z_partner.grad is None


class Recorder(torch.nn.Module):
    """A classifier that notes, per forward, whether autograd was on."""

    def __init__(self, net):
        super().__init__()
        self.net, self.grad_enabled = net, []

    def forward(self, x):
        self.grad_enabled.append(torch.is_grad_enabled())
        return self.net(x)


def test_12_4_cs_kd_objective_forwards_partners_second_without_graph_and_bn_sees_them():
    x, y = batch()
    x_partner, _ = batch(seed=1)
    torch.manual_seed(0)
    net = Recorder(ResNet("resnet18", CLASSES, WIDTH))
    alone = ResNet("resnet18", CLASSES, WIDTH)
    alone.load_state_dict(net.net.state_dict())
    x_partner.requires_grad_()
    total, terms, logits = SelfKDObjective(net, "cs-kd", T)(x, y, extra=x_partner)
    total.backward()
    assert net.grad_enabled == [True, False]  # anchors with a graph, then partners under no_grad
    assert x_partner.grad is None
    close(logits, alone(x))  # the anchors' own forward: their BatchNorm statistics alone
    anchors_only = alone.bn1.running_mean.clone()
    alone(x_partner)
    close(net.net.bn1.running_mean, alone.bn1.running_mean)  # running statistics saw both forwards
    assert not torch.allclose(net.net.bn1.running_mean, anchors_only)
    with torch.no_grad():
        close(total, ref_ce(alone(x), y) + ref_kd(logits, alone(x_partner)))


# ----------------------------------------------------------------------------- docs/method.md section 12.5: PS-KD


def test_12_5_alpha_grows_linearly_to_alpha_T_at_the_last_epoch():
    assert ps_kd_alpha(0, 200) == pytest.approx(0.8 / 200)
    assert ps_kd_alpha(99, 200) == pytest.approx(0.4)
    assert ps_kd_alpha(199, 200) == pytest.approx(0.8)


def test_12_5_epoch_0_targets_are_one_hot():
    y = torch.tensor([1, 2, 3, 4])
    onehot = F.one_hot(y, CLASSES).float()
    close(ps_kd_targets(y, onehot, ps_kd_alpha(0, 200)), onehot)


def test_12_5_targets_mix_labels_and_previous_predictions_and_loss_is_soft_ce():
    y = torch.tensor([1, 2, 3, 4])
    previous = torch.randn(BATCH, CLASSES).softmax(1)
    alpha = ps_kd_alpha(49, 200)
    targets = ps_kd_targets(y, previous, alpha)
    for i in range(BATCH):
        for c in range(CLASSES):
            close(targets[i, c], (1 - alpha) * float(c == y[i]) + alpha * previous[i, c])
    close(targets.sum(1), torch.ones(BATCH))
    (z,) = leaves(BATCH, CLASSES)
    close(ps_kd_loss(z, targets), ref_soft_ce(z, targets))


# ------------------------------------------------------------------------ SelfKDObjective, every method


def objective_and_inputs(method):
    torch.manual_seed(0)
    net = MixSKDNet("resnet18", CLASSES, WIDTH) if method in BRANCHED else ResNet("resnet18", CLASSES, WIDTH)
    x, y = batch()
    extra = {"cs-kd": batch(seed=1)[0],
             "ps-kd": ps_kd_targets(y, torch.randn(BATCH, CLASSES).softmax(1), 0.5)}.get(method)
    return SelfKDObjective(net, method, T), net, x, y, extra


@pytest.mark.parametrize("method", SELF_KD_METHODS)
def test_objective_returns_backbone_logits_and_finite_terms(method):
    objective, net, x, y, extra = objective_and_inputs(method)
    total, terms, logits = objective(x, y, extra=extra)
    out = net(x)
    close(logits, out[1][-1] if method in BRANCHED else out)
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in terms.values())
    close(total, sum(terms.values()))
    # each term under its method's name: label smoothing's and PS-KD's soft CE are not the plain CE
    assert list(terms) == {"label-smooth": ["label_smooth"], "byot": ["ce", "kd", "feat"], "dks": ["ce", "kd"],
                           "cs-kd": ["ce", "kd"], "ps-kd": ["ps_kd"]}[method]


@pytest.mark.parametrize("method", SELF_KD_METHODS)
def test_objective_under_bf16_autocast_keeps_losses_float32_and_kd_non_negative(method):
    objective, _, x, y, extra = objective_and_inputs(method)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, terms, _ = objective(x, y, extra=extra)
    assert total.dtype == torch.float32
    if "kd" in terms:
        assert terms["kd"].item() >= 0


def test_losses_compute_in_float32_on_bf16_logits():
    """Outside autocast too (a network cast to bf16): the same value as on the float32 copies."""
    logits = [z.detach().bfloat16() for z in leaves(BATCH, CLASSES, n=4)]
    feats = [f.detach().bfloat16() for f in leaves(BATCH, 8, 4, 4, n=4, seed=1)]
    y = torch.tensor([1, 2, 3, 4])
    q = ps_kd_targets(y, torch.randn(BATCH, CLASSES).softmax(1), 0.5)
    as_float = [[t.float() for t in ts] for ts in (logits, feats)]
    for loss in (lambda z, f: label_smoothing_loss(z[0], y), lambda z, f: ps_kd_loss(z[0], q),
                 lambda z, f: byot_loss(f, z, y, T)[0], lambda z, f: dks_loss(z, y, T)[0],
                 lambda z, f: cs_kd_loss(z[0], z[1], y, T)[0]):
        ours = loss(logits, feats)
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, loss(*as_float), rtol=1e-6, atol=1e-6)


def test_unknown_method_raises_naming_choices():
    with pytest.raises(ValueError, match="label-smooth, byot, dks, cs-kd, ps-kd"):
        SelfKDObjective(ResNet("resnet18", CLASSES, WIDTH), "bake")


# ---------------------------------------------- The baselines in train.py: data, store, runs (runs are slow)


def tagged_data(labels):
    """A tensor dataset whose image i holds (i // 256, i % 256, 0) in every pixel, normalised to identity."""
    n = len(labels)
    index = torch.arange(n)
    x = torch.stack([index // 256, index % 256, 0 * index], 1).to(torch.uint8).view(n, 3, 1, 1).expand(-1, 3, 32, 32)
    return SimpleNamespace(kind="tensors", x_train=x.contiguous(), y_train=torch.as_tensor(labels), n_train=n,
                           num_classes=10,
                           class_names=None, stats=(torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)))


def tags(x):
    return (x[:, 0, 16, 16] * 256 + x[:, 1, 16, 16]).round().long()  # the centre pixel survives any crop and flip


def test_12_4_partners_are_of_the_anchors_class_and_drawn_from_seed_epoch_and_rank():
    labels = torch.cat([torch.tensor([0]), torch.arange(299) % 9 + 1])  # class 0: a single image
    d = tagged_data(labels)
    for rank in (0, 1):
        batches = list(data.train_batches(d, 25, 0, 3, rank, 2, extra="partner"))
        anchors, partners = (torch.cat([tags(b[k]) for b in batches]) for k in (0, 2))
        assert torch.equal(labels[partners], labels[anchors])  # same class, every one
        assert all(p == 0 for a, p in zip(anchors, partners) if a == 0)  # the single image: itself
        again = torch.cat([tags(b[2]) for b in data.train_batches(d, 25, 0, 3, rank, 2, extra="partner")])
        assert torch.equal(again, partners)  # a function of (seed, epoch, rank): a resumed epoch draws the same
        other = torch.cat([tags(b[2]) for b in data.train_batches(d, 25, 0, 4, rank, 2, extra="partner")])
        assert not torch.equal(other[:len(partners)], partners)


def test_12_4_partner_is_uniform_over_the_class_the_image_itself_included():
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    classes = data.class_members(labels)
    g = torch.Generator().manual_seed(0)
    drawn = torch.stack([data.same_class_partner(labels, classes, g) for _ in range(4000)])
    assert torch.equal(labels[drawn], labels.expand_as(drawn))
    share = torch.stack([(drawn == k).float().mean(0) for k in range(8)])  # share[k, i]: anchor i got image k
    expected = (labels[:, None] == labels[None, :]).float() / 4
    assert (share - expected).abs().max() < 0.03


def test_12_4_folder_partners_are_of_the_anchors_class_in_any_worker():
    items = [(torch.tensor([i]), i % 3) for i in range(12)]  # an ImageFolder-like dataset: (image, label)
    base = SimpleNamespace(targets=[y for _, y in items], __len__=lambda: 12)
    folder = type("Folder", (), {"__getitem__": lambda self, i: items[i], "__len__": lambda self: 12,
                                 "targets": base.targets})()
    subset = torch.utils.data.Subset(folder, [1, 2, 4, 5, 7, 8, 10, 11])  # a validation split took the rest
    paired = folders.WithExtra(subset, "partner", 0, 5)
    for i in range(len(subset)):
        x, y, partner = paired[i]
        assert int(partner) % 3 == y and int(partner) in subset.indices
        assert torch.equal(folders.WithExtra(subset, "partner", 0, 5)[i][2], partner)  # the same in every worker
    assert [paired.dataset[i][0] for i in range(8)] == [subset[i][0] for i in range(8)]
    assert folders.WithExtra(subset, "index", 0, 5)[3][2] == 3


def test_12_4_a_class_of_one_training_image_is_named_in_a_note(capsys):
    d = SimpleNamespace(kind="tensors", y_train=torch.tensor([0, 1, 1, 2, 2]), num_classes=3,
                        class_names=["cat", "dog", "fox"])
    data.note_single_image_classes(d)
    assert capsys.readouterr().err == ("note: class 0 (cat) has one training image: CS-KD pairs it with itself, "
                                       "as the released sampler does\n")


def test_12_0_temperature_defaults_and_applies_to_distilling_methods_only(capsys):
    assert [settings_of(["--method", m]).hp["temperature"] for m in ("mixskd", "byot", "dks", "cs-kd")] == [3, 4, 4, 4]
    assert "temperature" not in settings_of(["--method", "ps-kd"]).hp
    with pytest.raises(SystemExit):
        cli.parse_args(["--method", "label-smooth", "--temperature", "2"])
    assert "--method label-smooth does not read --temperature" in capsys.readouterr().err


def test_12_5_store_rows_merge_across_ranks():
    """Each of two processes writes its own rows; after the merge both hold every row, bit for bit."""
    import torch.multiprocessing as mp

    mp.spawn(merge_two_ranks, args=(str(Path(__import__("tempfile").mkdtemp()) / "rendezvous"),), nprocs=2)


def merge_two_ranks(rank, path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    store = PredictionStore(torch.arange(10) % 3, 3)
    mine = torch.arange(rank, 9, 2)  # rank 0: 0, 2, 4, 6, 8; rank 1: 1, 3, 5, 7; row 9 is never drawn
    store.write(mine, torch.randn(len(mine), 3, generator=torch.Generator().manual_seed(rank)))
    written = store.probs.clone()
    runtime.merge_store(store, 2, rows=4)  # in chunks
    theirs = [written if r == rank else None for r in range(2)]
    dist.all_gather_object(theirs, written)
    for r, rows in enumerate(theirs):
        assert torch.equal(store.probs[r:9:2], rows[r:9:2])
    assert torch.equal(store.probs[9], torch.tensor([1.0, 0.0, 0.0])) and not store.written.any()
    dist.destroy_process_group()


def ps_kd_run(npz, out, *extra):
    train.main(["--dataset", npz, "--width", "4", "--batch-size", "48", "--warmup-epochs", "1", "--method", "ps-kd",
                "--out", str(out), *extra])


@pytest.mark.slow
def test_12_5_targets_are_read_from_the_previous_epochs_predictions(tiny_npz, tmp_path, monkeypatch):
    """A real run: every target of epoch 2 is (1 - alpha) onehot + alpha (softmax written in epoch 1); those of
    epoch 1, and of the images epoch 1 did not draw (its dropped last batch), the one-hot labels."""
    reads, writes, real_targets, real_write = [], [], PredictionStore.targets, PredictionStore.write
    monkeypatch.setattr(PredictionStore, "targets", lambda self, idx, y, alpha: reads.append(
        (idx.clone(), y.clone(), alpha, real_targets(self, idx, y, alpha))) or reads[-1][3])
    monkeypatch.setattr(PredictionStore, "write", lambda self, idx, logits: writes.append(
        (idx.clone(), logits.detach().float().softmax(1))) or real_write(self, idx, logits))
    ps_kd_run(tiny_npz, tmp_path, "--epochs", "2", "--val-split", "16")  # 240 train: 5 steps of 48 an epoch
    assert len(reads) == len(writes) == 10
    written = {int(i): p for idx, probs in writes[:5] for i, p in zip(idx, probs)}
    assert len(written) == 240
    for step, (idx, y, alpha, targets) in enumerate(reads):
        assert alpha == pytest.approx(0.8 * (step // 5 + 1) / 2)
        for i, label, target in zip(idx.tolist(), y, targets):
            onehot = F.one_hot(label, 10).float()
            previous = written[i] if step >= 5 else onehot
            close(target, (1 - alpha) * onehot + alpha * previous)


@pytest.mark.slow
def test_12_5_alpha_t_is_logged_a_one_epoch_run_says_it_is_ce_and_an_extension_never_lowers_it(tiny_npz, tmp_path,
                                                                                                capsys):
    """metrics.jsonl logs alpha_t every epoch; a run of one epoch has no previous predictions, so it says it trains
    plain CE; --extend continues a finished run with alpha_t no lower than its last (--extend-schedule capped, as
    the lr never rises) or on the new length's schedule (new)."""
    ps_kd_run(tiny_npz, tmp_path / "one", "--epochs", "1")
    assert "a run of one epoch has none: its targets are the labels, so this run trains plain cross-entropy" in (
        capsys.readouterr().err)
    ps_kd_run(tiny_npz, tmp_path / "two", "--epochs", "2")
    assert "plain cross-entropy" not in capsys.readouterr().err
    assert [r["ps_kd_alpha"] for r in metric_lines(tmp_path / "two")] == [pytest.approx(0.4), pytest.approx(0.8)]
    for schedule, alphas in (("capped", [0.8, 0.8]), ("new", [0.6, 0.8])):
        run = shutil.copytree(tmp_path / "two", tmp_path / schedule)
        train.main(["--out", str(run), "--resume", "--extend", "--epochs", "4", "--extend-schedule", schedule])
        assert [r["ps_kd_alpha"] for r in metric_lines(run)][2:] == [pytest.approx(a) for a in alphas], schedule


@pytest.mark.slow
def test_12_5_an_interrupted_run_resumes_bitwise_and_is_refused_without_its_store(tiny_npz, tmp_path,
                                                                                  stopped_after_first_checkpoint):
    """Two epochs straight, and two epochs stopped by Ctrl-C after the first and resumed with --resume alone:
    the same weights and store, bit for bit, and one experiment to the results table. A last.pt whose store is
    missing or of another shape is refused in one line and left as it was."""
    ps_kd_run(tiny_npz, tmp_path / "straight", "--epochs", "2", "--val-split", "16")
    stopped_after_first_checkpoint(ps_kd_run, tiny_npz, tmp_path / "resumed", "--epochs", "2", "--val-split", "16")
    ckpt = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["ps_kd_store"].shape == (240, 10)  # a row per image that trains
    (tmp_path / "copy").mkdir()
    for broken, named in ((None, "holds no PS-KD store"), (torch.zeros(256, 10), "a PS-KD store of (256, 10)")):
        torch.save({**ckpt, "ps_kd_store": broken}, tmp_path / "copy" / "last.pt")
        kept = (tmp_path / "copy" / "last.pt").read_bytes()
        with pytest.raises(errors.UserError, match=re.escape(named)):
            train.main(["--out", str(tmp_path / "copy"), "--resume"])
        assert (tmp_path / "copy" / "last.pt").read_bytes() == kept  # nothing overwritten
    train.main(["--out", str(tmp_path / "resumed"), "--resume"])
    straight, resumed = (torch.load(tmp_path / run / "last.pt", weights_only=True) for run in ("straight", "resumed"))
    assert torch.equal(straight["ps_kd_store"], resumed["ps_kd_store"])
    for k, v in straight["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    assert torch.load(tmp_path / "resumed" / "best.pt", weights_only=True)["ps_kd_store"] is None
    runs = [report.read_run(tmp_path / run) for run in ("straight", "resumed")]
    assert report.experiment(runs[0]) == report.experiment(runs[1])


@pytest.mark.slow
@pytest.mark.parametrize("method", BRANCHED)
def test_byot_and_dks_train_their_branches_deploy_the_backbone_and_eval_reports_every_head(method, tiny_npz,
                                                                                           tmp_path, capsys):
    train.main(["--dataset", tiny_npz, "--width", "4", "--batch-size", "32", "--epochs", "1", "--method", method,
                "--out", str(tmp_path)])
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith(f"{method} T 4 | resnet18 width 4, backbone and 3 branches on tiny")
    last, deploy = (torch.load(tmp_path / f, weights_only=True) for f in ("last.pt", "deploy.pt"))
    assert any(k.startswith("branches.2.") for k in last["model"]) and last["self_teacher"] is None
    ResNet("resnet18", CLASSES, WIDTH).load_state_dict(deploy["backbone"])  # strict: the backbone alone
    evaluation.main([str(tmp_path / "last.pt")])
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == ["backbone", "branch1", "branch2", "branch3"]


def test_its_kd_is_the_kd_of_losses_py():
    """baselines.py carries its own copy of KD so that it can be copied alone: the same function."""
    import baselines
    import losses

    student, teacher = leaves(BATCH, CLASSES, n=2)
    close(baselines.kd(student, teacher, T), losses.kd(student, teacher, T))
