"""Reports over finished runs: the results table (markdown) and the figure of their curves.

    python eval.py --table runs/*/                  # one row per experiment, mean +- std over seeds
    python eval.py --plot runs/*/ --out fig.png     # backbone test top-1 per epoch, MixSKD loss terms
    python eval.py --plot RUN --per-class           # the confusion matrix of one run (plot_confusion)

docs/method.md section 8: every number is labelled by what it is and the split it comes from: the headline
(final backbone top-1 on the test set, selection-free), the best epoch (chosen on the validation split
when the run has one, else on the test set), and the released code's way (max over heads and epochs,
chosen on the test set). Reads only run folders (metrics.jsonl, summary.json); matplotlib is needed
for the figures alone.
"""
import json
import os

import numpy as np

from checkpoints import read_checkpoint, read_metrics
from data import dataset_name
from errors import UserError
from methods import FLAGS, METHODS
from settings import flags_of


def summarise(records):
    """The labelled numbers of a run (docs/method.md section 8): the headline is the final backbone top-1 on the test
    set, chosen by nothing; the best epoch is chosen on the validation split when the run has one
    (train.py --val-split), else on the test set; the released code's metric (max over heads and epochs)
    is always chosen on the test set. `splits` names the split behind every number. Epochs count from 1, as
    on the screen (metrics.jsonl's "epoch" counts from 0)."""
    final = records[-1]
    chosen_on = "val" if "val" in final else "test"
    best = max(records, key=lambda r: r[chosen_on]["backbone"]["top1"])
    released = max(((m["top1"], h, r["epoch"]) for r in records for h, m in r["test"].items() if h != "self_teacher"),
                   key=lambda t: t[0])
    splits = {"headline_final_backbone_top1": "test, final epoch (selection-free)", "final_test": "test",
              "best_backbone_epoch": f"chosen on {chosen_on}",
              "best_backbone_top1": f"test, at the epoch chosen on {chosen_on}"
                                    f"{' (selection-free)' if chosen_on == 'val' else ''}",
              "released_code_metric_max_over_heads_and_epochs": "test, max over heads and epochs chosen on test"}
    val = {}
    if chosen_on == "val":
        val = {"final_val": final["val"], "best_backbone_val_top1": best["val"]["backbone"]["top1"]}
        splits.update(final_val="val", best_backbone_val_top1="val, at the epoch chosen on val")
    return {"headline_final_backbone_top1": final["test"]["backbone"]["top1"], "final_epoch": final["epoch"] + 1,
            "final_test": final["test"], "best_backbone_top1": best["test"]["backbone"]["top1"],
            "best_backbone_epoch": best["epoch"] + 1, "best_epoch_chosen_on": chosen_on, **val,
            "released_code_metric_max_over_heads_and_epochs": released[0],
            "released_code_metric_head": released[1], "released_code_metric_epoch": released[2] + 1,
            "splits": splits, "train_time_s": sum(r["epoch_time"] for r in records)}


def trained_with(args, settings=None):
    """What a run trained with, under the names of the flags: its settings over its arguments as given (a run
    saved before settings existed: its arguments, which then held every value); the method flags of other methods,
    which such a run also recorded, left out."""
    values = {**args, **flags_of(settings)} if settings else dict(args)
    reads = METHODS[values["method"]].defaults(values.get("setting") or "cifar")
    return {k: v for k, v in values.items() if k not in FLAGS or k in reads}


