"""Evaluate a checkpoint: top-1, top-5, NLL and ECE of every head, backbone first.

    python eval.py runs/cifar100-resnet18-mixskd-paper-seed0/last.pt
    python eval.py deploy.pt --dataset cifar100 --json
    python eval.py released_ckpt.pth.tar --dataset cifar100     # the authors' released CIFAR script
    python eval.py --table runs/*/                              # markdown table over seeds
    python eval.py --plot runs/*/ --out results.png             # curves (needs matplotlib)

Accepts this project's last.pt / best.pt (every head and the self-teacher), deploy.pt (the backbone
alone) and checkpoints of the released CIFAR script (SPEC section 11, mapped by name). SPEC section 8:
the backbone is the deployed network, so its row comes first and is the headline.
"""
import argparse
import json
import os
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F

from data import UserError, eval_batches, load_dataset, pixel_stats
from model import ARCHS, Bottleneck, MixSKDNet, ResNet
from self_teacher import SelfTeacher

HEADS = ("backbone", "branch1", "branch2", "branch3", "self_teacher")

# ----------------------------------------------------------------------------- metrics


def expected_calibration_error(probs, y, bins=15):
    """ECE: |accuracy - confidence| per equal-width confidence bin, weighted by the bin's share."""
    confidence, prediction = probs.max(1)
    confidence = confidence.nan_to_num(0.0)  # a diverged model's NaN outputs count as confidence 0
    correct = (prediction == y).float()
    bin_index = (confidence * bins).ceil().clamp(1, bins).long() - 1  # bins (0, 1/15], ..., (14/15, 1]
    counts = torch.zeros(bins).index_add_(0, bin_index, torch.ones_like(confidence))
    gap = torch.zeros(bins).index_add_(0, bin_index, correct - confidence)
    return (gap.abs().sum() / counts.sum()).item()


def head_metrics(logits, y):
    """top-1 and top-5 accuracy in percent, mean NLL, and ECE (15 bins) of one head's logits."""
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return {  # counts to Python floats, so 38.7 prints as 38.7, not 38.6999995
        "top1": 100.0 * (top5[:, 0] == y).sum().item() / len(y),
        "top5": 100.0 * (top5 == y[:, None]).any(1).sum().item() / len(y),
        "nll": F.cross_entropy(logits, y).item(),
        "ece": expected_calibration_error(logits.softmax(1), y),
    }


@torch.no_grad()
def evaluate(model, self_teacher, data, batch_size=500, channels_last=False):
    """Metrics of every head on the test set, in fp32, model in eval mode: {head: {top1, ...}}.

    model: a MixSKDNet (heads, and the self-teacher on clean-image features when given) or a plain
    ResNet (the backbone row only). Restores the model's train/eval mode afterwards.
    """
    was_training = model.training
    model.eval()
    outputs, labels = {}, []
    for x, y in eval_batches(data, batch_size):
        labels.append(y.cpu())
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if isinstance(model, MixSKDNet):
            feats, logits = model(x)
            heads = {"backbone": logits[-1], "branch1": logits[0], "branch2": logits[1], "branch3": logits[2]}
            if self_teacher is not None:
                heads["self_teacher"] = self_teacher(feats)
        else:
            heads = {"backbone": model(x)}
        for name, z in heads.items():
            outputs.setdefault(name, []).append(z.float().cpu())
    model.train(was_training)
    y = torch.cat(labels)
    return {name: head_metrics(torch.cat(outputs[name]), y) for name in HEADS if name in outputs}


# ----------------------------------------------------------------------------- checkpoints


def read_checkpoint(path):
    """torch.load(weights_only=True) onto the CPU, with one-line errors for missing, truncated or
    foreign files. (On the CPU because RNG states must stay there; weights are copied to the model.)"""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read checkpoint {path}: truncated, corrupt or not a PyTorch checkpoint ({reason})") from None


