"""Reports over finished runs: the results table (markdown), and how runs are found, read and grouped (for the
figures too, figures.py); a run's per-class top-1 as text.

    python eval.py --table runs/                    # one row per experiment, mean +- std over seeds
    python eval.py --table docs/summaries/library/  # the same from summary.json files alone

docs/method.md section 8: every number is labelled by what it is and the split it comes from: the headline
(final backbone top-1 on the test set, selection-free), the best epoch (chosen on the validation split
when the run has one, else on the test set), and the released code's number (its MixSKD script's max over
heads and epochs, its baselines script's backbone at its best epoch; chosen on the test set). Reads only run
folders (metrics.jsonl, summary.json, and last.pt for an unfinished run): any folder is searched for the run
folders below it, and a folder holding only a summary.json is a finished run (as docs/ keeps them).
Unfinished runs are left out of the table and named.
"""
import json
import os
import re
from types import SimpleNamespace

import numpy as np

from checkpoints import read_checkpoint, read_metrics
from data import dataset_name
from errors import UserError
from methods import without_foreign_flags
from settings import flags_of

MIXSKD_RULE = "max over heads and epochs (main_mixskd_cifar.py)"
BASELINE_RULE = "backbone at its best epoch (main.py)"


def summarise(records, method="mixskd"):
    """The labelled numbers of a run (docs/method.md section 8): the headline is the final backbone top-1 on the test
    set, chosen by nothing; the best epoch is chosen on the validation split when the run has one (train.py
    --val-split), else on the test set; the released code's number is the one its script reports, chosen on the
    test set: for MixSKD (main_mixskd_cifar.py) the max over heads and epochs, for every other method (main.py)
    the backbone at its best epoch. `splits` names the split behind every number. Epochs count from 1, as on the
    screen (metrics.jsonl's "epoch" counts from 0)."""
    final = records[-1]
    chosen_on = "val" if "val" in final else "test"
    best = max(records, key=lambda r: r[chosen_on]["backbone"]["top1"])
    heads = lambda r: [h for h in r["test"] if h != "self_teacher"] if method == "mixskd" else ["backbone"]
    released = max(((r["test"][h]["top1"], h, r["epoch"]) for r in records for h in heads(r)), key=lambda t: t[0])
    rule = MIXSKD_RULE if method == "mixskd" else BASELINE_RULE
    splits = {"headline_final_backbone_top1": "test, final epoch (selection-free)", "final_test": "test",
              "best_backbone_epoch": f"chosen on {chosen_on}",
              "best_backbone_top1": f"test, at the epoch chosen on {chosen_on}"
                                    f"{' (selection-free)' if chosen_on == 'val' else ''}",
              "released_code_metric": f"test, {rule}, chosen on test"}
    val = {}
    if chosen_on == "val":
        val = {"final_val": final["val"], "best_backbone_val_top1": best["val"]["backbone"]["top1"]}
        splits.update(final_val="val", best_backbone_val_top1="val, at the epoch chosen on val")
    return {"headline_final_backbone_top1": final["test"]["backbone"]["top1"], "final_epoch": final["epoch"] + 1,
            "final_test": final["test"], "best_backbone_top1": best["test"]["backbone"]["top1"],
            "best_backbone_epoch": best["epoch"] + 1, "best_epoch_chosen_on": chosen_on, **val,
            "released_code_metric": released[0], "released_code_metric_rule": rule,
            "released_code_metric_head": released[1], "released_code_metric_epoch": released[2] + 1,
            "splits": splits, "train_time_s": sum(r["epoch_time"] for r in records)}


# what a run's settings hold beside its flags: derived from them and the data, or the data's own (image_size)
DERIVED = {"steps_per_epoch", "warmup_iterations", "clip", "epochs_before", "image_size", "stem"}