def read_run(run_dir):
    """(what it trained with, per-epoch records, data) of a train.py run folder (trained_with); data: what
    summary.json or last.pt says of the dataset the run trained on."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise UserError(f"{run_dir} is not a run folder of train.py (no metrics.jsonl)")
    records = read_metrics(path)
    if not records:
        raise UserError(f"{path} is empty: the run has not finished an epoch")
    summary_path = os.path.join(run_dir, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        return (trained_with(summary["args"], summary.get("settings")), records,
                summary.get("data") or {"dataset": summary["args"]["dataset"]})
    ckpt = read_checkpoint(os.path.join(run_dir, "last.pt"))
    meta = ckpt.get("meta", {})
    return trained_with(ckpt["args"], ckpt.get("settings")), records, {
        "dataset": meta.get("dataset_path") or meta.get("dataset"), "num_classes": meta.get("num_classes")}


METHOD_ORDER = ("ce", "label-smooth", "mixup", "cutmix", "byot", "dks", "cs-kd", "ps-kd", "mixskd paper",
                "mixskd official")
# what does not change what a run computes (and the seed, which a table averages over)
NOT_THE_EXPERIMENT = {"seed", "out", "resume", "extend", "extend_schedule", "device", "amp", "channels_last",
                      "compile", "log_every", "data", "workers", "tensorboard", "dataset",
                      "setting"}  # the setting's consequences (stem, batch, alpha, ...) are arguments of their own


def method_label(args):
    return f"{args['method']} {args.get('recipe', 'paper')}" if args["method"] == "mixskd" else args["method"]


def experiment(args, data):
    """What defines a run's experiment, all but its seed: every training argument, and its data (the file it
    read, its classes and image counts, as far as the run recorded them)."""
    data = {**data, "dataset": dataset_name(data["dataset"])} if data.get("dataset") else data  # moved: the same
    return {**{k: v for k, v in args.items() if k not in NOT_THE_EXPERIMENT},
            **{f"data {k}": v for k, v in data.items() if v is not None}}


def grouped_runs(run_dirs):
    """Runs grouped by experiment, seeds together: [(label, [(args, records), ...]), ...] in a fixed method
    order. A label is the method, and where several groups share a method, the values that set each of them
    apart (--epochs 2, n_train 300, ...): runs of different experiments are never averaged."""
    groups = {}
    for args, records, data in map(read_run, run_dirs):
        key = json.dumps(experiment(args, data), sort_keys=True, default=str)
        groups.setdefault(key, []).append((args, records))
    labelled = []
    for key, runs in groups.items():
        label, key = method_label(runs[0][0]), json.loads(key)
        peers = [json.loads(k) for k, r in groups.items() if method_label(r[0][0]) == label]
        varying = sorted(k for k in set().union(*peers) if len({json.dumps(p.get(k)) for p in peers}) > 1)
        differs = [f"{k[5:]} {shown_value(key.get(k))}" if k.startswith("data ") else
                   f"--{k.replace('_', '-')} {shown_value(key.get(k))}" for k in varying]
        labelled.append((label + (f" ({', '.join(differs)})" if differs else ""),
                         sorted(runs, key=lambda run: run[0]["seed"])))
    order = lambda label: METHOD_ORDER.index(label.split(" (")[0]) if label.split(" (")[0] in METHOD_ORDER else 99
    labelled = sorted(labelled, key=lambda group: (order(group[0]), group[0]))
    seen = {}  # groups that differ only in what a label shortens (a file's folder) stay apart, numbered
    for i, (label, runs) in enumerate(labelled):
        seen[label] = seen.get(label, 0) + 1
        labelled[i] = (f"{label} #{seen[label]}" if seen[label] > 1 else label, runs)
    return labelled


def shown_value(value):
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str) and os.sep in value:
        return os.path.basename(os.path.normpath(value))
    return "-" if value is None else value


def mean_std(values, digits=2):
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def results_table(run_dirs):
    """Markdown table, one row per experiment over its seeds (grouped_runs), each number labelled by what it is."""
    groups = [(label, [records for _, records in runs]) for label, runs in grouped_runs(run_dirs)]
    chosen_on = "/".join(sorted({"val" if "val" in r[-1] else "test" for _, runs in groups for r in runs}))
    rows = ["| method | seeds | epochs | final backbone top-1 (headline) | best-epoch backbone top-1 "
            f"(epoch chosen on {chosen_on}) | "
            "max over heads and epochs (released code's way) | self-teacher top-1 | backbone ECE | "
            "training time per run (min) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, runs in groups:
        final = [r[-1]["test"] for r in runs]
        summaries = [summarise(r) for r in runs]
        best = [s["best_backbone_top1"] for s in summaries]
        released = [s["released_code_metric_max_over_heads_and_epochs"] for s in summaries]
        teacher = [f["self_teacher"]["top1"] for f in final if "self_teacher" in f]
        rows.append(f"| {label} | {len(runs)} | {len(runs[0])} | {mean_std([f['backbone']['top1'] for f in final])} | "
                    f"{mean_std(best)} | {mean_std(released)} | {mean_std(teacher) if teacher else '-'} | "
                    f"{mean_std([f['backbone']['ece'] for f in final], 3)} | "
                    f"{mean_std([s['train_time_s'] / 60 for s in summaries], 1)} |")
    return "\n".join(rows)


def format_per_class(classes):
    """per_class's result as text: top-1 per class, then the confusion matrix, its columns numbered as the rows."""
    labels = [f"{k} {name}"[:16] for k, name in enumerate(classes["class_names"])]
    lines = [f"{'backbone per class':<18}{'images':>8}{'top-1':>8}"]
    for label, n, top1 in zip(labels, classes["images"], classes["top1"]):
        lines.append(f"{label:<18}{n:>8}{'-' if top1 is None else f'{top1:.2f}':>8}")
    cell = max(len(str(len(labels) - 1)), *(len(str(v)) for row in classes["confusion"] for v in row)) + 1
    lines += ["", "confusion matrix of the backbone (rows: true class, columns: predicted class)",
              " " * 18 + "".join(f"{k:>{cell}}" for k in range(len(labels)))]
    lines += [f"{label:<18}" + "".join(f"{v:>{cell}}" for v in row) for label, row in zip(labels, classes["confusion"])]
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot, drawing into files only. matplotlib is optional: without it, one line says how to
    install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib, an optional dependency: pip install matplotlib") from None
    return plt


