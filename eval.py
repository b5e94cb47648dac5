"""Evaluate a checkpoint: top-1, top-5, NLL and ECE of every head, backbone first; per class; on image files.

    python eval.py runs/cifar100-resnet18-mixskd-paper-seed0/last.pt
    python eval.py deploy.pt --dataset cifar100 --json
    python eval.py deploy.pt --per-class                        # top-1 per class, confusion matrix
    python eval.py deploy.pt --predict my_images/               # top-5 classes of every image file
    python eval.py --plot runs/cifar100-resnet18-mixskd-paper-seed0 --per-class   # confusion matrix figure
    python eval.py released_ckpt.pth.tar --dataset cifar100     # the authors' released CIFAR script
    python eval.py --table runs/*/                              # markdown table over seeds
    python eval.py --plot runs/*/ --out results.png             # curves (needs matplotlib)
    python eval.py --budget runs/length/ --out budget.png       # final top-1 against epochs and minutes

Accepts this project's last.pt / best.pt (every head and the self-teacher), deploy.pt (the backbone
alone), checkpoints of the released scripts (docs/method.md section 11) and torchvision ResNet state dicts, as
checkpoints.py reads them. docs/method.md section 8: the backbone is the deployed network, so its row comes
first and is the headline. `--table` hands run folders to report.py, `--plot` and `--budget` to figures.py,
`--predict` image files to predict.py.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

import figures
import report
from checkpoints import check_classes, model_from_checkpoint, read_checkpoint, recorded_dataset
from data import eval_batches, load_dataset, pixel_stats
from errors import ArgumentParser, UserError, run_cli
from predict import print_predictions
from runtime import pick_device

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
    """top-1 and top-5 accuracy in percent (no top-5 for 5 classes or fewer, where it is 100 by construction),
    mean NLL, and ECE (15 bins) of one head's logits."""
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    top1, nll = 100.0 * (top5[:, 0] == y).sum().item() / len(y), F.cross_entropy(logits, y).item()
    return {"top1": top1,  # counts to Python floats, so 38.7 prints as 38.7, not 38.6999995
            **({"top5": 100.0 * (top5 == y[:, None]).any(1).sum().item() / len(y)} if logits.shape[1] > 5 else {}),
            "nll": nll, "ece": expected_calibration_error(logits.softmax(1), y)}


@torch.no_grad()
def head_logits(model, self_teacher, data, batch_size=500, channels_last=False, split="test"):
    """Logits of every head on the test set (split="val": the validation split), in fp32 on the CPU, model in
    eval mode, and the labels: ({head: N x C}, y of N), the backbone first.

    model: a MixSKD network (every head, and the self-teacher on clean-image features when given) or a
    plain network (the backbone row only). Restores the model's train/eval mode afterwards.
    """
    was_training = model.training
    model.eval()
    outputs, labels = {}, []
    for x, y in eval_batches(data, batch_size, split):
        labels.append(y.cpu())
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if hasattr(model, "branches"):
            feats, logits = model(x)
            heads = {"backbone": logits[-1], **{f"branch{k + 1}": z for k, z in enumerate(logits[:-1])}}
            if self_teacher is not None:
                heads["self_teacher"] = self_teacher(feats)
        else:
            heads = {"backbone": model(x)}
        for name, z in heads.items():
            outputs.setdefault(name, []).append(z.float().cpu())
    model.train(was_training)
    return {name: torch.cat(z) for name, z in outputs.items()}, torch.cat(labels)


def evaluate(model, self_teacher, data, batch_size=500, channels_last=False, split="test"):
    """Metrics of every head on the test set (or split="val"): {head: {top1, top5, nll, ece}}, as head_logits."""
    outputs, y = head_logits(model, self_teacher, data, batch_size, channels_last, split)
    return {name: head_metrics(z, y) for name, z in outputs.items()}


def per_class(logits, y, class_names=None):
    """One head's results per class: the images of each class, its top-1 in percent (None without images),
    and the confusion matrix (counts; row: true class, column: predicted class), as lists for JSON."""
    c = logits.shape[1]
    confusion = torch.bincount(y * c + logits.argmax(1), minlength=c * c).view(c, c)
    images, hits = confusion.sum(1).tolist(), confusion.diag().tolist()
    return {"class_names": list(class_names or [str(k) for k in range(c)]), "images": images,
            "top1": [100.0 * hit / n if n else None for hit, n in zip(hits, images)], "confusion": confusion.tolist()}


# ----------------------------------------------------------------------------- command line