def trained_with(args, settings=None):
    """What a run trained with, under the names of its flags: its settings over its arguments as given (a run
    saved before settings existed: its arguments, which then held every value, its stem for its setting). The
    values derived from the flags and the data (steps per epoch, ...) are left out, and so are the method flags
    of other methods, which such an older run also recorded."""
    values = {**args, **flags_of(settings)} if settings else {**args, "setting": args.get("setting")
                                                                or args.get("stem")}
    values = {k: v for k, v in values.items() if k not in DERIVED}
    return without_foreign_flags(values, values["method"], values.get("setting") or "cifar")


RUN_FILES = ("metrics.jsonl", "summary.json")


def find_runs(paths):
    """(runs, skipped): the run folders among paths (a folder holding metrics.jsonl or summary.json, or a
    summary.json itself), and under any other folder every run folder below it; skipped: [(path, why)] of the
    paths that are neither and hold none."""
    runs, skipped = [], []
    for path in map(str, paths):
        if os.path.isfile(path) and os.path.basename(path) == "summary.json":
            runs.append(os.path.dirname(path) or ".")
        elif not os.path.isdir(path):
            skipped.append((path, "no such folder, nor a summary.json"))
        elif any(os.path.exists(os.path.join(path, f)) for f in RUN_FILES):
            runs.append(path)
        else:
            below = sorted(root for root, dirs, files in os.walk(path) if any(f in files for f in RUN_FILES))
            below = [r for r in below if not any(r.startswith(other + os.sep) for other in below)]  # not inside a run
            runs += below
            if not below:
                skipped.append((path, "not a run folder, and no run folder below it (metrics.jsonl or summary.json)"))
    return list(dict.fromkeys(os.path.normpath(r) for r in runs)), skipped


def read_run(run_dir):
    """A train.py run folder (or one holding its summary.json alone, as docs/ keeps them) as a namespace: path,
    values (what it trained with: trained_with), data (what it trained on), records (metrics.jsonl; None without
    it), summary (the labelled numbers), epochs (how many it was to train) and finished (summary.json covers
    every logged epoch)."""
    metrics, summary_path = os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "summary.json")
    records = read_metrics(metrics) if os.path.exists(metrics) else None
    if records is not None and not records:
        raise UserError(f"{metrics} is empty: the run has not finished an epoch")
    saved = None
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            saved = json.load(f)
    # summary.json counts epochs from 1; one written before it did (no best_epoch_chosen_on) from 0
    if saved is not None and (records is None or saved["final_epoch"] + ("best_epoch_chosen_on" not in saved)
                              == len(records)):
        values = trained_with(saved["args"], saved.get("settings"))
        data = saved.get("data") or {"dataset": saved["args"]["dataset"]}
        summary = summarise(records, values["method"]) if records else legacy_summary(saved, values["method"])
        return SimpleNamespace(path=run_dir, values=values, data=data, records=records, finished=True,
                               summary={**saved, **summary}, epochs=summary["final_epoch"])
    last = os.path.join(run_dir, "last.pt")  # an unfinished run, or an extension under way
    ckpt = read_checkpoint(last) if os.path.exists(last) else {}
    meta = ckpt.get("meta", {})
    values = trained_with(ckpt["args"], ckpt.get("settings")) if "args" in ckpt else None  # None: nothing says
    return SimpleNamespace(path=run_dir, values=values, records=records, finished=False,
                           data={"dataset": meta.get("dataset_path") or meta.get("dataset"),
                                 "num_classes": meta.get("num_classes")},
                           summary=summarise(records, (values or {}).get("method", "mixskd")),
                           epochs=(values or {}).get("epochs"))


def unknown_notes(runs):
    """A note for each run whose arguments nothing records (metrics.jsonl without summary.json or last.pt)."""
    return [f"left out: {run.path} holds metrics.jsonl but neither summary.json nor last.pt, which say what it "
            f"trained" for run in runs if run.values is None]


