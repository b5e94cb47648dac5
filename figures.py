"""Figures over finished runs: the curves of runs (plot_runs), top-1 against the length and the minutes of a run
(plot_budget) and one run's confusion matrix (plot_confusion). matplotlib, an optional dependency, is needed here
alone; the runs are found and grouped as for the tables (report.py).

    python eval.py --plot runs/*/ --out fig.png     # backbone test top-1 per epoch, a run's loss terms
    python eval.py --plot RUN --per-class           # the confusion matrix of one run
    python eval.py --budget docs/summaries/length/  # final top-1 against epochs and minutes
"""
from types import SimpleNamespace

import numpy as np

from errors import UserError
from report import find_runs, grouped_runs, method_label, provenance_notes, read_run, unknown_notes
from settings import milestones


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


def plot_runs(paths, out, notes=None):
    """Test top-1 of the backbone per epoch of every run among paths (find_runs; unfinished ones too, so labelled),
    a colour per experiment (grouped_runs), a line style per seed; and the loss terms of one run: MixSKD's (recipe
    paper's when there is one, whose every term is optimised), else the first run's. notes: a list that gets a
    line for every path skipped or run without metrics.jsonl (a summary.json alone has no curve)."""
    notes = [] if notes is None else notes
    found, skipped = find_runs(paths)
    notes += [f"skipped: {path} ({why})" for path, why in skipped]
    read = list(map(read_run, found))
    notes += unknown_notes(read)
    runs = [run for run in read if run.records is not None and run.values is not None]
    notes += [f"no curve: {run.path} holds no metrics.jsonl" for run in read if run.records is None]
    if not runs:
        raise UserError(f"no run to draw among {', '.join(map(str, paths))}: {'; '.join(notes) or 'nothing found'}")
    plt = pyplot()
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    groups = grouped_runs(runs)
    # a short run's few points stand out as markers; epochs are whole numbers on the axis
    marker = {"marker": "o", "markersize": 3} if max(len(run.records) for run in runs) <= 30 else {}
    for g, (label, group) in enumerate(groups):  # a colour per experiment, a line style per seed
        for k, run in enumerate(group):
            acc_ax.plot([r["epoch"] + 1 for r in run.records], [r["test"]["backbone"]["top1"] for r in run.records],
                        lw=1, **marker, color=f"C{g % 10}", ls=("-", "--", ":", "-.")[k % 4],
                        label=f"{label} seed {run.values.get('seed')}{'' if run.finished else ' (unfinished)'}")
    acc_ax.set(xlabel="epoch", ylabel="test top-1 of the backbone (%)", title="deployed network, every run")
    acc_ax.legend(fontsize=7, ncol=2)
    ordered = [run for _, group in groups for run in group]
    mixskd = [run for run in ordered if run.values.get("method") == "mixskd"]
    shown = next((run for run in mixskd if run.values.get("recipe") == "paper"), (mixskd or ordered)[0])
    for term in shown.records[0]["loss"]:
        loss_ax.plot([r["epoch"] + 1 for r in shown.records], [r["loss"][term] for r in shown.records], lw=1,
                     **marker, label=term if term == "total" else f"L_{term}")
    loss_ax.set(xlabel="epoch", ylabel="mean over the epoch", yscale="log",
                title=f"loss terms, {method_label(shown.values)} seed {shown.values.get('seed')}")
    loss_ax.legend(fontsize=7)
    for ax in (acc_ax, loss_ax):
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def budget_series(paths, notes=None):
    """The finished runs among paths as series of one experiment at several lengths: [(label, device, points)],
    points = [(epochs, [final backbone top-1 per seed], [minutes of training per seed])] by epochs. A series is one
    experiment but for --epochs (grouped_runs, the length left out) on one device (minutes on different machines
    do not compare); a run whose decays are not the recipe's for its length (--milestones given) is left out, as
    is an unfinished one, each with a line in notes, as are the revisions and devices when they differ."""
    notes = [] if notes is None else notes
    found, skipped = find_runs(paths)
    runs = [read_run(path) for path in found]
    notes += [f"skipped: {path} ({why})" for path, why in skipped] + unknown_notes(runs)
    notes += [f"left out, unfinished: {run.path}" for run in runs if not run.finished and run.values is not None]
    finished = [run for run in runs if run.finished]
    scaled = [run for run in finished if run.values.get("milestones") == milestones(SimpleNamespace(),
                                                                                      run.values["epochs"])]
    notes += [f"left out: {run.path} decays at epochs {run.values.get('milestones')}, not at the recipe's fractions "
              f"of its {run.values['epochs']} epochs, so its length is not the only thing that differs"
              for run in finished if run not in scaled]
    if not scaled:
        raise UserError(f"no finished run at the recipe's decays among {', '.join(map(str, paths))}: "
                        f"{'; '.join(notes) or 'nothing found'}")
    lengthless = [SimpleNamespace(**{**vars(run), "values": {k: v for k, v in run.values.items()
                                                             if k not in ("epochs", "milestones")}}) for run in scaled]
    epochs = {id(r): run.values["epochs"] for r, run in zip(lengthless, scaled)}
    series = []
    for label, members in grouped_runs(lengthless):
        for device in dict.fromkeys(run.summary.get("device_name") or "not recorded" for run in members):
            on_device = [run for run in members if (run.summary.get("device_name") or "not recorded") == device]
            points = [(n, [run.summary["final_test"]["backbone"]["top1"] for run in on_device if epochs[id(run)] == n],
                       [run.summary["train_time_s"] / 60 for run in on_device if epochs[id(run)] == n])
                      for n in sorted({epochs[id(run)] for run in on_device})]
            series.append((label, device, points))
            for n in sorted({epochs[id(run)] for run in on_device}):  # minutes under different speed settings
                speeds = {speed_of(run) for run in on_device if epochs[id(run)] == n}
                if len(speeds) > 1:
                    notes.append(f"{label} at {n} epochs on {device}: its seeds ran with different speed settings "
                                 f"({'; '.join(sorted(speeds))}), so their minutes differ for that reason too")
    notes += provenance_notes(scaled)
    return series


