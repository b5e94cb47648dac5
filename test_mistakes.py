"""A user's mistakes: each is one line, a non-zero exit, and no lost work (checkpoints kept); numbers out of
range and method flags a method does not read are refused before any data is read."""
import argparse
import dataclasses
import json
import multiprocessing
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

import bench
import checkpoints
import cli
import data
import errors
import eval as evaluation
import figures
import runtime
import schedule
import speedups
import stability
import train
from conftest import HERE, SHARED_NPZ, metric_lines, settings_of, tiny_run
from losses import TERMS
from methods import FLAGS, METHODS, readers
from model import ResNet
from settings import flags_of

WIDTH, CLASSES = 4, 10
slow = pytest.mark.slow  # whole runs and subprocesses
# outside the method's checklist, every test here: `pytest -m "not slow"` (the checklist) leaves the file out
pytestmark = slow


BAD_VALUES = {"width": "0", "image_size": "4", "workers": "-1", "alpha": "0", "temperature": "-3",
              **{f"w_{t}": "-1" for t in TERMS}, "epochs": "0", "warmup_epochs": "nan", "milestones": "0", "lr": "inf",
              "weight_decay": "nan", "batch_size": "1", "clip_grad": "-1", "seed": str(2**32), "log_every": "0",
              "val_split": "nan"}


def numeric_flags():
    return [a.dest for a in cli.parser._actions if a.type in (int, float) or a.dest == "val_split"]


def test_every_numeric_flag_has_a_checked_range():
    assert sorted(numeric_flags()) == sorted(cli.RANGES) == sorted(BAD_VALUES)


@pytest.mark.parametrize("key", sorted(cli.RANGES))
def test_a_number_outside_its_range_is_refused_before_any_data(key, capsys):
    """Each numeric flag, at a value that cannot be meant (--temperature -3 once trained a reversed KD), ends
    with one line naming the flag and the valid range, exit 2, before any data is read."""
    flag = "--" + key.replace("_", "-")
    bad = BAD_VALUES[key]
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--dataset", "missing.npz", flag, bad])
    assert e.value.code == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert flag in line and bad in line and ("must be" in line or "give a fraction" in line)