def load_state(module, state, what):
    """load_state_dict(strict) with a one-line error naming the first missing, unexpected or
    mis-shaped key, the sign of a checkpoint made for another arch, width or class count."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        detail = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected else
                  f"{shapes[0]} is {tuple(state[shapes[0]].shape)}, expected {tuple(own[shapes[0]].shape)}")
        raise UserError(f"{what} does not fit the model ({len(missing)} missing, {len(unexpected)} unexpected, "
                        f"{len(shapes)} mis-shaped keys; {detail}): another arch, width or class count?")
    module.load_state_dict(state)


def released_to_ours(state):
    """Map a state dict of the released MixSKD CIFAR network (SPEC section 11) onto ours.

    Returns (meta, net_state, teacher_state); meta holds arch, num_classes, width, stem_relu (False:
    the released network has no stem ReLU, SPEC section 6, item 5). Any key that does not map raises.
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    net_state, teacher_state = {}, {}
    for key, value in state.items():
        if key.startswith("backbone."):
            net_state[key] = value
        elif m := re.fullmatch(r"auxiliary_classifier\.block_extractor([123])\.(.+)", key):
            net_state[f"branches.{int(m[1]) - 1}.layers.{m[2]}"] = value
        elif m := re.fullmatch(r"auxiliary_classifier\.fc([123])\.(weight|bias)", key):
            net_state[f"branches.{int(m[1]) - 1}.fc.{m[2]}"] = value
        elif m := re.fullmatch(r"final_aux_classifier\.(conv\.weight|fc\.weight|fc\.bias)", key):
            teacher_state[m[1]] = value
        else:
            raise UserError(f"released checkpoint key {key!r} does not map onto this implementation (SPEC section 11)")
    meta = {**backbone_config(net_state, "backbone.", "released checkpoint"), "stem_relu": False}
    return meta, net_state, teacher_state


def backbone_config(state, prefix, what):
    """arch, num_classes, width and stem of the ResNet whose weights `state` holds under `prefix`."""
    try:
        depths = tuple(1 + max(int(m[1]) for k in state if (m := re.match(rf"{prefix}layer{s}\.(\d+)\.", k)))
                       for s in (1, 2, 3, 4))
        bottleneck = f"{prefix}layer1.0.conv3.weight" in state
        arch = next(a for a, (block, d) in ARCHS.items() if d == depths and (block is Bottleneck) == bottleneck)
        conv1 = state[f"{prefix}conv1.weight"]
        return {"arch": arch, "num_classes": state[f"{prefix}fc.weight"].shape[0], "width": conv1.shape[0],
                "stem": "imagenet" if conv1.shape[-1] == 7 else "cifar"}
    except (ValueError, StopIteration, KeyError):
        raise UserError(f"{what}: cannot recognise a ResNet-18/34/50/101 in its keys") from None


def model_from_checkpoint(ckpt, path):
    """Build the network a checkpoint holds: (model, self_teacher or None, meta).

    Our last.pt/best.pt: the trained model (MixSKDNet, or ResNet for the baselines) and the
    self-teacher; deploy.pt: the backbone alone; the released script's {'net': ...}: mapped by name;
    a plain torchvision ResNet state dict (conv1.weight, ..., fc.weight): the backbone alone.
    """
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} is not a checkpoint of this project or of the released code")
    if "conv1.weight" in ckpt and "fc.weight" in ckpt:  # torchvision's layout, which ResNet shares
        meta = {**backbone_config(ckpt, "", f"torchvision checkpoint {path}"), "stem_relu": True}
        model = ResNet(meta["arch"], meta["num_classes"], meta["width"], True, meta["stem"])
        load_state(model, ckpt, f"torchvision checkpoint {path}")
        return model, None, meta
    if "net" in ckpt and "meta" not in ckpt:
        meta, net_state, teacher_state = released_to_ours(ckpt["net"])
        model = MixSKDNet(meta["arch"], meta["num_classes"], meta["width"], meta["stem_relu"], meta["stem"])
        load_state(model, net_state, f"released checkpoint {path}")
        teacher = None
        if teacher_state:
            teacher = SelfTeacher(model.backbone.feature_channels, meta["num_classes"])
            load_state(teacher, teacher_state, f"released checkpoint {path} (self-teacher)")
        return model, teacher, meta
    if "meta" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this project or of the released code (no 'meta' or 'net')")
    meta = ckpt["meta"]
    config = (meta["arch"], meta["num_classes"], meta["width"], meta["stem_relu"], meta.get("stem", "cifar"))
    if "backbone" in ckpt:  # deploy.pt
        model = ResNet(*config)
        load_state(model, ckpt["backbone"], f"deploy checkpoint {path}")
        return model, None, meta
    model = MixSKDNet(*config) if meta["method"] == "mixskd" else ResNet(*config)
    load_state(model, ckpt["model"], f"checkpoint {path}")
    teacher = None
    if ckpt.get("self_teacher") is not None:
        teacher = SelfTeacher(model.backbone.feature_channels, meta["num_classes"])
        load_state(teacher, ckpt["self_teacher"], f"checkpoint {path} (self-teacher)")
    return model, teacher, meta