def speed_of(run):
    """What sets a run's speed beside its device: its autocast, memory format and compile mode, as it resolved them."""
    s = run.summary.get("settings") or {}
    return ", ".join(f"{k} {s.get(k, '?')}" for k in ("amp", "channels_last", "compile"))


def plot_budget(paths, out, notes=None):
    """Which method for the budget a user has: final backbone top-1 (mean over seeds, its standard deviation as a
    bar, each seed a dot) against the run's length in epochs, and against its minutes of training (each run's own
    time: runs that shared a machine each count the whole of it), a colour per experiment (budget_series)."""
    series = budget_series(paths, notes)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    devices = list(dict.fromkeys(device for _, device, _ in series))
    colours = {}
    for label, device, points in series:
        colour = colours.setdefault(label, f"C{len(colours) % 10}")
        style = ("-", "--", ":", "-.")[devices.index(device) % 4]
        name = label + (f", {device}" if len(devices) > 1 else "")
        top1 = [t for _, t, _ in points]
        mean, std = [np.mean(t) for t in top1], [np.std(t, ddof=1) if len(t) > 1 else 0.0 for t in top1]
        for ax, x in ((axes[0], [n for n, _, _ in points]), (axes[1], [np.mean(m) for _, _, m in points])):
            ax.errorbar(x, mean, yerr=std, color=colour, ls=style, marker="o", ms=4, capsize=3, lw=1, label=name)
        for n, t, m in points:  # the seeds themselves: at the run's length, at the run's own minutes
            axes[0].scatter([n] * len(t), t, s=8, color=colour, alpha=0.5)
            axes[1].scatter(m, t, s=8, color=colour, alpha=0.5)
    minutes = "minutes of training per run" + (f" ({devices[0]})" if len(devices) == 1 else "")
    axes[0].set(xlabel="epochs", ylabel="final test top-1 of the backbone (%)", xscale="log",
                title="top-1 against the length of the run")
    axes[1].set(xlabel=minutes, xscale="log", title="top-1 against the time it took")
    from matplotlib.ticker import LogLocator, ScalarFormatter  # (matplotlib is optional: imported where it draws)

    axes[1].xaxis.set_major_formatter(ScalarFormatter())  # plain minutes on the log axis, not powers of ten
    axes[1].xaxis.set_minor_locator(LogLocator(subs=(2, 5)))  # labels at 2, 5, 20, 50, ...: they cannot crowd
    axes[1].xaxis.set_minor_formatter(ScalarFormatter())
    lengths = sorted({n for _, _, points in series for n, _, _ in points})
    axes[0].set_xticks(lengths, [str(n) for n in lengths])
    axes[0].minorticks_off()
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
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