def legacy_summary(saved, method):
    """The labelled numbers of a summary.json alone: as written, with the released code's number of a summary
    written before it followed each method's script (then the max over heads for every method)."""
    if "released_code_metric" in saved:
        return saved
    released = saved["released_code_metric_max_over_heads_and_epochs"] if method == "mixskd" else (
        saved["best_backbone_top1"] if saved.get("best_epoch_chosen_on") == "test" else None)
    return {**saved, "released_code_metric": released,
            "released_code_metric_rule": MIXSKD_RULE if method == "mixskd" else BASELINE_RULE}


METHOD_ORDER = ("ce", "label-smooth", "mixup", "cutmix", "byot", "dks", "cs-kd", "ps-kd", "mixskd paper",
                "mixskd official")
# what does not change what a run computes (and the seed, which a table averages over)
NOT_THE_EXPERIMENT = {"seed", "out", "resume", "extend", "extend_schedule", "device", "amp", "channels_last",
                      "compile", "log_every", "data", "workers", "tensorboard", "dataset"}


def method_label(values):
    return f"{values['method']} {values.get('recipe', 'paper')}" if values["method"] == "mixskd" else values["method"]


def data_identity(data):
    """What a run's data is, as far as it recorded it: the file's name (not its folder), classes, image counts."""
    return {**data, "dataset": dataset_name(data["dataset"])} if data.get("dataset") else dict(data)


def experiment(run, with_data=True):
    """What defines a run's experiment, all but its seed: every training value, and its data (the file it read,
    its classes and image counts, as far as the run recorded them)."""
    data = {f"data {k}": v for k, v in data_identity(run.data).items() if v is not None} if with_data else {}
    return {**{k: v for k, v in run.values.items() if k not in NOT_THE_EXPERIMENT}, **data}


def natural_key(label):
    """A sort key that orders the numbers in a label by value, not by their characters: --epochs 90 before
    --epochs 205, --lr 0.05 before --lr 0.5."""
    return [float(t) if k % 2 else t for k, t in enumerate(re.split(r"(\d+(?:\.\d+)?)", label))]


def grouped_runs(runs, name_data=True):
    """Runs grouped by experiment, seeds together: [(label, [run, ...]), ...] by network, then in a fixed method
    order, then by label, its numbers in their order (--epochs 90 before 205). A label is the method, and where
    several groups share a method, the values that set each of them apart (--epochs 2, n_train 300, ...; the
    data's only with name_data): runs of different experiments are never averaged."""
    groups = {}
    for run in runs:
        groups.setdefault(json.dumps(experiment(run), sort_keys=True, default=str), []).append(run)
    labelled = []
    for key, members in groups.items():
        label = method_label(members[0].values)
        peers = [experiment(r[0], name_data) for r in groups.values() if method_label(r[0].values) == label]
        mine = experiment(members[0], name_data)
        varying = sorted(k for k in set().union(*peers) if len({json.dumps(p.get(k)) for p in peers}) > 1)
        differs = [f"{k[5:]} {shown_value(mine.get(k))}" if k.startswith("data ") else
                   f"--{k.replace('_', '-')} {shown_value(mine.get(k))}" for k in varying]
        labelled.append((label + (f" ({', '.join(differs)})" if differs else ""),
                         sorted(members, key=lambda run: run.values.get("seed", 0))))
    order = lambda label: METHOD_ORDER.index(label.split(" (")[0]) if label.split(" (")[0] in METHOD_ORDER else 99
    network = lambda group: str(group[1][0].values.get("arch", ""))  # one network's rows together
    labelled = sorted(labelled, key=lambda group: (network(group), order(group[0]), natural_key(group[0]),
                                                   data_label(group[1][0].data)))
    seen = {}  # groups that differ only in what a label shortens (a file's folder) stay apart, numbered
    for i, (label, members) in enumerate(labelled):
        shown = (label, "" if name_data else data_label(members[0].data))  # a data column tells its rows apart
        seen[shown] = seen.get(shown, 0) + 1
        labelled[i] = (f"{label} #{seen[shown]}" if seen[shown] > 1 else label, members)
    return labelled