def plot_runs(run_dirs, out):
    """Test top-1 of the backbone per epoch for every run, a colour per experiment (grouped_runs); the loss terms
    of the first MixSKD run."""
    plt = pyplot()
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    groups = grouped_runs(run_dirs)
    runs = [run for _, group in groups for run in group]
    # a short run's few points stand out as markers; epochs are whole numbers on the axis
    marker = {"marker": "o", "markersize": 3} if max(len(records) for _, records in runs) <= 30 else {}
    for g, (label, group) in enumerate(groups):  # a colour per experiment, a line style per seed
        for s, (args, records) in enumerate(group):
            acc_ax.plot([r["epoch"] + 1 for r in records], [r["test"]["backbone"]["top1"] for r in records], lw=1,
                        **marker, color=f"C{g % 10}", ls=("-", "--", ":", "-.")[s % 4],
                        label=f"{label} seed {args['seed']}")
    acc_ax.set(xlabel="epoch", ylabel="test top-1 of the backbone (%)", title="deployed network, every run")
    acc_ax.legend(fontsize=7, ncol=2)
    mixskd = [run for run in runs if run[0]["method"] == "mixskd"]
    if mixskd:  # the paper recipe's run when there is one: its every term is optimised
        args, records = next((run for run in mixskd if run[0].get("recipe") == "paper"), mixskd[0])
        for term in records[0]["loss"]:
            loss_ax.plot([r["epoch"] + 1 for r in records], [r["loss"][term] for r in records], lw=1, **marker,
                         label=term if term == "total" else f"L_{term}")
        loss_ax.set(xlabel="epoch", ylabel="mean over the epoch", yscale="log",
                    title=f"loss terms, {method_label(args)} seed {args['seed']}")
        loss_ax.legend(fontsize=7)
    for ax in (acc_ax, loss_ax):
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    return out


def plot_confusion(classes, out, title):
    """The confusion matrix of eval.per_class as an image: each row (true class) as fractions of its images."""
    plt = pyplot()
    counts = np.array(classes["confusion"], dtype=float)
    rows = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    n = len(rows)
    fig, ax = plt.subplots(figsize=(min(4 + 0.35 * n, 30), min(3.5 + 0.35 * n, 30)))
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class's images")
    if n <= 40:  # names and counts stay legible up to about 40 classes
        ax.set_xticks(range(n), classes["class_names"], rotation=90, fontsize=7)
        ax.set_yticks(range(n), classes["class_names"], fontsize=7)
        for i, j in zip(*np.nonzero(counts)):
            ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=6,
                    color="white" if rows[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    ax.title.set_fontsize(8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