@pytest.mark.parametrize("value", ["-3", "0", "nan"])
def test_temperature_must_be_positive_and_finite(value, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args([f"--temperature={value}"])
    assert f"--temperature must be a finite number > 0, got {float(value)}" in capsys.readouterr().err


@pytest.mark.parametrize("argv, refused", [
    (["--recipe", "official", "--w-ce", "0", "--w-kd", "0", "--w-feat", "0", "--w-adv", "0"], True),  # L_mix is logged
    (["--w-ce", "0", "--w-mix", "0", "--w-kd", "0", "--w-feat", "0", "--w-adv", "0"], True),
    (["--recipe", "official", "--w-ce", "0", "--w-kd", "0", "--w-feat", "0"], False),
    (["--dataset", "imagenet", "--recipe", "official", "--w-ce", "0", "--w-kd", "0", "--w-feat", "0", "--w-adv", "0"],
     False),  # the released ImageNet objective optimises L_mix
])
def test_every_optimised_weight_at_zero_is_refused(argv, refused, capsys):
    if not refused:
        cli.parse_args(argv)
        return
    with pytest.raises(SystemExit):
        cli.parse_args(argv)
    assert "every optimised loss weight is 0" in capsys.readouterr().err


def test_width_applies_to_our_resnets_alone(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--arch", "torchvision:resnet18", "--width", "16"])
    assert "--width sets the channels of our ResNets; torchvision:resnet18 has its own" in capsys.readouterr().err
    argv = ["--arch", "torchvision:resnet18"]
    dataset = argparse.Namespace(kind="tensors", num_classes=10, image_size=32, class_names=None, mean=(0, 0, 0),
                                 std=(1, 1, 1))
    meta = checkpoints.run_meta(cli.parse_args(argv), settings_of(argv), dataset, torchvision.models.resnet18())
    assert (meta["width"], meta["stem"], meta["stem_relu"]) == (None, None, None)
    assert settings_of([]).width == 64


# ---------------------------------------- Mistakes (slow): one line, non-zero exit, checkpoints kept


@pytest.mark.parametrize("argv", [["--arch", "resnet20"], ["--method", "kd"], ["--recipe", "released"],
                                  ["--dataset", "svhn"], ["--alpha", "0"], ["--batch-size", "1"],
                                  ["--w-kd", "nan"]])
def test_bad_arguments_exit_with_one_line_that_points_to_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and err.endswith(" (see train.py --help)\n") and err.count("\n") == 1
    for parse in (evaluation.parse_args, bench.parse_args, stability.parse_args):
        with pytest.raises(SystemExit):
            parse(["--no-such-flag"])
        assert capsys.readouterr().err.count("\n") == 1


FOREIGN = [  # a new user's tries that trained silently before: the method reads none of these flags
    ("cs-kd", ["--w-kd", "0"], "--temperature"), ("dks", ["--w-kd", "0"], "--temperature"),
    ("byot", ["--w-feat", "0"], "--temperature"), ("label-smooth", ["--w-ce", "0"], None),
    ("ps-kd", ["--alpha", "0.5"], None), ("byot", ["--recipe", "official"], "--temperature"),
    ("dks", ["--mix", "cutmix"], "--temperature"), ("ce", ["--alpha", "0.3"], None),
    ("mixup", ["--mix", "cutmix"], "--alpha"),
]


@pytest.mark.parametrize("method, flag, reads", FOREIGN)
def test_a_method_flag_the_method_does_not_read_is_refused_in_one_line(method, flag, reads, capsys):
    """Ten methods share one command line: a method flag the chosen method does not read is refused, naming the
    method and the flags it does read, before any data is read (the .npz does not exist)."""
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--dataset", "missing.npz", "--method", method, *flag])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    own = f"its flags: {reads}" if reads else "it reads none of the method flags"
    assert f"--method {method} does not read {flag[0]} ({own}): drop it, or choose a method that reads it" in err


@pytest.mark.parametrize("method, flag, read", [("mixskd", ["--w-kd", "0"], ("w_kd", 0.0)),
                                                ("mixup", ["--alpha", "0.2"], ("alpha", 0.2)),
                                                ("cs-kd", ["--temperature", "3"], ("temperature", 3.0))])
def test_a_method_flag_the_method_reads_is_taken(method, flag, read):
    s = settings_of(["--method", method, *flag])
    assert s.hp[read[0]] == read[1]
    assert set(s.hp) == set(METHODS[method].defaults("cifar"))  # and nothing else


def test_the_weight_of_a_term_the_recipe_does_not_optimise_is_refused(capsys):
    """Under recipe official on CIFAR L_mix is logged, not optimised (Eq. (10')): --w-mix would change nothing.
    The released ImageNet objective optimises it, and so does recipe paper."""
    with pytest.raises(SystemExit):
        cli.parse_args(["--recipe", "official", "--w-mix", "2"])
    assert "--w-mix weighs L_mix, which recipe official logs on CIFAR and does not optimise" in capsys.readouterr().err
    assert settings_of(["--recipe", "official", "--w-mix", "2", "--dataset", "imagenet"]).hp["w_mix"] == 2.0
    assert settings_of(["--w-mix", "2"]).hp["w_mix"] == 2.0


def test_help_says_which_methods_read_each_method_flag():
    helps = {action.dest: action.help for action in cli.parser._actions}
    assert helps["w_kd"] == "weight of L_kd (default 1; 0 disables it) (read by mixskd)"
    assert helps["alpha"].endswith("(read by mixskd, mixup, cutmix)")
    assert helps["temperature"].endswith("(read by mixskd, byot, dks, cs-kd)")
    assert all(helps[flag].endswith(f"(read by {', '.join(readers(flag))})") and readers(flag) for flag in FLAGS)


def test_a_resumed_run_judges_the_flags_given_now_by_its_own_method(run_dir, tmp_path):
    """The command line's --method is mixskd's default, the run's is what judges: a flag its method does not read
    is refused."""
    run = shutil.copytree(run_dir, tmp_path / "run")
    ckpt = torch.load(run / "last.pt", weights_only=True)
    torch.save({**ckpt, "args": {**ckpt["args"], "method": "ps-kd"}}, run / "last.pt")
    with pytest.raises(errors.UserError, match=r"was trained with --method ps-kd, which does not read --alpha \(it "
                                               r"reads none of the method flags\): drop it$"):
        cli.resume_arguments(cli.parse_args(argv := ["--out", str(run), "--resume", "--alpha", "0.4"]), argv)


@pytest.mark.parametrize("dataset, message", [("../mydata/nofolder", "--dataset ../mydata/nofolder: no such folder"),
                                              ("svhn", "unknown dataset 'svhn'")])
def test_a_dataset_that_is_not_there_is_named_as_a_path_or_a_name(dataset, message, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--dataset", dataset])
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluation.parse_args(["--help"])
    assert "FOLDER" in cli.parser.format_help() and "FOLDER" in capsys.readouterr().out


def test_missing_dataset_offline_names_folder_and_url(tmp_path, monkeypatch):
    import torchvision

    def offline(self):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets.CIFAR100, "download", offline)
    url = r"https://www\.cs\.toronto\.edu/~kriz/cifar-100-python"
    with pytest.raises(errors.UserError, match=r"cifar-100-python.*" + url):
        data.load_dataset("cifar100", str(tmp_path))
    with pytest.raises(errors.UserError, match=r"\(or pass --data where it is\), or train on an \.npz of your own"):
        data.load_dataset("cifar100", str(tmp_path / "data"))
    assert not (tmp_path / "data").exists()  # the attempt left no empty folder behind


@pytest.mark.parametrize("arrays, message", [
    ({"x_train": np.zeros((4, 32, 32, 3), np.uint8)}, "lacks y_train, x_test, y_test"),
    ({"x_train": np.zeros((4, 32, 32), np.uint8), "y_train": np.zeros(4, int),
      "x_test": np.zeros((2, 32, 32, 3), np.uint8), "y_test": np.zeros(2, int)},
     r"x_train must be N x H x W x 3 images, got shape \(4, 32, 32\)$"),
    ({"x_train": np.zeros((4, 3, 32, 32), np.uint8), "y_train": np.zeros(4, int),
      "x_test": np.zeros((2, 32, 32, 3), np.uint8), "y_test": np.zeros(2, int)},
     r"channels first\? np.transpose\(x, \(0, 2, 3, 1\)\) puts them last"),
    ({"x_train": np.zeros((4, 32, 32, 3), np.float32), "y_train": np.zeros(4, int),
      "x_test": np.zeros((2, 32, 32, 3), np.uint8), "y_test": np.zeros(2, int)},
     r"x_train must be uint8 images \(0\.\.255\), got float32: scale them to 0\.\.255 and cast: "
     r"x = \(x \* 255\)\.round\(\)\.astype\(np\.uint8\)"),
    ({"x_train": np.zeros((4, 32, 32, 3), np.uint8), "y_train": np.zeros(3, int),
      "x_test": np.zeros((2, 32, 32, 3), np.uint8), "y_test": np.zeros(2, int)},
     "x_train has 4 images, y_train 3 labels of shape"),
    ({"x_train": np.zeros((4, 32, 32, 3), np.uint8), "y_train": np.array(["cat", "dog", "cat", "cow"]),
      "x_test": np.zeros((2, 32, 32, 3), np.uint8), "y_test": np.zeros(2, int)},
     "y_train must hold integer labels 0..C-1, got <U3: map them to 0..C-1 and put the names, in that order, in "
     "class_names"),
    # labels must fit the classes: ten class_names and labels 10..13, or a test label beyond the training ones
    ({"x_train": np.zeros((4, 8, 8, 3), np.uint8), "y_train": np.arange(10, 14), "x_test": np.zeros((2, 8, 8, 3),
      np.uint8), "y_test": np.array([10, 11]), "class_names": np.array(list("abcdefghij"))},
     r"y_train holds label 10, outside 0\.\.9 for the 10 classes of class_names"),
    ({"x_train": np.zeros((4, 8, 8, 3), np.uint8), "y_train": np.arange(4), "x_test": np.zeros((2, 8, 8, 3),
      np.uint8), "y_test": np.array([1, 42])}, r"y_test holds label 42, outside 0\.\.3 for the 4 classes of the tr"),
    ({"x_train": np.zeros((0, 8, 8, 3), np.uint8), "y_train": np.zeros(0, int), "x_test": np.zeros((2, 8, 8, 3),
      np.uint8), "y_test": np.zeros(2, int)}, "x_train holds no images"),
])
def test_bad_npz_is_reported(arrays, message, tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(errors.UserError, match=message):
        data.load_dataset(str(path))


@slow
def test_existing_run_without_resume_is_refused(kept_run, tiny_npz):
    with pytest.raises(errors.UserError, match="already holds a run"):
        tiny_run(tiny_npz, kept_run, "--epochs", "3")


@slow
def test_resume_with_another_width_is_refused(kept_run, tiny_npz):
    with pytest.raises(errors.UserError, match=r"these differ: --width 8 \(the run: 4\)"):
        train.main(["--dataset", tiny_npz, "--width", "8", "--out", str(kept_run), "--resume"])


@slow
def test_resume_with_another_seed_is_refused(kept_run, tiny_npz):
    with pytest.raises(errors.UserError, match=r"these differ: --seed 1 \(the run: 0\)"):
        tiny_run(tiny_npz, kept_run, "--epochs", "2", "--resume", "--seed", "1")


@slow
@pytest.mark.parametrize("term, recipe, named", [("feat", "paper", "L_total, L_feat"), ("mix", "official", "L_mix")])
def test_nan_stop_names_every_non_finite_term_and_the_step(term, recipe, named, tiny_npz, tmp_path, monkeypatch):
    """A term turns NaN on the third step: the stop names it (not the finite terms) and step 3, also when
    the term is logged but not in the total (L_mix under `official`)."""
    import losses

    calls, real = [], getattr(losses, f"loss_{term}")

    def nan_on_third_step(*args):
        calls.append(1)
        return real(*args) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(losses, f"loss_{term}", nan_on_third_step)
    with pytest.raises(errors.UserError) as e:
        tiny_run(tiny_npz, tmp_path / "nan", "--epochs", "1", "--log-every", "1", "--recipe", recipe)
    assert f"non-finite loss from step 3/8 of epoch 1/1 on ({named})" in str(e.value)
    assert not (tmp_path / "nan").exists()  # a first epoch that fails leaves no folder behind


@slow
@pytest.mark.skipif(not SHARED_NPZ.exists(), reason="the divergence is measured on real images")
def test_the_smallest_run_that_diverged_now_trains_finite(tiny_npz):
    """docs/stability.md: width 16, batch 8, lr 0.1 from the first step made the self-teacher's weights grow
    without bound (non-finite at step 12 on the first 256 real images); the default warmup and clip keep
    every loss, weight and BatchNorm statistic finite over the same 16 steps."""
    import stability

    dataset = data.load_dataset(tiny_npz)
    finite = {}
    for extra in ("--warmup-epochs 0 --clip-grad 0", ""):
        args = stability.case_args("resnet18/16", 8, 1, "off", tiny_npz, extra)
        finite[extra] = stability.run_case(args, dataset, torch.device("cpu"), 16)["finite"]
    assert finite == {"--warmup-epochs 0 --clip-grad 0": False, "": True}


@slow
@pytest.mark.parametrize("broken", ["test_nll", "batchnorm"])
def test_a_network_with_non_finite_outputs_is_never_saved(broken, tiny_npz, tmp_path, monkeypatch):
    """A finite loss can hide a broken network (a diverged run's deploy.pt gave NaN for every input): a test
    NLL or a BatchNorm statistic that is not finite stops the run before any checkpoint, naming what was
    measured and, where the user's --warmup-epochs 0 is the cause, that flag."""
    if broken == "test_nll":
        real = train.evaluate

        def nan_nll(*args, **kwargs):
            test = real(*args, **kwargs)
            test["backbone"]["nll"] = float("nan")
            return test

        monkeypatch.setattr(train, "evaluate", nan_nll)
        what = "test NLL of backbone"
    else:
        real_step = train.train_step

        def corrupt_batchnorm(method, *args):
            out = real_step(method, *args)
            method.objective.net.backbone.bn1.running_var.fill_(float("inf"))
            return out

        monkeypatch.setattr(train, "train_step", corrupt_batchnorm)
        what = "1 weights or BatchNorm statistics (net.backbone.bn1.running_var, ...)"
    with pytest.raises(errors.UserError) as e:
        train.main(["--dataset", tiny_npz, "--width", "4", "--batch-size", "32", "--epochs", "2", "--milestones", "1",
                    "--warmup-epochs", "0", "--out", str(tmp_path / "run")])
    assert f"epoch 1/2: the network's outputs are not finite ({what}): stopped before saving it" in str(e.value)
    assert "--warmup-epochs 0 gives 0 warmup iterations where the default gives 4: drop the flag" in str(e.value)
    assert not (tmp_path / "run").exists()


@slow
def test_non_finite_loss_stops_naming_the_term_and_keeps_last_checkpoint(kept_run, tiny_npz, monkeypatch):
    """An lr of 1e30 from the third epoch on (a resume takes the run's own --lr, so the schedule stands in)."""
    real = schedule.lr_at
    monkeypatch.setattr(train, "lr_at", lambda step, s: 1e30 if step >= 2 * s.steps_per_epoch else real(step, s))
    kept = r"non-finite loss from step 2/6 of epoch 3/3 on \(L_.*last.pt from the previous epoch is kept"
    with pytest.raises(errors.UserError, match=kept):
        tiny_run(tiny_npz, kept_run, "--epochs", "3", "--resume", "--extend", "--log-every", "2")


@slow
def test_an_extended_run_never_raises_its_lr_unless_milestones_say_so(tiny_npz, tmp_path, capsys):
    """Four epochs (lr 0.1, 0.1, 0.01, 0.001), extended to six: the default milestones of six epochs would put
    epoch 5 back at 0.01; the extension stays at 0.001, and the header says so and how to choose otherwise.
    Resumed or extended, a run's seeds still form one row of the table."""
    run = lambda out, *extra: train.main(["--dataset", tiny_npz, "--width", "4", "--batch-size", "32",
                                          "--warmup-epochs", "1", "--out", str(out), *extra])
    run(tmp_path / "a", "--epochs", "4")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    capsys.readouterr()
    run(tmp_path / "a", "--epochs", "6", "--resume", "--extend")
    header = capsys.readouterr().out.splitlines()[0]
    assert header.endswith("lr 0.001 in epochs 5-6 (an --extend keeps the lr at or below 0.001, its last; "
                           "--extend-schedule new follows the new schedule)")
    assert [round(r["lr"], 6) for r in metric_lines(tmp_path / "a")] == [0.1, 0.1, 0.01, 0.001, 0.001, 0.001]
    run(tmp_path / "b", "--epochs", "6", "--resume", "--extend", "--milestones", "5", "--extend-schedule", "new")
    assert [round(r["lr"], 6) for r in metric_lines(tmp_path / "b")][4:] == [0.1, 0.01]  # asked for


@slow
def test_an_epoch_that_drops_more_than_a_tenth_of_the_images_says_so(tiny_npz, tmp_path, capsys):
    train.main(["--dataset", tiny_npz, "--width", "4", "--batch-size", "200", "--epochs", "1", "--out",
                str(tmp_path / "run")])
    assert ("note: each epoch trains on 200 of the 256 training images and drops the other 56 (its last, "
            "incomplete batch of --batch-size 200)") in capsys.readouterr().err


@slow
def test_resume_takes_every_training_argument_from_last_pt(kept_run, tiny_npz, capsys):
    """`--out RUN --resume` alone continues the run as it was started (here: says it is complete); a training
    flag that differs is refused naming each, with the run's value; speed and file flags may differ."""
    train.main(["--out", str(kept_run), "--resume"])
    assert "is complete (2 of 2 epochs): nothing to do" in capsys.readouterr().out
    train.main(["--out", str(kept_run), "--resume", "--amp", "off", "--log-every", "5", "--dataset", tiny_npz])
    with pytest.raises(errors.UserError) as e:
        train.main(["--out", str(kept_run), "--resume", "--lr", "0.5", "--alpha", "2", "--temperature", "1",
                    "--mix", "cutmix", "--w-adv", "0", "--batch-size", "64"])
    assert str(e.value).startswith(f"--resume continues {kept_run} with the arguments it was started with; these "
                                   "differ: --lr 0.5 (the run: 0.1), --alpha 2.0 (the run: 0.4), --temperature 1.0 "
                                   "(the run: 3.0), --mix cutmix (the run: mixup), --w-adv 0.0 (the run: 1.0), "
                                   "--batch-size 64 (the run: 32)")


def test_every_argument_is_either_resumed_or_named_as_not_training():
    """A new flag cannot slip past the resume check: every one is in last.pt's args (so it is compared and
    restored) unless it is listed as not changing what a run computes."""
    trained = {**vars(cli.parse_args([])), **flags_of(dataclasses.asdict(settings_of([])))}
    dests = {a.dest for a in cli.parser._actions if a.dest != "help"}
    assert dests <= set(trained) and cli.NOT_TRAINING <= dests
    assert {"lr", "alpha", "temperature", "batch_size", "mix", "epochs", "seed", "val_split", "clip_grad",
            "warmup_epochs", "schedule"} <= dests - cli.NOT_TRAINING


@slow
def test_a_bf16_run_resumed_under_fp16_starts_a_fresh_grad_scaler(run_dir, tmp_path, monkeypatch, capsys):
    """On CPU the fp16 choice is stood in for by an enabled GradScaler: its empty saved state used to fail with
    "The source state dict is empty"."""
    real = speedups.speed

    def fp16_scaler(s, device):
        speed = real(s, device)
        speed.scaler = torch.amp.GradScaler("cpu", enabled=True)
        return speed

    monkeypatch.setattr(speedups, "speed", fp16_scaler)
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    train.main(["--out", str(out), "--resume", "--extend", "--epochs", "3", "--milestones", "1"])
    assert "was trained without fp16 loss scaling; its fp16 GradScaler starts fresh" in capsys.readouterr().out
    assert torch.load(out / "last.pt", weights_only=True)["scaler"]  # the new scaler's state is saved


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_removed_from_plain_state_dicts(prefix, tmp_path):
    """nn.DataParallel / DistributedDataParallel add "module.", torch.compile "_orig_mod."."""
    net = ResNet("resnet18", CLASSES, WIDTH)
    path = tmp_path / "wrapped.pt"
    torch.save({prefix + k: v for k, v in net.state_dict().items()}, path)
    ckpt = checkpoints.read_checkpoint(path)
    assert list(ckpt) == list(net.state_dict())
    model, _, meta = checkpoints.model_from_checkpoint(ckpt, str(path))
    assert (meta["arch"], meta["width"]) == ("resnet18", WIDTH)
    torch.save({"features.0.weight": torch.ones(1)}, path)
    with pytest.raises(errors.UserError, match="its first key is 'features.0.weight'"):
        checkpoints.model_from_checkpoint(checkpoints.read_checkpoint(path), str(path))


@slow
def test_eval_refuses_a_dataset_with_other_class_names(run_dir, tmp_path):
    with np.load(json.loads((run_dir / "summary.json").read_text())["args"]["dataset"]) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["class_names"] = np.array([f"other{k}" for k in range(10)])
    np.savez(tmp_path / "other.npz", **arrays)
    trained = "airplane" if SHARED_NPZ.exists() else "class0"
    with pytest.raises(errors.UserError, match=rf"was trained on other classes than .*other.npz holds \(class 0: "
                                               rf"'{trained}' in training, 'other0' here\)"):
        evaluation.main([str(run_dir / "deploy.pt"), "--dataset", str(tmp_path / "other.npz")])


@slow
def test_eval_of_a_run_folder_evaluates_its_deploy_pt(run_dir, capsys):
    evaluation.main([str(run_dir), "--json"])
    report_ = json.loads(capsys.readouterr().out)
    assert report_["checkpoint"] == str(run_dir / "deploy.pt")
    assert report_["heads"]["backbone"] == metric_lines(run_dir)[-1]["test"]["backbone"]


def test_a_class_held_out_whole_for_validation_is_named(capsys):
    """Two of three images held out: class 1's share of 2 rounds up to its one image."""
    dataset = argparse.Namespace(kind="tensors", y_train=torch.tensor([0, 0, 1]), x_train=torch.zeros(3, 3, 2, 2))
    data.hold_out(dataset, 2, seed=0)
    assert dataset.y_val.tolist() == [0, 1] and dataset.y_train.tolist() == [0]
    assert "holds out every training image of class 1: it will not be learned" in capsys.readouterr().err


@pytest.mark.parametrize("labels, test_labels, refused, named", [
    ([0, 3, 7, 12, 40], None, True, "36 of the 41 classes 0..40 have no training image (labels 0, 3, 7, 12, 40)"),
    ([0, 2, 3, 4, 5], None, False, "note: {path}: class 1 of 6 has no training image"),
    ([1, 2, 3, 4, 5], None, True, "y_train runs 1..5 with no 0: labels look 1-based; subtract 1"),
    ([0, 2, 3, 4, 5], [0, 1, 2], True, "y_test holds label 1, a class with no training image"),
])
def test_labels_with_gaps_are_named_or_refused(labels, test_labels, refused, named, tmp_path, capsys):
    """A few empty classes are named; many, labels that look 1-based (training labels 1..N, test labels 0..N-1
    would score nothing), or test labels of a class without training images are refused."""
    path = tmp_path / "gaps.npz"
    y = np.array(labels * 4)
    y_test = np.array(test_labels or labels[:2])
    np.savez(path, x_train=np.zeros((len(y), 8, 8, 3), np.uint8), y_train=y,
             x_test=np.zeros((len(y_test), 8, 8, 3), np.uint8), y_test=y_test)
    if refused:
        with pytest.raises(errors.UserError, match=re.escape(named)):
            data.load_npz(str(path))
    else:
        data.load_npz(str(path))
        assert named.format(path=path) in capsys.readouterr().err


@pytest.mark.parametrize("device, message", [("cuda", "PyTorch sees no CUDA GPU on this machine"),
                                             ("gpu", "not a device PyTorch knows")])
def test_an_unusable_device_is_one_line(device, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(errors.UserError, match=message):
        runtime.pick_device(device)


def test_summary_json_has_null_for_nan(tmp_path):
    path = tmp_path / "summary.json"
    checkpoints.write_json_atomic({"nll": float("nan"), "heads": [float("inf"), 1.5]}, str(path))
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"not JSON: {c}")) == {
        "nll": None, "heads": [None, 1.5]}


def test_ctrl_c_line_starts_below_the_live_progress_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    runtime.interrupted(cli.parse_args(["--out", str(tmp_path)]), [])
    assert capsys.readouterr().err.startswith("\ninterrupted before the first epoch ended")


@slow
def test_the_figure_of_a_short_run_has_whole_epochs_and_markers(run_dir, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    figures.plot_runs([run_dir], str(tmp_path / "f.png"))
    for ax in drawn[0].axes:
        assert all(float(t).is_integer() for t in ax.get_xticks())
        assert all(line.get_marker() == "o" for line in ax.get_lines())


@slow
def test_an_image_folder_is_a_dataset_of_its_own(image_folder, tmp_path, capsys):
    """--dataset FOLDER --setting imagenet: its name in the run files, its images at their own size (40 px),
    streamed through the ImageNet recipe, workers at most the cores."""
    out = tmp_path / "run"
    train.main(["--dataset", str(image_folder), "--width", "4", "--epochs", "1", "--batch-size", "8", "--workers",
                "999", "--setting", "imagenet", "--out", str(out)])
    header = capsys.readouterr().out.splitlines()[0]
    assert f"on {image_folder.name} (imagenet setting, 40 px; 24 train, 12 test, 3 classes)" in header
    meta = torch.load(out / "deploy.pt", weights_only=True)["meta"]
    assert (meta["image_size"], meta["image_pipeline"], meta["stem"]) == (40, "folder", "imagenet")
    assert data.load_dataset(str(image_folder), workers=999).workers <= os.cpu_count()


@slow
def test_a_folder_of_small_images_trains_as_its_npz_does(tiny_npz, tmp_path, capsys):
    """The recipe follows the images, not the file format: the .npz written as a folder trains with the CIFAR
    setting on the same pixels (read once into tensors), and --setting chooses either recipe for any dataset."""
    import npz_to_imagefolder

    npz_to_imagefolder.main([tiny_npz, str(tmp_path / "folder")])
    s = settings_of(["--dataset", str(tmp_path / "folder")])
    assert (s.setting, s.batch_size, s.hp["alpha"], s.schedule) == ("cifar", 64, 0.4, "step")
    assert settings_of(["--dataset", tiny_npz, "--setting", "imagenet"]).setting == "imagenet"
    folder, npz = data.load_dataset(str(tmp_path / "folder"), in_memory=True), data.load_dataset(tiny_npz)
    flat = lambda x: np.sort(x.reshape(len(x), -1).numpy(), axis=0)
    assert np.array_equal(flat(folder.x_train), flat(npz.x_train)) and np.array_equal(flat(folder.x_test),
                                                                                     flat(npz.x_test))
    assert torch.equal(folder.y_train.bincount(), npz.y_train.bincount())
    train.main(["--dataset", str(tmp_path / "folder"), "--width", "4", "--epochs", "1", "--batch-size", "32",
                "--out", str(tmp_path / "run")])
    assert "on folder (cifar setting, 32 px; 256 train" in capsys.readouterr().out
    meta = torch.load(tmp_path / "run" / "deploy.pt", weights_only=True)["meta"]
    assert (meta["stem"], meta["image_pipeline"]) == ("cifar", "tensors")
    evaluation.main([str(tmp_path / "run" / "deploy.pt")])  # evaluated on the folder as it trained


@slow
def test_a_folder_of_small_images_and_the_npz_of_its_pixels_in_its_order_train_bitwise_alike(tiny_npz, tmp_path):
    """Reading a folder draws nothing from torch's global generator (it did, so that the network started from
    other weights: loss 28.1497 against 28.0351), so the folder and the .npz of the same pixels in the folder's
    order, with its class names, train to the same deploy.pt."""
    import folders
    import npz_to_imagefolder

    npz_to_imagefolder.main([tiny_npz, str(tmp_path / "folder")])
    arrays = folders.read_folder(str(tmp_path / "folder"), None, 0)
    np.savez(tmp_path / "same.npz", **arrays)
    for dataset, out in ((tmp_path / "folder", "from-folder"), (tmp_path / "same.npz", "from-npz")):
        tiny_run(str(dataset), tmp_path / out, "--epochs", "1", "--seed", "3")
    a, b = (torch.load(tmp_path / out / "deploy.pt", weights_only=True)["backbone"]
            for out in ("from-folder", "from-npz"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metric_lines(tmp_path / "from-folder")[0]["loss"] == metric_lines(tmp_path / "from-npz")[0]["loss"]


@slow
@pytest.mark.parametrize("split", ["train", "val"])
def test_an_unreadable_image_in_a_folder_is_one_line_naming_it(image_folder, tmp_path, split):
    """Truncated files in train/ (or val/) end the run with one line that names every one of them with its reason
    (two here; one alone is "it"), in name order."""
    folder = tmp_path / "folder"
    shutil.copytree(image_folder, folder)
    bad = [folder / split / "class1" / "3.png", folder / split / "class2" / "1.png"]
    for path in bad:
        path.write_bytes(path.read_bytes()[:100])
    files = 24 if split == "train" else 12
    for extra in (["--setting", "imagenet", "--workers", "1"], []):  # streamed by workers, or read into memory
        out = tmp_path / f"run{len(extra)}"
        with pytest.raises(errors.UserError) as e:
            train.main(["--dataset", str(folder), "--width", "4", "--epochs", "1", "--batch-size", "8", "--out",
                        str(out), *extra])
        message = str(e.value)
        assert re.fullmatch(rf"cannot read 2 of the {files} image files in {re.escape(str(folder / split))}: "
                            rf"{re.escape(str(bad[0]))} \(OSError: [^)]*\), {re.escape(str(bad[1]))} \(OSError: "
                            rf"[^)]*\): remove or replace them", message), message
        assert not (out / "last.pt").exists()
        assert not multiprocessing.active_children(), "the error kept the DataLoader's workers alive"
    bad[1].write_bytes((image_folder / split / "class2" / "1.png").read_bytes())  # one left: named, "it"
    with pytest.raises(errors.UserError, match=rf"^cannot read 1 of the {files} image files in .*3\.png \(OSError: "
                                               rf".*\): remove or replace it$"):
        train.main(["--dataset", str(folder), "--width", "4", "--epochs", "1", "--batch-size", "8", "--out",
                    str(tmp_path / "one")])


@slow
def test_truncated_checkpoint_is_reported(kept_run, tiny_npz):
    broken = kept_run / "broken.pt"
    broken.write_bytes((kept_run / "last.pt").read_bytes()[:5000])
    with pytest.raises(errors.UserError, match="truncated, corrupt or not a PyTorch checkpoint"):
        evaluation.main([str(broken)])
    with pytest.raises(errors.UserError, match="truncated, corrupt"):
        tiny_run(tiny_npz, kept_run.parent / "fresh", "--epochs", "1", "--init-from", str(broken))


@slow
def test_init_from_checkpoint_of_another_width_is_refused(kept_run, tiny_npz, tmp_path):
    with pytest.raises(errors.UserError, match="does not fit the model.*another arch, width or class count"):
        train.main(["--dataset", tiny_npz, "--width", "8", "--epochs", "1", "--out", str(tmp_path / "w8"),
                    "--init-from", str(kept_run / "last.pt")])


@slow
def test_unwritable_output_folder_is_reported(tiny_npz, tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(errors.UserError, match="cannot write to output folder"):
        tiny_run(tiny_npz, tmp_path / "a-file" / "run", "--epochs", "1")


@slow
def test_cli_errors_are_one_line_without_traceback(tmp_path):
    missing = subprocess.run([sys.executable, str(HERE / "train.py"), "--dataset", str(tmp_path / "none.npz")],
                             capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [f"error: dataset file {tmp_path / 'none.npz'} does not exist"]
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    junk = subprocess.run([sys.executable, str(HERE / "eval.py"), str(tmp_path / "junk.pt")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert junk.returncode == 1 and len(junk.stderr.strip().splitlines()) == 1
    assert "Traceback" not in junk.stderr and "cannot read checkpoint" in junk.stderr


def test_a_folder_whose_first_image_cannot_be_read_or_that_holds_none_is_one_line(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(errors.UserError, match="holds no images in class folders"):
        cli.parse_args(["--dataset", str(tmp_path / "empty")])
    (tmp_path / "bad" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "bad" / "train" / "cat" / "0.jpg").write_bytes(b"\xff\xd8\xff not a whole jpeg")
    with pytest.raises(errors.UserError, match="cannot read the image .*0.jpg"):
        cli.parse_args(["--dataset", str(tmp_path / "bad")])


def test_milestones_are_refused_when_resuming_a_cosine_run(tmp_path):
    torch.save({"args": {"schedule": "cosine", "epochs": 4, "dataset": "imagenet", "method": "mixskd"}, "epoch": 3,
                "optimizer": {"param_groups": [{"lr": 0.1}]}}, tmp_path / "last.pt")
    argv = ["--out", str(tmp_path), "--resume", "--extend", "--epochs", "6", "--milestones", "5"]
    with pytest.raises(errors.UserError, match="follows the cosine schedule, which has no decays"):
        cli.resume_arguments(cli.parse_args(argv), argv)


def test_the_cifar_setting_reads_only_small_images_into_memory(image_folder, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--dataset", "imagenet", "--setting", "cifar"])
    assert "--setting cifar reads the images into memory, and these are 224 px" in capsys.readouterr().err
    assert settings_of(["--dataset", "imagenet", "--setting", "cifar", "--image-size", "32"]).setting == "cifar"
    assert settings_of(["--dataset", str(image_folder), "--image-size", "96"]).setting == "imagenet"


@slow
def test_resume_of_a_finished_run_changes_nothing(run_dir, tiny_npz, tmp_path, capsys):
    run = shutil.copytree(run_dir, tmp_path / "run")
    files = {p.name: p.read_bytes() for p in run.iterdir()}
    tiny_run(tiny_npz, run, "--epochs", "2", "--resume")
    assert "is complete (2 of 2 epochs): nothing to do, no file changed" in capsys.readouterr().out
    old = json.loads(files["summary.json"])  # as written before summary.json counted epochs from 1
    old.pop("best_epoch_chosen_on")
    (run / "summary.json").write_text(json.dumps({**old, "final_epoch": old["final_epoch"] - 1}))
    tiny_run(tiny_npz, run, "--epochs", "2", "--resume")
    assert "is complete (2 of 2 epochs)" in capsys.readouterr().out
    (run / "summary.json").write_bytes(files["summary.json"])
    with pytest.raises(errors.UserError, match=r"--epochs 3 \(the run: 2\); --epochs may change with --extend"):
        tiny_run(tiny_npz, run, "--epochs", "3", "--resume")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == files
    tiny_run(tiny_npz, run, "--epochs", "3", "--resume", "--extend")  # asked for explicitly
    assert [r["epoch"] for r in metric_lines(run)] == [0, 1, 2]
    # an extension stopped before its summary: the old summary.json must not make it look complete
    (run / "summary.json").write_bytes(files["summary.json"])
    with pytest.raises(errors.UserError, match=r"--epochs 2 \(the run: 3\)"):
        tiny_run(tiny_npz, run, "--epochs", "2", "--resume")
    with pytest.raises(errors.UserError, match="--extend continues a run: pass it together with --resume"):
        tiny_run(tiny_npz, tmp_path / "new", "--epochs", "2", "--extend")


@slow
def test_a_run_started_without_epochs_resumes_to_its_own(run_dir, tmp_path, capsys):
    """--epochs left out (the recipe's length) is in the run's settings, not its arguments: --resume alone of the
    finished run says it is complete, and --extend asks for the new length."""
    run = shutil.copytree(run_dir, tmp_path / "run")
    for name in ("last.pt", "summary.json"):  # as if the run had been started without --epochs
        if name.endswith(".pt"):
            ckpt = torch.load(run / name, weights_only=True)
            ckpt["args"].pop("epochs")
            torch.save(ckpt, run / name)
        else:
            summary = json.loads((run / name).read_text())
            summary["args"].pop("epochs")
            (run / name).write_text(json.dumps(summary))
    train.main(["--out", str(run), "--resume"])
    assert "is complete (2 of 2 epochs): nothing to do" in capsys.readouterr().out
    with pytest.raises(errors.UserError, match=r"--extend continues .* give the new one with --epochs N \(the run "
                                               r"has 2\)"):
        train.main(["--out", str(run), "--resume", "--extend"])


@slow
def test_failed_start_leaves_no_folder_behind(tiny_npz, tmp_path):
    with pytest.raises(errors.UserError, match="does not exist"):
        tiny_run(tiny_npz, tmp_path / "new", "--epochs", "1", "--init-from", str(tmp_path / "missing.pt"))
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()  # a folder the user made: kept as it was
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(errors.UserError, match="non-finite loss"):
        tiny_run(tiny_npz, tmp_path / "mine", "--epochs", "1", "--lr", "1e30", "--log-every", "1")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    (tmp_path / "mine" / "metrics.jsonl").write_text('{"epoch": 0}\n')  # an old run's log, no last.pt
    with pytest.raises(errors.UserError, match="non-finite loss from step 2/"):
        tiny_run(tiny_npz, tmp_path / "mine", "--epochs", "1", "--lr", "1e30", "--log-every", "1")
    assert (tmp_path / "mine" / "metrics.jsonl").read_text() == '{"epoch": 0}\n'


@slow
def test_ctrl_c_prints_one_line_with_the_resume_command(tiny_npz, tmp_path):
    import signal
    import time

    out = tmp_path / "run"  # the recipe's 205 epochs, the default: the line reads them from last.pt
    argv = ["--dataset", tiny_npz, "--width", "4", "--batch-size", "32", "--compile", "off", "--out", str(out)]
    process = subprocess.Popen([sys.executable, str(HERE / "train.py"), *argv], cwd=tmp_path, text=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "last.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    line, = stderr.strip().splitlines()
    assert line.startswith("interrupted after ") and f" of 205 epochs: {out / 'last.pt'} holds them;" in line
    command = shlex.split(line.split("resume with: ")[1])
    assert command == [sys.executable, str(HERE / "train.py"), *argv, "--resume"]
    assert cli.parse_args(command[2:]).resume  # and the script as given works from where the run started


@slow
def test_experiments_give_each_job_its_share_of_the_cores(tmp_path):
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\necho "$OMP_NUM_THREADS" >> {tmp_path}/threads\n')
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(PYTHON=str(stub), JOBS="2", SEEDS="0", METHODS="ce mixup", RUNS=str(tmp_path / "runs"),
               DATA=str(stub))  # any file: the stub trains nothing
    subprocess.run(["bash", str(HERE / "experiments.sh")], env=env, check=True, capture_output=True, timeout=60)
    expected = str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert (tmp_path / "threads").read_text().split() == [expected] * 4  # two runs, the table, the figure


@slow
def test_experiments_resume_a_run_and_keep_its_log(tmp_path):
    """An interrupted run (last.pt, no summary.json) is resumed and its log goes on after the first part; a run
    that starts afresh gets a log of its own; a finished run (summary.json) is not started."""
    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\necho "ran: $*"\n')
    stub.chmod(0o755)
    runs = tmp_path / "runs"
    for name in ("ce-seed0", "mixup-seed0", "cutmix-seed0"):
        (runs / name).mkdir(parents=True)
        (runs / f"{name}.log").write_text(f"{name}, first part\n")
    (runs / "ce-seed0" / "last.pt").write_bytes(b"")
    (runs / "cutmix-seed0" / "summary.json").write_text("{}")
    env = {**os.environ, "PYTHON": str(stub), "SEEDS": "0", "METHODS": "ce mixup cutmix", "RUNS": str(runs),
           "DATA": str(stub)}
    subprocess.run(["bash", str(HERE / "experiments.sh")], env=env, check=True, capture_output=True, timeout=60)
    first, resumed = (runs / "ce-seed0.log").read_text().splitlines()
    assert first == "ce-seed0, first part" and resumed.startswith("ran: train.py ") and resumed.endswith(" --resume")
    fresh, = (runs / "mixup-seed0.log").read_text().splitlines()
    assert fresh.startswith("ran: train.py ") and "--resume" not in fresh
    assert (runs / "cutmix-seed0.log").read_text() == "cutmix-seed0, first part\n"


