"""Reports over finished runs: the results table (markdown) and the figure of their curves.

    python eval.py --table runs/*/                  # one row per method, mean +- std over seeds
    python eval.py --plot runs/*/ --out fig.png     # backbone test top-1 per epoch, MixSKD loss terms
    python eval.py --plot RUN --per-class           # the confusion matrix of one run (plot_confusion)

SPEC section 8: every number is labelled by what it is and the split it comes from: the headline
(final backbone top-1 on the test set, selection-free), the best epoch (chosen on the validation split
when the run has one, else on the test set), and the released code's way (max over heads and epochs,
chosen on the test set). Reads only run folders (metrics.jsonl, summary.json); matplotlib is needed
for the figures alone.
"""
import json
import os

import numpy as np

from checkpoints import read_checkpoint, read_metrics
from errors import UserError


def summarise(records):
    """The labelled numbers of a run (SPEC section 8): the headline is the final backbone top-1 on the test
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


def read_run(run_dir):
    """(arguments, per-epoch records) of a train.py run folder."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise UserError(f"{run_dir} is not a run folder of train.py (no metrics.jsonl)")
    records = read_metrics(path)
    if not records:
        raise UserError(f"{path} is empty: the run has not finished an epoch")
    summary_path = os.path.join(run_dir, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            return json.load(f)["args"], records
    return read_checkpoint(os.path.join(run_dir, "last.pt"))["args"], records


METHOD_ORDER = ("ce", "mixup", "cutmix", "mixskd paper", "mixskd official")


def method_label(args):
    return f"{args['method']} {args['recipe']}" if args["method"] == "mixskd" else args["method"]


def sorted_runs(run_dirs):
    """[(args, records), ...] in a fixed method order, then by seed."""
    runs = [read_run(d) for d in run_dirs]
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
    chosen_on = "/".join(sorted({"val" if "val" in r[-1] else "test" for runs in groups.values() for r in runs}))
    rows = ["| method | seeds | epochs | final backbone top-1 (headline) | best-epoch backbone top-1 "
            f"(epoch chosen on {chosen_on}) | "
            "max over heads and epochs (released code's way) | self-teacher top-1 | backbone ECE | "
            "training time per run (min) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, runs in groups.items():
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
    """Test top-1 of the backbone per epoch for every run; the loss terms of the first MixSKD run."""
    plt = pyplot()
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    runs = sorted_runs(run_dirs)
    colours, seen, archs = {}, {}, {args["arch"] for args, _ in runs}
    # a short run's few points stand out as markers; epochs are whole numbers on the axis
    marker = {"marker": "o", "markersize": 3} if max(len(records) for _, records in runs) <= 30 else {}
    for args, records in runs:  # one colour per method, one line style per seed (and arch, when several)
        label = method_label(args)
        colour = colours.setdefault(label, f"C{len(colours)}")
        seen[label] = seen.get(label, -1) + 1
        name = f"{args['arch']} {label}" if len(archs) > 1 else label
        acc_ax.plot([r["epoch"] + 1 for r in records], [r["test"]["backbone"]["top1"] for r in records], lw=1,
                    **marker, color=colour, ls=("-", "--", ":", "-.")[seen[label] % 4],
                    label=f"{name} seed {args['seed']}")
    acc_ax.set(xlabel="epoch", ylabel="test top-1 of the backbone (%)", title="deployed network, every run")
    acc_ax.legend(fontsize=7, ncol=2)
    mixskd = [run for run in runs if run[0]["method"] == "mixskd"]
    if mixskd:  # the paper recipe's run when there is one: its every term is optimised
        args, records = next((run for run in mixskd if run[0]["recipe"] == "paper"), mixskd[0])
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
