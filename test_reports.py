"""Reports (slow): eval.py --table, --plot and --budget over run folders (report.py, figures.py)."""
import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import errors
import eval as evaluation
import figures
import report
from conftest import metric_lines, tiny_run
from losses import TERMS
from settings import flags_of, milestones

slow = pytest.mark.slow  # whole runs and subprocesses
# outside the method's checklist, every test here: `pytest -m "not slow"` (the checklist) leaves the file out
pytestmark = slow


# --------------------------------------- Reports (slow): eval.py --table and --plot over run folders


def seeded_copy(run_dir, dest, seed, backbone_top1):
    """A copy of a run folder posing as another seed whose final backbone top-1 is backbone_top1."""
    shutil.copytree(run_dir, dest)
    summary = json.loads((dest / "summary.json").read_text())
    summary["args"]["seed"] = summary["settings"]["seed"] = seed
    (dest / "summary.json").write_text(json.dumps(summary))
    records = metric_lines(dest)
    records[-1]["test"]["backbone"]["top1"] = backbone_top1
    (dest / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return dest


@slow
def test_table_gives_mean_and_std_over_seeds(run_dir, tmp_path):
    runs = [seeded_copy(run_dir, tmp_path / f"s{k}", k, top1) for k, top1 in enumerate((80.0, 84.0))]
    table = report.results_table([str(r) for r in runs]).splitlines()
    assert len(table) == 3 and table[2].startswith("| mixskd paper | 2 | 2 |")
    assert f"| 82.00 ± {np.std([80.0, 84.0], ddof=1):.2f} |" in table[2]


@slow
def test_table_and_plot_never_average_runs_of_different_experiments(run_dir, tmp_path):
    """Runs that differ in anything but the seed (epochs, data, network, any training argument) get rows of
    their own, each labelled with the values that set it apart; the figure gives each its colour."""
    runs = [seeded_copy(run_dir, tmp_path / f"s{k}", k, top1) for k, top1 in enumerate((80.0, 84.0, 10.0, 20.0))]
    changes = {"settings": {"epochs": 5}}, {"data": {"n_train": 300, "num_classes": 3}}
    for run, change in zip(runs[2:], changes):
        summary = json.loads((run / "summary.json").read_text())
        for part, values in change.items():
            summary[part].update(values)
        (run / "summary.json").write_text(json.dumps(summary))
    table = report.results_table([str(r) for r in runs]).splitlines()
    assert len(table) == 5 and [" |".join(row.split(" |")[:2]) for row in table[2:]] == [
        "| mixskd paper (--epochs 2) | tiny (10 classes, 192 train)",
        "| mixskd paper (--epochs 2) | tiny (3 classes, 300 train)",  # rows that differ in data name it
        "| mixskd paper (--epochs 5) | tiny (10 classes, 192 train)"]
    assert "| 2 | 2 | 82.00 ±" in table[2] and "| 1 | 2 | 20.00 |" in table[3] and "| 1 | 2 | 10.00 |" in table[4]
    # other methods on other data: each row names its data, though no two rows share a method
    summary = json.loads((runs[3] / "summary.json").read_text())
    summary["settings"].update(method="ce", hp={})
    (runs[3] / "summary.json").write_text(json.dumps(summary))
    table = report.results_table([str(runs[0]), str(runs[3])]).splitlines()
    assert [" |".join(row.split(" |")[:2]) for row in table[2:]] == ["| ce | tiny (3 classes, 300 train)",
                                                                    "| mixskd paper | tiny (10 classes, 192 train)"]
    pytest.importorskip("matplotlib")
    figures.plot_runs([str(r) for r in runs], str(tmp_path / "fig.png"))


@slow
def test_plot_writes_a_small_png(run_dir, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "curves.png"
    evaluation.main(["--plot", str(run_dir), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size < 200 * 1024


@slow
def test_plot_draws_the_confusion_matrix_of_one_run(run_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "confusion.png"
    evaluation.main(["--plot", str(run_dir), "--per-class", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size < 200 * 1024
    with pytest.raises(errors.UserError, match="confusion matrix of one run"):
        evaluation.main(["--plot", str(run_dir), str(run_dir), "--per-class"])


@slow
def test_plot_goes_into_the_run_folder_by_default(run_dir, monkeypatch, capsys):
    monkeypatch.setattr(figures, "plot_runs", lambda runs, out, notes: out)  # where, not how: no matplotlib needed
    evaluation.main(["--plot", str(run_dir)])
    assert capsys.readouterr().out.strip() == f"figure written to {run_dir / 'results.png'}"


@slow
def test_eval_finds_the_dataset_from_another_directory(run_dir, tmp_path, monkeypatch, capsys):
    """deploy.pt records the .npz as typed (here relative) and its absolute path; eval.py uses the
    latter from another working directory, and says how to point it elsewhere when both are gone."""
    ckpt = torch.load(run_dir / "deploy.pt", weights_only=True)
    absolute = ckpt["meta"]["dataset_path"]
    assert os.path.isabs(absolute)
    ckpt["meta"]["dataset"] = "../elsewhere/tiny.npz"
    torch.save(ckpt, tmp_path / "deploy.pt")
    monkeypatch.chdir(tmp_path)
    evaluation.main(["deploy.pt", "--json"])
    assert json.loads(capsys.readouterr().out)["heads"]["backbone"] == metric_lines(run_dir)[-1]["test"]["backbone"]
    ckpt["meta"]["dataset_path"] = str(tmp_path / "moved.npz")
    torch.save(ckpt, tmp_path / "deploy.pt")
    with pytest.raises(errors.UserError, match=r"not found from here.*pass --dataset PATH.npz"):
        evaluation.main(["deploy.pt"])
    ckpt["meta"].update(dataset="../elsewhere/folder", dataset_path=str(tmp_path / "folder"))  # a folder, moved
    torch.save(ckpt, tmp_path / "deploy.pt")
    with pytest.raises(errors.UserError, match=r"not found from here.*pass --dataset FOLDER"):
        evaluation.main(["deploy.pt"])


@slow
def test_eval_says_when_the_classes_cannot_be_checked(run_dir, tiny_npz, tmp_path, capsys):
    """A dataset without class_names, of the run's class count: the numbers come with a note naming the count
    and where the run's names came from."""
    with np.load(tiny_npz) as f:
        np.savez(tmp_path / "unnamed.npz", **{k: f[k] for k in data.NPZ_KEYS})
    evaluation.main([str(run_dir / "deploy.pt"), "--dataset", str(tmp_path / "unnamed.npz")])
    err = capsys.readouterr().err
    meta = torch.load(run_dir / "deploy.pt", weights_only=True)["meta"]
    assert err.startswith(f"note: the classes could not be checked: {tmp_path / 'unnamed.npz'} names no classes; "
                          f"label k here is taken to be class k of the run's 10 ({meta['class_names'][0]}, ")
    assert err.rstrip().endswith(f"from {meta['dataset']})") and err.count("\n") == 1


@slow
def test_plot_without_matplotlib_gives_a_one_line_hint(run_dir, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(errors.UserError, match="pip install matplotlib"):
        evaluation.main(["--plot", str(run_dir), "--out", str(tmp_path / "x.png")])


@slow
def test_table_leaves_unfinished_runs_out_naming_them_and_finds_the_runs_below_a_folder(run_dir, tmp_path, capsys):
    """A stopped run is never a headline: it is left out of the table and named with its epoch; a folder that is
    not a run (notes, a figure) is skipped and named; a parent folder is searched for the runs below it."""
    runs = tmp_path / "runs"
    seeded_copy(run_dir, runs / "done", 0, 80.0)
    stopped = shutil.copytree(run_dir, runs / "stopped")
    (stopped / "summary.json").unlink()
    (stopped / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    (runs / "notes").mkdir()
    (runs / "notes" / "table.md").write_text("an older table")
    evaluation.main(["--table", str(runs / "done"), str(stopped), str(runs / "notes")])
    out, err = capsys.readouterr()
    rows = out.splitlines()
    assert len(rows) == 3 and rows[2].startswith("| mixskd paper | 1 | 2 | 80.00 |")
    first = metric_lines(run_dir)[0]["test"]["backbone"]["top1"]
    assert f"note: left out, unfinished: {stopped} (epoch 1 of 2; its last backbone top-1 {first:.2f})" in err
    assert f"note: skipped: {runs / 'notes'} (not a run folder, and no run folder below it" in err
    evaluation.main(["--table", str(runs)])
    again, err = capsys.readouterr()
    assert again == out and "left out, unfinished" in err and "skipped" not in err
    with pytest.raises(errors.UserError, match="no finished run among"):
        report.results_table([str(stopped)])


@slow
def test_a_table_over_several_networks_keeps_each_networks_rows_together(run_dir, tmp_path):
    """Two methods on two networks: the rows come network by network, each in the method order, so a reader
    compares the methods of one network on adjacent rows."""
    for k, (arch, method) in enumerate([("b:net", "mixskd"), ("a:net", "ce"), ("b:net", "ce"), ("a:net", "mixskd")]):
        run = seeded_copy(run_dir, tmp_path / f"r{k}", 0, 50.0)
        summary = json.loads((run / "summary.json").read_text())
        summary["args"]["arch"] = summary["settings"]["arch"] = arch
        if method == "ce":
            summary["settings"].update(method="ce", hp={})
        (run / "summary.json").write_text(json.dumps(summary))
    rows = report.results_table([str(tmp_path)]).splitlines()[2:]
    assert [row.split(" |")[0] for row in rows] == ["| ce (--arch a:net)", "| mixskd paper (--arch a:net)",
                                                    "| ce (--arch b:net)", "| mixskd paper (--arch b:net)"]



def test_a_tables_lengths_come_in_the_order_of_their_numbers(tmp_path):
    """One method at 9, 90 and 205 epochs: the rows in that order (a sort by characters puts 205 between 9 and
    90), whatever order the folders are found in."""
    for epochs in (205, 9, 90):
        length_copy(LENGTH / "ce-seed0", tmp_path / f"e{epochs}" / "ce-seed0", epochs, 60.0)
    rows = report.results_table([str(tmp_path)]).splitlines()[2:]
    assert [row.split(" |")[0].split(", ")[0] for row in rows] == ["| ce (--epochs 9", "| ce (--epochs 90",
                                                                 "| ce (--epochs 205"]
    labels = ["ce (--lr 0.5)", "ce (--lr 0.05)", "ce (--epochs 205)", "ce (--epochs 90)"]  # decimals by value too
    assert sorted(labels, key=report.natural_key) == ["ce (--epochs 90)", "ce (--epochs 205)", "ce (--lr 0.05)",
                                                      "ce (--lr 0.5)"]

@slow
def test_a_summary_json_alone_is_a_finished_run_of_the_table(run_dir, tmp_path):
    """docs/ keeps the summary.json of each run behind its tables: the table made from those files alone is the
    table made from the run folders."""
    for k, top1 in enumerate((80.0, 84.0)):
        seeded_copy(run_dir, tmp_path / "runs" / f"s{k}", k, top1)
        kept = tmp_path / "kept" / f"s{k}"
        kept.mkdir(parents=True)
        run = tmp_path / "runs" / f"s{k}"
        full = {**json.loads((run / "summary.json").read_text()), **report.summarise(metric_lines(run))}  # as written
        (tmp_path / "runs" / f"s{k}" / "summary.json").write_text(json.dumps(full))
        (kept / "summary.json").write_text(json.dumps(full))
    assert report.results_table([str(tmp_path / "kept")]) == report.results_table([str(tmp_path / "runs")])
    assert report.results_table([str(tmp_path / "kept" / "s0" / "summary.json")]).count("\n") == 2


@slow
def test_the_figure_of_baseline_runs_draws_their_loss_terms(tiny_npz, tmp_path, monkeypatch):
    plt = pytest.importorskip("matplotlib.pyplot")
    tiny_run(tiny_npz, tmp_path / "ce", "--epochs", "2", "--method", "ce")
    drawn, real = {}, plt.subplots

    def subplots(*args, **kwargs):
        fig, axes = real(*args, **kwargs)
        drawn["axes"] = axes
        return fig, axes

    monkeypatch.setattr(plt, "subplots", subplots)
    figures.plot_runs([str(tmp_path / "ce")], str(tmp_path / "fig.png"))
    loss_ax = drawn["axes"][1]
    assert loss_ax.get_title() == "loss terms, ce seed 0" and [line.get_label() for line in loss_ax.lines] == [
        "total", "L_ce"]


def legacy(summary):
    """summary.json as a revision before settings wrote it: every value among the arguments (the flags of every
    method, read or not; warmup and clip resolved; the stem), no settings, epochs counted from 0."""
    s = summary.pop("settings")
    args = {**summary["args"], **{k: v for k, v in flags_of(s).items() if k not in report.DERIVED},
            "stem": s["setting"], "recipe": "paper", "mix": "mixup", "alpha": 0.4, "temperature": 3.0,
            "image_size": None, **{f"w_{t}": 1.0 for t in TERMS}}
    args.pop("setting")
    summary.pop("best_epoch_chosen_on")
    return {**summary, "args": args, "final_epoch": summary["final_epoch"] - 1}


@slow
def test_a_run_saved_by_an_older_revision_is_finished_and_groups_with_its_seeds(run_dir, tmp_path, capsys):
    runs = [seeded_copy(run_dir, tmp_path / f"s{k}", k, top1) for k, top1 in enumerate((80.0, 84.0))]
    summary = json.loads((runs[1] / "summary.json").read_text())
    (runs[1] / "summary.json").write_text(json.dumps(legacy(summary)))
    table = report.results_table([str(r) for r in runs]).splitlines()
    assert len(table) == 3 and table[2].startswith("| mixskd paper | 2 | 2 | 82.00 ±")


@slow
def test_a_folder_with_metrics_alone_is_named_not_tabled(run_dir, tmp_path, monkeypatch):
    (tmp_path / "bare").mkdir()
    shutil.copy(run_dir / "metrics.jsonl", tmp_path / "bare")
    notes = []
    assert report.results_table([str(run_dir), str(tmp_path / "bare")], notes).count("\n") == 2
    assert notes == [f"left out: {tmp_path / 'bare'} holds metrics.jsonl but neither summary.json nor last.pt, which "
                     f"say what it trained"]
    monkeypatch.setattr(figures, "pyplot", lambda: pytest.skip("the runs are chosen before anything is drawn"))
    with pytest.raises(errors.UserError, match="no run to draw among .*neither summary.json nor last.pt"):
        figures.plot_runs([str(tmp_path / "bare")], str(tmp_path / "fig.png"))


def length_copy(summary_dir, dest, epochs, top1, **summary_changes):
    """A copy of a kept summary.json posing as the same run at another length (the recipe's decays for it), whose
    final backbone top-1 is top1."""
    summary = json.loads((summary_dir / "summary.json").read_text())
    summary["settings"].update(epochs=epochs, milestones=milestones(argparse.Namespace(), epochs))
    summary["args"]["epochs"] = summary["final_epoch"] = epochs
    summary["final_test"]["backbone"]["top1"] = top1
    summary.update(summary_changes)
    dest.mkdir(parents=True)
    (dest / "summary.json").write_text(json.dumps(summary))
    return dest


LENGTH = Path(__file__).parent / "docs" / "summaries" / "length" / "e15"


@slow
def test_the_budget_figure_puts_one_experiments_lengths_on_one_line_and_keeps_devices_apart(run_dir, tmp_path):
    """eval.py --budget: the seeds of one experiment at one length are one point, its lengths one line; runs on
    another machine (whose minutes do not compare), decays not at the recipe's fractions (not only the length
    differs) and unfinished runs are kept off the line, each named."""
    for seed in (0, 1):
        shutil.copytree(LENGTH / f"ce-seed{seed}", tmp_path / "e15" / f"ce-seed{seed}")
        length_copy(LENGTH / f"ce-seed{seed}", tmp_path / "e30" / f"ce-seed{seed}", 30, 70.0 + 2 * seed)
    length_copy(LENGTH / "ps-kd-seed0", tmp_path / "e30" / "ps-kd-seed0", 30, 75.0)
    length_copy(LENGTH / "ps-kd-seed1", tmp_path / "gpu" / "ps-kd-seed1", 30, 76.0, device_name="NVIDIA H200")
    moved = length_copy(LENGTH / "ce-seed1", tmp_path / "odd" / "ce-seed1", 60, 99.0)
    summary = json.loads((moved / "summary.json").read_text())
    summary["settings"]["milestones"] = [1]
    (moved / "summary.json").write_text(json.dumps(summary))
    unfinished = tmp_path / "e60" / "ce-seed0"  # metrics and last.pt, no summary.json yet
    unfinished.mkdir(parents=True)
    for name in ("metrics.jsonl", "last.pt"):
        shutil.copy(run_dir / name, unfinished / name)
    compiled = json.loads((tmp_path / "e30" / "ce-seed1" / "summary.json").read_text())
    compiled["settings"]["compile"] = "default"  # one seed compiled, the other eager: a note, the same point
    (tmp_path / "e30" / "ce-seed1" / "summary.json").write_text(json.dumps(compiled))
    notes = []
    series = figures.budget_series([str(tmp_path)], notes)
    cpu = json.loads((LENGTH / "ce-seed0" / "summary.json").read_text())["device_name"]
    ce15 = [json.loads((LENGTH / f"ce-seed{k}" / "summary.json").read_text()) for k in (0, 1)]
    assert [(label, device, [(n, top1) for n, top1, _ in points]) for label, device, points in series] == [
        ("ce", cpu, [(15, [s["final_test"]["backbone"]["top1"] for s in ce15]), (30, [70.0, 72.0])]),
        ("ps-kd", cpu, [(30, [75.0])]), ("ps-kd", "NVIDIA H200", [(30, [76.0])])]
    assert series[0][2][0][2] == [s["train_time_s"] / 60 for s in ce15]
    assert any(f"left out: {moved} decays at epochs [1]" in note for note in notes), notes
    assert any(note.startswith("devices: ") for note in notes), notes
    assert f"left out, unfinished: {unfinished}" in notes
    assert any(note.startswith(f"ce at 30 epochs on {cpu}: its seeds ran with different speed settings (amp bf16, "
                               f"channels_last True, compile default; amp bf16, channels_last True, compile off)")
               for note in notes), notes


@slow
def test_the_budget_figure_goes_into_the_first_folder_by_default(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    for seed in (0, 1):
        shutil.copytree(LENGTH / f"ce-seed{seed}", tmp_path / f"ce-seed{seed}")
    evaluation.main(["--budget", str(tmp_path)])
    assert (tmp_path / "budget.png").read_bytes()[:4] == b"\x89PNG"
    assert capsys.readouterr().out == f"figure written to {tmp_path / 'budget.png'}\n"
    with pytest.raises(errors.UserError, match="no finished run at the recipe's decays among"):
        figures.budget_series([str(tmp_path / "budget.png")])
    for other in ("--table", "--plot"):  # one report at a time, never one of them silently left out
        with pytest.raises(SystemExit):
            evaluation.main([other, str(tmp_path), "--budget", str(tmp_path)])
        assert f"error: {other} and --budget: one at a time" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluation.main([str(tmp_path / "ce-seed0" / "last.pt"), "--budget", str(tmp_path)])
    assert "error: --budget reads run folders, not a checkpoint" in capsys.readouterr().err