# ----------------------------------------------------------------------------- runs: table and figure


def read_run(run_dir):
    """(arguments, per-epoch records, summary or None) of a train.py run folder."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise UserError(f"{run_dir} is not a run folder of train.py (no metrics.jsonl)")
    with open(path) as f:
        records = [json.loads(line) for line in f]
    if not records:
        raise UserError(f"{path} is empty: the run has not finished an epoch")
    summary_path = os.path.join(run_dir, "summary.json")
    summary = None
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
    args = summary["args"] if summary else read_checkpoint(os.path.join(run_dir, "last.pt"))["args"]
    return args, records, summary


METHOD_ORDER = ("ce", "mixup", "cutmix", "mixskd paper", "mixskd official")


def method_label(args):
    return f"{args['method']} {args['recipe']}" if args["method"] == "mixskd" else args["method"]


def sorted_runs(run_dirs):
    """[(args, records), ...] in a fixed method order, then by seed."""
    runs = [read_run(d)[:2] for d in run_dirs]
    rank = lambda label: METHOD_ORDER.index(label) if label in METHOD_ORDER else len(METHOD_ORDER)
    return sorted(runs, key=lambda run: (rank(method_label(run[0])), run[0]["seed"]))


def mean_std(values, digits=2):
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def results_table(run_dirs):
    """Markdown table, one row per method over its seeds, each number labelled by what it is."""
    groups = {}
    for args, records in sorted_runs(run_dirs):
        groups.setdefault(method_label(args), []).append(records)
    rows = ["| method | seeds | epochs | final backbone top-1 (headline) | best-epoch backbone top-1 | "
            "max over heads and epochs (released code's way) | self-teacher top-1 | backbone ECE | "
            "training time per run (min) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, runs in groups.items():
        final = [r[-1]["test"] for r in runs]
        best = [max(e["test"]["backbone"]["top1"] for e in r) for r in runs]
        released = [max(m["top1"] for e in r for h, m in e["test"].items() if h != "self_teacher") for r in runs]
        teacher = [f["self_teacher"]["top1"] for f in final if "self_teacher" in f]
        rows.append(f"| {label} | {len(runs)} | {len(runs[0])} | {mean_std([f['backbone']['top1'] for f in final])} | "
                    f"{mean_std(best)} | {mean_std(released)} | {mean_std(teacher) if teacher else '-'} | "
                    f"{mean_std([f['backbone']['ece'] for f in final], 3)} | "
                    f"{mean_std([sum(e['epoch_time'] for e in r) / 60 for r in runs], 1)} |")
    return "\n".join(rows)


def plot_runs(run_dirs, out):
    """Test top-1 of the backbone per epoch for every run; the loss terms of the first MixSKD run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib, an optional dependency: pip install matplotlib") from None
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    runs = sorted_runs(run_dirs)
    colours, seen = {}, {}
    for args, records in runs:  # one colour per method, one line style per seed
        label = method_label(args)
        colour = colours.setdefault(label, f"C{len(colours)}")
        seen[label] = seen.get(label, -1) + 1
        acc_ax.plot([r["epoch"] for r in records], [r["test"]["backbone"]["top1"] for r in records], lw=1,
                    color=colour, ls=("-", "--", ":", "-.")[seen[label] % 4], label=f"{label} seed {args['seed']}")
    acc_ax.set(xlabel="epoch", ylabel="test top-1 of the backbone (%)", title="deployed network, every run")
    acc_ax.legend(fontsize=7, ncol=2)
    mixskd = [run for run in runs if run[0]["method"] == "mixskd"]
    if mixskd:  # the paper recipe's run when there is one: its every term is optimised
        args, records = next((run for run in mixskd if run[0]["recipe"] == "paper"), mixskd[0])
        for term in records[0]["loss"]:
            loss_ax.plot([r["epoch"] for r in records], [r["loss"][term] for r in records], lw=1,
                         label=term if term == "total" else f"L_{term}")
        loss_ax.set(xlabel="epoch", ylabel="mean over the epoch", yscale="log",
                    title=f"loss terms, {method_label(args)} seed {args['seed']}")
        loss_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    return out