def shown_value(value):
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str) and os.sep in value:
        return os.path.basename(os.path.normpath(value))
    return "-" if value is None else value


def mean_std(values, digits=2):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def data_label(data):
    """A run's data in a table cell: the file's name, its classes and training images."""
    d = data_identity(data)
    counts = ", ".join(f"{d[k]:,} {what}" for k, what in (("num_classes", "classes"), ("n_train", "train"))
                       if d.get(k) is not None)
    return f"{d.get('dataset', '?')}" + (f" ({counts})" if counts else "")


def results_table(paths, notes=None):
    """Markdown table of the finished runs among paths (find_runs), one row per experiment over its seeds
    (grouped_runs), each number labelled by what it is; a data column whenever the runs differ in data. notes: a
    list that gets a line for every run left out (unfinished) or path skipped, and the revisions and devices
    the rows come from when they differ."""
    notes = [] if notes is None else notes
    found, skipped = find_runs(paths)
    runs = [read_run(path) for path in found]
    finished = [run for run in runs if run.finished]
    notes += [f"left out, unfinished: {run.path} (epoch {len(run.records)} of {run.epochs or '?'}; its last backbone "
              f"top-1 {run.summary['headline_final_backbone_top1']:.2f})" for run in runs
              if not run.finished and run.values is not None]
    notes += unknown_notes(runs)
    notes += [f"skipped: {path} ({why})" for path, why in skipped]
    if not finished:
        raise UserError(f"no finished run among {', '.join(map(str, paths))}: {'; '.join(notes) or 'nothing found'}")
    with_data = len({json.dumps(data_identity(run.data), sort_keys=True) for run in finished}) > 1
    groups = grouped_runs(finished, name_data=not with_data)
    chosen_on = "/".join(sorted({run.summary["best_epoch_chosen_on"] for run in finished}))
    header = ["method", *(["data"] * with_data), "seeds", "epochs", "final backbone top-1 (headline)",
              f"best-epoch backbone top-1 (epoch chosen on {chosen_on})",
              "released code's number (MixSKD: max over heads and epochs; others: backbone at its best epoch)",
              "self-teacher top-1", "backbone ECE", "trained / deployed params", "training time per run (min)"]
    rows = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for label, members in groups:
        summaries = [run.summary for run in members]
        final = [s["final_test"] for s in summaries]
        params = summaries[0].get("trained_params"), summaries[0].get("deployed_params")
        cells = [label, *([data_label(members[0].data)] * with_data), len(members), summaries[0]["final_epoch"],
                 mean_std([f["backbone"]["top1"] for f in final]),
                 mean_std([s["best_backbone_top1"] for s in summaries]),
                 mean_std([s["released_code_metric"] for s in summaries]),
                 mean_std([f["self_teacher"]["top1"] for f in final if "self_teacher" in f]),
                 mean_std([f["backbone"]["ece"] for f in final], 3),
                 f"{params[0]:,} / {params[1]:,}" if None not in params else "-",
                 mean_std([s["train_time_s"] / 60 for s in summaries], 1)]
        rows.append("| " + " | ".join(map(str, cells)) + " |")
    notes += provenance_notes(finished)
    return "\n".join(rows)


def provenance_notes(runs):
    """A line naming the code revisions and the devices the runs come from, when they differ."""
    lines = []
    for key, what in (("git_revision", "code revisions"), ("device_name", "devices")):
        seen = {}
        for run in runs:
            value = run.summary.get(key) or "not recorded"
            seen[value[:7] if key == "git_revision" and value != "not recorded" else value] = seen.get(value, 0) + 1
        if len(seen) > 1:
            lines.append(f"{what}: " + ", ".join(f"{v} ({n} run{'s' * (n > 1)})" for v, n in seen.items()))
    return lines


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
