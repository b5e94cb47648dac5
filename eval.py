"""Evaluate a checkpoint: top-1, top-5, NLL and ECE of every head, backbone first.

    python eval.py runs/cifar100-resnet18-mixskd-paper-seed0/last.pt
    python eval.py deploy.pt --dataset cifar100 --json
    python eval.py released_ckpt.pth.tar --dataset cifar100     # the authors' released CIFAR script
    python eval.py --table runs/*/                              # markdown table over seeds
    python eval.py --plot runs/*/ --out results.png             # curves (needs matplotlib)

Accepts this project's last.pt / best.pt (every head and the self-teacher), deploy.pt (the backbone
alone), checkpoints of the released scripts (SPEC section 11) and torchvision ResNet state dicts, as
checkpoints.py reads them. SPEC section 8: the backbone is the deployed network, so its row comes
first and is the headline. `--table` and `--plot` hand run folders to report.py.
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F

import report
from checkpoints import model_from_checkpoint, read_checkpoint
from data import UserError, eval_batches, load_dataset, pixel_stats, run_cli

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

    model: a MixSKD network (every head, and the self-teacher on clean-image features when given) or a
    plain network (the backbone row only). Restores the model's train/eval mode afterwards.
    """
    was_training = model.training
    model.eval()
    outputs, labels = {}, []
    for x, y in eval_batches(data, batch_size):
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
    y = torch.cat(labels)
    return {name: head_metrics(torch.cat(z), y) for name, z in outputs.items()}


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
    p.add_argument("--out", default=None, help="image file that --plot writes (default: results.png in the first "
                                               "run folder)")
    p.add_argument("--dataset", default=None, help="cifar10, cifar100 or PATH.npz (default: the one it was trained on)")
    p.add_argument("--data", default="./data", help="torchvision dataset root (default ./data)")
    p.add_argument("--batch-size", type=int, default=500, help="evaluation batch size (default 500)")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers for ImageNet (default 8)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p.parse_args(argv)


def recorded_dataset(path, meta):
    """The dataset a checkpoint was trained on: its .npz as typed, else as the absolute path recorded."""
    dataset = meta.get("dataset")
    if dataset is None:
        raise UserError(f"{path} does not record its dataset: pass --dataset cifar10, cifar100 or PATH.npz")
    if dataset.endswith(".npz") and not os.path.exists(dataset):
        dataset = meta.get("dataset_path") or dataset
        if not os.path.exists(dataset):
            raise UserError(f"{path} was trained on {meta['dataset']}, which is not found from here (nor at "
                            f"{dataset}): pass --dataset PATH.npz to evaluate on the file where it is now")
    return dataset


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        print(report.results_table(args.table))
        return
    if args.plot:
        out = report.plot_runs(args.plot, args.out or os.path.join(args.plot[0], "results.png"))
        print(f"figure written to {out}")
        return
    if args.checkpoint is None:
        raise UserError("name a checkpoint to evaluate, or pass --table / --plot with run folders")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = read_checkpoint(args.checkpoint)
    model, teacher, meta = model_from_checkpoint(ckpt, args.checkpoint)
    dataset = args.dataset or recorded_dataset(args.checkpoint, meta)
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
    run_cli(main)