# ----------------------------------------------------------------------------- command line


def format_table(metrics):
    lines = [f"{'head':<13}{'top-1':>8}{'top-5':>8}{'NLL':>8}{'ECE':>8}"]
    for head, m in metrics.items():
        lines.append(f"{head:<13}{m['top1']:>8.2f}{m['top5']:>8.2f}{m['nll']:>8.4f}{m['ece']:>8.4f}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a MixSKD checkpoint (last.pt, best.pt, deploy.pt or the "
                                            "released code's) on the test set: top-1, top-5, NLL, ECE per head.")
    p.add_argument("checkpoint", nargs="?", help="path of the checkpoint")
    p.add_argument("--table", nargs="+", metavar="RUN_DIR", help="print a markdown table of finished runs instead")
    p.add_argument("--plot", nargs="+", metavar="RUN_DIR",
                   help="draw test top-1 per epoch of these runs and a MixSKD run's loss terms (needs matplotlib)")
    p.add_argument("--out", default="results.png", help="image file that --plot writes")
    p.add_argument("--dataset", default=None, help="cifar10, cifar100 or PATH.npz (default: the one it was trained on)")
    p.add_argument("--data", default="./data", help="torchvision dataset root (default ./data)")
    p.add_argument("--batch-size", type=int, default=500, help="evaluation batch size (default 500)")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers for ImageNet (default 8)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        print(results_table(args.table))
        return
    if args.plot:
        print(plot_runs(args.plot, args.out))
        return
    if args.checkpoint is None:
        raise UserError("name a checkpoint to evaluate, or pass --table / --plot with run folders")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = read_checkpoint(args.checkpoint)
    model, teacher, meta = model_from_checkpoint(ckpt, args.checkpoint)
    dataset = args.dataset or meta.get("dataset")
    if dataset is None:
        raise UserError(f"{args.checkpoint} does not record its dataset: pass --dataset cifar10, cifar100 or PATH.npz")
    data = load_dataset(dataset, args.data, device, meta.get("image_size", 224), args.workers)
    if data.num_classes > meta["num_classes"]:
        raise UserError(f"{args.checkpoint} has {meta['num_classes']} classes but {dataset} has {data.num_classes}")
    if "mean" in meta:  # normalise as in training, whatever the dataset argument
        data.mean, data.std = meta["mean"], meta["std"]
        data.stats = pixel_stats(meta["mean"], meta["std"], device)
    # as train.py evaluates: channels_last on CUDA (cuDNN may still choose other kernels than it did)
    channels_last = device.type == "cuda"
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if teacher is not None:
        teacher.to(device)
    metrics = evaluate(model, teacher, data, args.batch_size, channels_last)
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "dataset": dataset, "heads": metrics}))
    else:
        print(f"{args.checkpoint} on {data.name} ({data.n_test} test images)")
        print(format_table(metrics))


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