def format_table(metrics):
    top5 = "top5" in next(iter(metrics.values()))
    lines = [f"{'head':<13}{'top-1':>8}{'top-5' if top5 else '':>8}{'NLL':>8}{'ECE':>8}"]
    for head, m in metrics.items():
        top5_cell = f"{m['top5']:>8.2f}" if top5 else " " * 8
        lines.append(f"{head:<13}{m['top1']:>8.2f}{top5_cell}{m['nll']:>8.4f}{m['ece']:>8.4f}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = ArgumentParser(prog="eval.py", description="Evaluate a MixSKD checkpoint (last.pt, best.pt, deploy.pt or the "
                                            "released code's) on the test set: top-1, top-5, NLL, ECE per head.")
    p.add_argument("checkpoint", nargs="?", help="path of the checkpoint")
    p.add_argument("--table", nargs="+", metavar="RUN_DIR", help="print a markdown table of the finished runs in "
                   "these folders and below them instead (a folder holding a summary.json alone counts); unfinished "
                   "runs and folders without runs are named on stderr")
    p.add_argument("--plot", nargs="+", metavar="RUN_DIR",
                   help="draw test top-1 per epoch of these runs and a MixSKD run's loss terms (needs matplotlib); "
                        "with --per-class, the confusion matrix of one run's deploy.pt on its test set")
    p.add_argument("--budget", nargs="+", metavar="RUN_DIR", help="draw the final top-1 of the finished runs in these "
                   "folders and below them against their length (epochs) and their minutes of training, the seeds "
                   "of one experiment together (needs matplotlib): which method for the budget you have")
    p.add_argument("--out", default=None, help="image file that --plot or --budget writes (default: results.png, "
                                               "with --per-class confusion.png, with --budget budget.png, in the "
                                               "first run folder)")
    p.add_argument("--per-class", action="store_true", help="also top-1 per class and the confusion matrix of the "
                                                            "backbone, with class names (in --json too)")
    p.add_argument("--predict", metavar="IMAGE_OR_FOLDER", help="the checkpoint's top-k classes for an image file, or "
                   "every image file in a folder and below, prepared as the run's test set was (resized to its image "
                   "size as its test transform does, normalised with its mean and std)")
    p.add_argument("--top-k", type=int, default=5, help="classes per image that --predict prints (default 5)")
    p.add_argument("--dataset", default=None, help="cifar10, cifar100, imagenet, PATH.npz or FOLDER (with train/ and "
                                                   "val/; default: the one it was trained on)")
    p.add_argument("--data", default="./data", help="torchvision dataset root (default ./data)")
    p.add_argument("--batch-size", type=int, default=500, help="evaluation batch size (default 500)")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers that read an image folder (ImageNet's or "
                                                           "your own; default 8, at most the cores)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    given = [flag for flag in ("--table", "--plot", "--budget") if getattr(args, flag[2:])]
    if len(given) > 1:
        p.error(f"{' and '.join(given)}: one at a time (each reads run folders and prints or draws one thing)")
    if given and args.checkpoint:
        p.error(f"{given[0]} reads run folders, not a checkpoint: drop {args.checkpoint} or {given[0]}")
    for flag, value, low in (("--top-k", args.top_k, 1), ("--batch-size", args.batch_size, 1),
                             ("--workers", args.workers, 0)):
        if value < low:
            p.error(f"{flag} must be an integer >= {low}, got {value}")
    return args


def main(argv=None):
    args = parse_args(argv)
    notes = []  # runs left out, folders skipped: one line each on stderr, after the table or the figure
    if args.table:
        print(report.results_table(args.table, notes))
    elif args.plot and not args.per_class:
        out = figures.plot_runs(args.plot, args.out or os.path.join(args.plot[0], "results.png"), notes)
        print(f"figure written to {out}")
    elif args.budget:
        out = figures.plot_budget(args.budget, args.out or os.path.join(args.budget[0], "budget.png"), notes)
        print(f"figure written to {out}")
    for line in notes:
        print(f"note: {line}", file=sys.stderr)
    if args.table or args.budget or (args.plot and not args.per_class):
        return
    if args.plot:  # the confusion matrix of one run: its deployed network
        if len(args.plot) != 1:
            raise UserError("--plot with --per-class draws the confusion matrix of one run: name one run folder")
        args.checkpoint = os.path.join(args.plot[0], "deploy.pt")
    if args.checkpoint is None:
        raise UserError("name a checkpoint to evaluate, or pass --table, --plot or --budget with run folders")
    device = pick_device(args.device)
    if os.path.isdir(args.checkpoint):  # a run folder: its deployed network, else its last checkpoint
        found = [f for f in ("deploy.pt", "last.pt") if os.path.exists(os.path.join(args.checkpoint, f))]
        if not found:
            raise UserError(f"{args.checkpoint} is a folder without deploy.pt or last.pt: name a checkpoint file")
        args.checkpoint = os.path.join(args.checkpoint, found[0])
    ckpt = read_checkpoint(args.checkpoint)
    model, teacher, meta = model_from_checkpoint(ckpt, args.checkpoint)
    if args.predict:
        return print_predictions(model, meta, args, device)
    dataset = args.dataset or recorded_dataset(args.checkpoint, meta)
    data = load_dataset(dataset, args.data, device, meta.get("image_size", 224), args.workers,
                        in_memory=meta.get("image_pipeline") == "tensors")
    check_classes(args.checkpoint, meta, data, dataset)
    if "mean" in meta:  # normalise as in training, whatever the dataset argument
        data.mean, data.std = meta["mean"], meta["std"]
        data.stats = pixel_stats(meta["mean"], meta["std"], device)
    # as train.py evaluates: channels_last on CUDA, and where the run did (cuDNN may still choose other kernels)
    channels_last = device.type == "cuda" or bool(meta.get("channels_last"))
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if teacher is not None:
        teacher.to(device)
    outputs, y = head_logits(model, teacher, data, args.batch_size, channels_last)
    metrics = {name: head_metrics(z, y) for name, z in outputs.items()}
    classes = per_class(outputs["backbone"], y, meta.get("class_names") or data.class_names) if args.per_class else None
    if args.plot:
        out = figures.plot_confusion(classes, args.out or os.path.join(args.plot[0], "confusion.png"),
                                    f"{args.checkpoint} on {data.name} ({data.n_test} test images)")
        print(f"figure written to {out}")
    elif args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "dataset": dataset, "heads": metrics,
                          **({"per_class": classes} if classes else {})}))
    else:
        print(f"{args.checkpoint} on {data.name} ({data.n_test} test images)")
        print(format_table(metrics))
        if classes:
            print("\n" + report.format_per_class(classes))


if __name__ == "__main__":
    run_cli(main)
