"""Whole runs (slow): train.py writes every output, eval.py reproduces its numbers, resume is exact, predictions,
image folders, bench.py."""
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import bench
import checkpoints
import cli
import data
import errors
import eval as evaluation
import report
import speedups
import train
from conftest import HAS_TENSORBOARD, HERE, TENSORBOARD, metric_lines, readme_block, tiny_run
from losses import TERMS, discriminators
from model import MixSKDNet, ResNet
from self_teacher import SelfTeacher
from settings import flags_of

slow = pytest.mark.slow  # whole runs and subprocesses
# outside the method's checklist, every test here: `pytest -m "not slow"` (the checklist) leaves the file out
pytestmark = slow


# ------------------------- Command line and whole runs, marked slow: pytest -m 'not slow' skips them


# --------------------------- Whole runs (slow): train.py writes, eval.py reproduces, resume is exact


def without_timing(record):
    return {k: v for k, v in record.items() if k not in ("epoch_time", "img_per_s")}


@slow
def test_two_epoch_run_writes_every_output(run_dir):
    assert {"metrics.jsonl", "last.pt", "best.pt", "deploy.pt", "summary.json"} <= set(os.listdir(run_dir))
    lines = metric_lines(run_dir)
    assert [r["epoch"] for r in lines] == [0, 1]
    assert set(lines[-1]["loss"]) == {"total", *TERMS}
    assert list(lines[-1]["test"]) == ["backbone", "branch1", "branch2", "branch3", "self_teacher"]
    assert {"top1", "top5", "nll", "ece"} == set(lines[-1]["test"]["backbone"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["headline_final_backbone_top1"] == lines[-1]["test"]["backbone"]["top1"]
    assert summary["released_code_metric"] == max(
        m["top1"] for r in lines for h, m in r["test"].items() if h != "self_teacher")
    assert summary["deployed_params"] < summary["trained_params"]
    for name in ("last.pt", "best.pt", "deploy.pt"):
        torch.load(run_dir / name, weights_only=True)


@slow
def test_readme_deploy_script_runs_beside_model_py_and_deploy_pt(run_dir, tmp_path):
    """As the README says: in a folder holding the run's deploy.pt and a copy of model.py, nothing else."""
    meta = torch.load(run_dir / "deploy.pt", weights_only=True)["meta"]
    assert meta["image_size"] == 32 and len(meta["class_names"]) == 10  # what the run trained on
    shutil.copy(run_dir / "deploy.pt", tmp_path)
    shutil.copy(HERE / "model.py", tmp_path)
    (tmp_path / "deploy_snippet.py").write_text(readme_block("(the tests do exactly that)"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "deploy_snippet.py"], cwd=tmp_path, capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    predicted = ast.literal_eval(result.stdout.strip())
    assert len(predicted) == 2 and all(name in meta["class_names"] for name in predicted)


@slow
def test_deploy_checkpoint_loads_with_backbone_class_alone(run_dir, tiny_npz):
    ckpt = torch.load(run_dir / "deploy.pt", weights_only=True)
    meta = ckpt["meta"]
    net = ResNet(meta["arch"], meta["num_classes"], meta["width"], meta["stem_relu"])
    net.load_state_dict(ckpt["backbone"])
    d = data.load_dataset(tiny_npz)
    d.stats = data.pixel_stats(meta["mean"], meta["std"], "cpu")
    metrics = evaluation.evaluate(net, None, d)
    assert metrics["backbone"]["top1"] == metric_lines(run_dir)[-1]["test"]["backbone"]["top1"]


@slow
def test_eval_reproduces_logged_test_metrics_exactly(run_dir, capsys):
    evaluation.main([str(run_dir / "last.pt"), "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["heads"] == metric_lines(run_dir)[-1]["test"]


@slow
def test_eval_prints_backbone_row_first(run_dir, capsys):
    evaluation.main([str(run_dir / "last.pt")])
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].split() == ["head", "top-1", "top-5", "NLL", "ECE"]
    assert rows[2].startswith("backbone")


@slow
def test_validation_split_chooses_best_pt_and_the_test_set_chooses_nothing(run_dir):
    records = metric_lines(run_dir)
    assert all(list(r["val"]) == list(r["test"]) for r in records)  # every head on both splits
    assert all((r["val"]["backbone"]["top1"] * 64 / 100).is_integer() for r in records)  # of 64 images
    val_top1 = [r["val"]["backbone"]["top1"] for r in records]
    best_epoch = val_top1.index(max(val_top1))
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert best["epoch"] == best_epoch and best["best"] == {"epoch": best_epoch, "top1": max(val_top1), "split": "val"}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["best_epoch_chosen_on"], summary["best_backbone_epoch"]) == ("val", best_epoch + 1)  # from 1
    assert summary["best_backbone_top1"] == records[best_epoch]["test"]["backbone"]["top1"]
    assert summary["final_val"] == records[-1]["val"] and summary["args"]["val_split"] == 64
    assert "| best-epoch backbone top-1 (epoch chosen on val) |" in report.results_table([str(run_dir)])


@slow
def test_tensorboard_holds_every_number_of_metrics_jsonl(run_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    records = metric_lines(run_dir)
    heads = ["backbone", "branch1", "branch2", "branch3", "self_teacher"]
    expected = {"lr", "train_top1", "epoch_time", "img_per_s", *(f"loss/{term}" for term in ("total", *TERMS)),
                *(f"{split}/{head}/{m}" for split in ("val", "test") for head in heads for m in ("top1", "top5", "nll",
                                                                                                 "ece"))}
    assert set(events.Tags()["scalars"]) == expected
    for tag in expected:
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == [r["epoch"] + 1 for r in records]
        for event, record in zip(logged, records):
            value = record
            for key in tag.split("/"):
                value = value[key]
            assert event.value == pytest.approx(value, rel=1e-6), tag  # TensorBoard keeps float32


def tensorboard_threads():
    """How many TensorBoard event writers (one thread each) are running in this process."""
    return sum("tensorboard" in type(t).__module__ for t in threading.enumerate())


@slow
def test_a_run_keeps_its_arguments_as_given_and_its_settings_apart(run_dir, tiny_npz):
    """args: the command line as parsed, nothing written into it later; settings: what the run trained with,
    resolved once (the warmup, the clip, the milestones, the method's hyperparameters...). Both are in args.json from
    the start, in last.pt and in summary.json."""
    argv = ["--dataset", tiny_npz, "--width", "4", "--batch-size", "32", "--warmup-epochs", "1", "--milestones", "1",
            "--out", str(run_dir), "--epochs", "2", "--val-split", "64", *TENSORBOARD]
    given = json.loads(json.dumps(vars(cli.parse_args(argv))))
    started = json.loads((run_dir / "args.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert started["args"] == summary["args"] == given == json.loads(json.dumps(last["args"]))
    assert "alpha" not in given and "temperature" not in given and "warmup_iterations" not in given
    settings = started["settings"]
    assert settings == summary["settings"] == last["settings"]
    assert (settings["steps_per_epoch"], settings["warmup_iterations"], settings["clip"], settings["milestones"]) == (
        6, 6, 2.0, [1])  # 192 images in batches of 32; one warmup epoch; a MixSKD run too short for the floor clips
    assert settings["hp"] == {"recipe": "paper", "mix": "mixup", "alpha": 0.4, "temperature": 3.0,
                              **{f"w_{t}": 1.0 for t in TERMS}}
    assert started["git_revision"] is None or len(started["git_revision"]) == 40


@slow
def test_a_run_saved_before_settings_existed_resumes_as_a_new_one_does(tiny_npz, tmp_path):
    """last.pt of an older revision held every value in its arguments (warmup and clip resolved, and the flags of
    every method, read or not) and no settings: it resumes, and --extend continues it, bitwise as a new one."""
    tiny_run(tiny_npz, tmp_path / "new", "--epochs", "1", "--method", "ce")
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    ckpt = torch.load(tmp_path / "old" / "last.pt", weights_only=True)
    s = ckpt.pop("settings")
    legacy = {**ckpt["args"], **flags_of(s), "stem": s["setting"], "recipe": "paper", "mix": "mixup", "alpha": 0.4,
              "temperature": None, **{f"w_{t}": 1.0 for t in TERMS}}
    for key in ("steps_per_epoch", "warmup_iterations", "clip", "epochs_before"):
        legacy.pop(key)
    legacy["image_size"] = ckpt["args"]["image_size"]  # as given: None
    torch.save({**ckpt, "args": legacy}, tmp_path / "old" / "last.pt")
    for run in ("new", "old"):
        train.main(["--out", str(tmp_path / run), "--resume", "--extend", "--epochs", "2"])
    new, old = (torch.load(tmp_path / run / "deploy.pt", weights_only=True)["backbone"] for run in ("new", "old"))
    assert all(torch.equal(new[k], old[k]) for k in new)
    resumed = torch.load(tmp_path / "old" / "last.pt", weights_only=True)
    assert resumed["settings"]["hp"] == {} and "alpha" not in resumed["args"]  # ce reads none of them


@slow
def test_resume_is_bitwise_exact(run_dir, tiny_npz, tmp_path, stopped_after_first_checkpoint):
    """A two-epoch run stopped by Ctrl-C after its first checkpoint, resumed with --resume alone: the same
    validation split, weights and metrics as the straight run; TensorBoard, like metrics.jsonl, drops what a
    process logged after the checkpoint it resumes."""
    writers = tensorboard_threads()
    stopped_after_first_checkpoint(tiny_run, tiny_npz, tmp_path, "--epochs", "2", "--val-split", "64", *TENSORBOARD)
    assert tensorboard_threads() == writers, "the stopped run left its TensorBoard writer running"
    if HAS_TENSORBOARD:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(tmp_path)) as stale:  # as if a process had died after logging epoch 2
            stale.add_scalar("lr", 123.0, 2)
    train.main(["--out", str(tmp_path), "--resume"])
    for name in ("last.pt", "best.pt"):
        straight = torch.load(run_dir / name, weights_only=True)
        resumed = torch.load(tmp_path / name, weights_only=True)
        assert straight["epoch"] == resumed["epoch"]
        for part in ("model", "self_teacher", "discriminators"):
            for k, v in straight[part].items():
                assert torch.equal(v, resumed[part][k]), f"{name}: {part}.{k} differs after resume"
    assert [without_timing(r) for r in metric_lines(run_dir)] == [without_timing(r) for r in metric_lines(tmp_path)]
    if not HAS_TENSORBOARD:
        return
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("lr")] == [(r["epoch"] + 1, pytest.approx(r["lr"]))
                                                                 for r in metric_lines(run_dir)]


@pytest.fixture(scope="module")
def image_dir(tiny_npz, tmp_path_factory):
    """The tiny test set as image files: png/000.png ... (with a file that is no image, and a text file), jpeg/."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    with np.load(tiny_npz) as f:
        x_test = f["x_test"]
    (root / "png").mkdir()
    (root / "jpeg").mkdir()
    for i, x in enumerate(x_test):
        Image.fromarray(x).save(root / "png" / f"{i:03d}.png")
        Image.fromarray(x).save(root / "jpeg" / f"{i:03d}.jpg", quality=90)
    (root / "png" / "broken.png").write_bytes(b"not an image")
    (root / "png" / "notes.txt").write_text("not named as an image")
    return root


def predicted(argv, capsys):
    """eval.py --predict ... --json: its predictions."""
    evaluation.main([*argv, "--json"])
    return json.loads(capsys.readouterr().out)["predictions"]


def backbone_logits(checkpoint, dataset):
    """The backbone's logits on a dataset's test images as eval.py computes them."""
    model, _, meta = checkpoints.model_from_checkpoint(torch.load(checkpoint, weights_only=True), str(checkpoint))
    d = data.load_dataset(dataset, image_size=meta["image_size"], workers=0)
    d.stats = data.pixel_stats(meta["mean"], meta["std"], "cpu")
    return evaluation.head_logits(model, None, d)[0]["backbone"]


class ReplayOnCPU(speedups.StepGraph):
    """speedups.StepGraph's contract where no CUDA graph exists: its warmup steps run eagerly, its capture records
    the step and runs nothing, and each replay runs the step on the graph's own input tensors and writes its results
    into the same output tensors every time (StepGraph itself refuses an lr tensor replaced meanwhile)."""

    def __call__(self, update, inputs, opt):
        self.opt = opt
        return super().__call__(update, inputs, opt)

    def eager(self, update, inputs):
        assert all(torch.is_tensor(g["lr"]) for g in self.opt.param_groups), "the eager steps read another lr"
        return update(*inputs)

    def capture(self, update, inputs):
        self.outputs, self.replays = None, 0
        return SimpleNamespace(replay=lambda: self.replay(update)), None

    def replay(self, update):
        outputs, self.replays = update(*self.inputs), self.replays + 1
        if self.outputs is None:
            self.outputs = outputs
        for kept, new in zip(torch.utils._pytree.tree_leaves(self.outputs), torch.utils._pytree.tree_leaves(outputs)):
            kept.copy_(new)


@slow
@pytest.mark.parametrize("method", ["mixskd", "ps-kd"])
def test_a_run_whose_step_is_replayed_as_one_graph_trains_bitwise_as_the_eager_one(method, tiny_npz, tmp_path,
                                                                                     monkeypatch):
    """--compile step-graph replays forward, backward and SGD from the graph's own tensors, the lr a tensor filled
    each step (the warmup's per-step lr, the decay): on a CPU, with the replay played by ReplayOnCPU, the run's
    losses, test numbers, weights and checkpoint are bitwise the eager run's, PS-KD's store included."""
    flags = ["--epochs", "2", "--method", method, "--amp", "off", "--compile", "off"]
    tiny_run(tiny_npz, tmp_path / "eager", *flags)
    graphs, speed = [], speedups.speed
    monkeypatch.setattr(speedups, "speed", lambda s, device: SimpleNamespace(
        **{**vars(speed(s, device)), "step_graph": graphs.append(ReplayOnCPU(warmup=2)) or graphs[-1]}))
    tiny_run(tiny_npz, tmp_path / "graph", *flags)
    steps = 2 * settings_of_run(tmp_path / "graph")["steps_per_epoch"]
    assert len(graphs) == 1 and graphs[0].calls == steps and graphs[0].replays == steps - 2
    drop_times = lambda run: [{k: v for k, v in r.items() if k not in ("epoch_time", "img_per_s")}
                              for r in metric_lines(run)]
    assert drop_times(tmp_path / "graph") == drop_times(tmp_path / "eager")
    eager, graph = (checkpoints.read_checkpoint(tmp_path / run / "last.pt") for run in ("eager", "graph"))
    for part in ("model", "self_teacher", "discriminators"):
        for k, v in (eager[part] or {}).items():
            assert torch.equal(v, graph[part][k]), f"{part}.{k}"
    (group,), (graph_group,) = eager["optimizer"]["param_groups"], graph["optimizer"]["param_groups"]
    lr, graph_lr = group.pop("lr"), graph_group.pop("lr")
    assert type(graph_lr) is float and graph_lr == pytest.approx(lr, rel=1e-7) and lr == pytest.approx(0.01)
    assert group == graph_group
    if method == "ps-kd":
        assert torch.equal(eager["ps_kd_store"], graph["ps_kd_store"])


def settings_of_run(run):
    return json.loads((run / "args.json").read_text())["settings"]


@slow
def test_predict_on_png_files_gives_the_top1_of_eval(run_dir, image_dir, tiny_npz, capsys):
    """deploy.pt --predict on the test images written as PNG (lossless): the same class per image as
    eval.py's network on the .npz, so the same top-1; a file that is no image gets one line, the rest go on."""
    deploy = run_dir / "deploy.pt"
    predictions = predicted([str(deploy), "--predict", str(image_dir / "png"), "--top-k", "3"], capsys)
    assert [Path(p["image"]).name for p in predictions] == [f"{i:03d}.png" for i in range(128)] + ["broken.png"]
    assert "UnidentifiedImageError" in predictions[-1]["error"]
    top = [p["top"] for p in predictions[:-1]]
    logits = backbone_logits(deploy, tiny_npz)
    assert [t[0]["index"] for t in top] == logits.argmax(1).tolist()
    assert [t[0]["probability"] for t in top] == pytest.approx(logits.softmax(1).max(1).values.tolist(), rel=1e-5)
    assert all(len(t) == 3 and t[0]["probability"] >= t[1]["probability"] >= t[2]["probability"] for t in top)
    with np.load(tiny_npz) as f:
        top1 = 100.0 * sum(t[0]["index"] == y for t, y in zip(top, f["y_test"])) / 128
    assert top1 == metric_lines(run_dir)[-1]["test"]["backbone"]["top1"]
    evaluation.main([str(deploy), "--predict", str(image_dir / "png")])
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 128 and out.splitlines()[0].startswith(f"{image_dir / 'png' / '000.png'}: ")
    assert len(err.splitlines()) == 1 and "broken.png: cannot read it as an image" in err


@slow
def test_predict_on_jpeg_files_gives_the_top1_of_eval_on_their_pixels(run_dir, image_dir, tiny_npz, tmp_path, capsys):
    """JPEG is lossy: its files hold other pixels than the .npz, so what must agree is eval.py on the pixels
    decoded from them (written to an .npz): the same class per image and the same top-1."""
    from PIL import Image

    decoded = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted((image_dir / "jpeg").iterdir())])
    with np.load(tiny_npz) as f:
        arrays = {k: f[k] for k in f.files}
    assert not np.array_equal(decoded, arrays["x_test"])  # lossy indeed
    arrays["x_test"] = decoded
    np.savez(tmp_path / "decoded.npz", **arrays)
    deploy = run_dir / "deploy.pt"
    top = [p["top"][0]["index"] for p in predicted([str(deploy), "--predict", str(image_dir / "jpeg")], capsys)]
    assert top == backbone_logits(deploy, str(tmp_path / "decoded.npz")).argmax(1).tolist()
    evaluation.main([str(deploy), "--dataset", str(tmp_path / "decoded.npz"), "--json"])
    expected = json.loads(capsys.readouterr().out)["heads"]["backbone"]["top1"]
    assert 100.0 * sum(k == y for k, y in zip(top, arrays["y_test"])) / 128 == expected


@slow
def test_eval_per_class_gives_top1_per_class_and_the_confusion_matrix(run_dir, tiny_npz, capsys):
    evaluation.main([str(run_dir / "deploy.pt"), "--per-class", "--json"])
    printed = json.loads(capsys.readouterr().out)
    classes, confusion = printed["per_class"], np.array(printed["per_class"]["confusion"])
    assert classes["class_names"] == torch.load(run_dir / "deploy.pt", weights_only=True)["meta"]["class_names"]
    with np.load(tiny_npz) as f:
        assert classes["images"] == confusion.sum(1).tolist() == np.bincount(f["y_test"], minlength=10).tolist()
    assert 100.0 * np.trace(confusion) / 128 == printed["heads"]["backbone"]["top1"]
    evaluation.main([str(run_dir / "deploy.pt"), "--per-class"])
    out = capsys.readouterr().out
    assert "confusion matrix of the backbone" in out and all(name[:14] in out for name in classes["class_names"])


@slow
@pytest.mark.parametrize("method", ["ce", "mixup", "cutmix"])
def test_baselines_train_the_backbone_alone(method, tiny_npz, tmp_path, capsys):
    tiny_run(tiny_npz, tmp_path, "--epochs", "1", "--method", method)
    alpha = {"ce": None, "mixup": 0.4, "cutmix": 1.0}[method]  # docs/method.md section 7, as released
    header, epoch_line = capsys.readouterr().out.splitlines()[:2]
    assert (" amp off " in header or " amp bf16 " in header) and "torch." not in header
    assert header.endswith("epochs 1..1, warmup 8 iterations, lr 0.1 in epoch 1")  # baselines are never clipped
    assert epoch_line.startswith("epoch 1/1 loss ")
    assert (f" alpha {alpha} " in header) if alpha else (" alpha " not in header)
    assert json.loads((tmp_path / "summary.json").read_text())["settings"]["hp"].get("alpha") == alpha
    assert json.loads((tmp_path / "summary.json").read_text())["best_epoch_chosen_on"] == "test"  # no --val-split
    record = metric_lines(tmp_path)[-1]
    assert list(record["test"]) == ["backbone"]
    assert set(record["loss"]) == {"total", "ce" if method == "ce" else "mix"}
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["self_teacher"] is None and "fc.weight" in ckpt["model"]


@slow
@pytest.mark.parametrize("arch, kwargs", [("torchvision:mobilenet_v3_small", {"num_classes": 10}),
                                          ("timm:test_vit", {"pretrained": False, "num_classes": 10, "img_size": 32})])
def test_library_arch_runs_from_the_command_line_and_deploys(arch, kwargs, tiny_npz, image_dir, tmp_path,
                                                               capsys):
    """deploy.pt's backbone loads strictly into the library's own class built from meta["model_kwargs"] and
    gives the logged top-1; so does eval.py deploy.pt. (timm's test_vit: a ViT of 0.3M parameters.)"""
    tiny_run(tiny_npz, tmp_path, "--epochs", "1", "--arch", arch)
    assert {"metrics.jsonl", "last.pt", "best.pt", "deploy.pt", "summary.json"} <= set(os.listdir(tmp_path))
    logged = metric_lines(tmp_path)[-1]["test"]
    assert list(logged) == ["backbone", "branch1", "branch2", "branch3", "self_teacher"]
    capsys.readouterr()
    evaluation.main([str(tmp_path / "deploy.pt"), "--json"])
    assert json.loads(capsys.readouterr().out)["heads"]["backbone"] == logged["backbone"]
    ckpt = torch.load(tmp_path / "deploy.pt", weights_only=True)
    assert ckpt["meta"]["model_kwargs"] == kwargs
    library, _, name = arch.partition(":")
    if library == "timm":
        import timm

        deployed = timm.create_model(name, **ckpt["meta"]["model_kwargs"])
    else:
        import torchvision

        deployed = torchvision.models.get_model(name, **ckpt["meta"]["model_kwargs"])
    deployed.load_state_dict(ckpt["backbone"], strict=True)
    d = data.load_dataset(tiny_npz)
    d.stats = data.pixel_stats(ckpt["meta"]["mean"], ckpt["meta"]["std"], "cpu")
    assert evaluation.evaluate(deployed, None, d)["backbone"]["top1"] == logged["backbone"]["top1"]
    top = [p["top"][0]["index"] for p in predicted([str(tmp_path / "deploy.pt"), "--predict", str(image_dir / "png")],
                                                    capsys)[:-1]]  # the last is the file that is no image
    assert top == backbone_logits(tmp_path / "deploy.pt", tiny_npz).argmax(1).tolist()


@slow
def test_official_recipe_run_has_no_stem_relu_and_frozen_teacher(tiny_npz, tmp_path):
    tiny_run(tiny_npz, tmp_path, "--epochs", "1", "--recipe", "official")
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["meta"]["stem_relu"] is False
    torch.manual_seed(0)  # train.main seeds 0, then builds network, self-teacher, discriminators in this order
    net = MixSKDNet("resnet18", 10, 4, stem_relu=False)
    channels = net.backbone.feature_channels
    fresh_teacher, fresh_discs = SelfTeacher(channels, 10), discriminators(channels)
    for fresh, key in ((fresh_teacher, "self_teacher"), (fresh_discs, "discriminators")):
        for k, v in fresh.state_dict().items():
            assert torch.equal(v, ckpt[key][k]), f"{key}.{k} moved during an official run"
    assert not torch.equal(net.state_dict()["backbone.fc.weight"], ckpt["model"]["backbone.fc.weight"])


@slow
@pytest.mark.parametrize("arch", ["resnet18", "torchvision:mobilenet_v3_small"])
def test_bench_says_when_its_estimate_is_rough(arch, capsys):
    bench.main(["--arch", arch, "--width", "4", "--batch-size", "4", "--steps", "1", "--warmup", "0",
                "--device", "cpu", "--amp", "off", "--compile", "off"])
    out = capsys.readouterr().out
    header = f"{arch} width 4, cifar stem," if arch == "resnet18" else f"{arch}, 32 px"  # width: ours only
    assert header in out and "1 timed step after 0" in out and "rough, from 1 timed step" in out


@slow
def test_bench_times_every_method_and_the_plain_way_where_there_is_one(capsys):
    bench.main(["--method", "all", "--baseline", "--width", "4", "--batch-size", "4", "--steps", "1", "--warmup", "1",
                "--device", "cpu", "--amp", "off", "--compile", "off", "--workers", "0", "--json"])
    results = json.loads(capsys.readouterr().out)["results"]
    assert [r["method"] for r in results if r["mode"] == "fast"] == list(cli.METHODS)
    assert [r["method"] for r in results if r["mode"] == "baseline"] == list(bench.PLAIN)
    assert all(("speedup" in r) == (r["method"] in bench.PLAIN) for r in results if r["mode"] == "fast")
    assert all(r["ms_per_step"] > 0 and r["first_step_s"] > 0 for r in results)


@slow
def test_bench_alternates_a_setting_in_one_process(capsys):
    """--alternate channels-last: the step with it off and on, in alternating blocks, one median each (width 16:
    fp32 in channels_last is refused below it on a CPU, test_mixskd.py)."""
    bench.main(["--width", "16", "--batch-size", "4", "--steps", "1", "--warmup", "0", "--device", "cpu",
                "--amp", "off", "--compile", "off", "--alternate", "channels-last", "--blocks", "2",
                "--method", "mixskd", "ce", "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["method"] for r in lines] == ["mixskd", "ce"] and all(r["blocks"] == 2 for r in lines)
    for r in lines:
        assert set(r["ms_per_step"]) == {"off", "on"} and r["ratio"] == r["ms_per_step"]["on"] / r["ms_per_step"]["off"]


@slow
def test_bench_profiles_the_step_by_operator_and_shape(capsys):
    """--profile N: torch.profiler's table of N steps, one row per operator and input shape, and on a CPU the
    convolutions' share of the step; with --baseline the plain way's step first, likewise; mixed with --alternate
    or --json it is refused."""
    bench.main(["--width", "4", "--batch-size", "4", "--profile", "1", "--warmup", "1", "--device", "cpu",
                "--amp", "off", "--compile", "off", "--baseline", "--workers", "0"])
    out = capsys.readouterr().out
    assert "mixskd baseline resnet18 width 4" in out and "mixskd fast resnet18 width 4" in out
    assert out.count("1 step profiled after 1") == 2
    assert "aten::convolution_backward" in out and "[[8, 32, 4, 4]" in out  # the clean and mixed halves: 8 rows
    shares = re.findall(r"per step \(profiled\): ([\d.]+) ms of operators, ([\d.]+) ms of them convolutions "
                        r"\((\d+)%\), ([\d.]+) ms the rest", out)
    assert len(shares) == 2  # the plain way's, then ours
    for total, conv, percent, rest in (map(float, s) for s in shares):
        assert 0 < conv < total and abs(conv + rest - total) < 0.2
        # the percent comes from the unrounded times, printed rounded to 0.1 ms: 31.4 of 72.2 ms is 43.5%,
        # yet 31.44 of 72.16 is 43.6% and prints 44%
        low, high = 100 * (conv - 0.05) / (total + 0.05), 100 * (conv + 0.05) / (total - 0.05)
        assert low - 0.5 <= percent <= high + 0.5
    with pytest.raises(SystemExit, match="--profile profiles the step"):
        bench.main(["--profile", "1", "--alternate", "compile", "--device", "cpu"])


@slow
def test_bench_times_processes_running_at_once_over_one_window(capsys, monkeypatch):
    """--concurrent 2: two processes, started together, each timing its step over the same window once both are
    warm; on a CPU each gets cores/2 threads (at least one); the total is the sum of the two. A process that fails
    stops the benchmark with its last line."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    tiny = ["--width", "4", "--batch-size", "2", "--warmup", "1", "--window", "0.5", "--device", "cpu",
            "--amp", "off", "--compile", "off", "--json"]
    bench.main(["--concurrent", "2", *tiny])
    (row,) = json.loads(capsys.readouterr().out)["results"]
    cores = len(os.sched_getaffinity(0))
    assert row["runs"] == 2 and row["threads_per_run"] == max(1, cores // 2) and len(row["steps_each"]) == 2
    assert all(steps >= 1 for steps in row["steps_each"])
    assert row["images_per_s"] == pytest.approx(sum(row["images_per_s_each"])) and row["ratio_to_one"] is None
    with pytest.raises(SystemExit, match="--concurrent process 1 of 1 failed: .*--width"):
        bench.main(["--concurrent", "1", *tiny[:1], "0", *tiny[2:]])  # --width 0: the process refuses it
    with pytest.raises(SystemExit, match="--concurrent times one method's step alone"):
        bench.main(["--concurrent", "2", "--baseline", "--device", "cpu"])


# ------------------------------------- ImageNet folders (slow): one epoch on a generated ImageFolder


def test_image_folder_names_keep_the_label_order_for_any_class_count(tmp_path):
    """1,001 classes: ImageFolder, which sorts the folder names, gives every image its .npz label."""
    import torchvision

    import npz_to_imagefolder

    y = np.arange(1001)
    x = np.zeros((1001, 2, 2, 3), np.uint8)
    np.savez(tmp_path / "many.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    npz_to_imagefolder.write_image_folder(str(tmp_path / "many.npz"), str(tmp_path / "folder"))
    folder = torchvision.datasets.ImageFolder(str(tmp_path / "folder" / "train"))
    assert folder.targets == [int(Path(p).stem) for p, _ in folder.samples] and folder.classes[1000] == "1000_class1000"


@slow
def test_npz_written_as_an_image_folder_keeps_images_labels_and_class_order(tiny_npz, tmp_path):
    from PIL import Image

    import npz_to_imagefolder

    npz_to_imagefolder.main([tiny_npz, str(tmp_path / "folder")])
    folder = data.load_dataset("imagenet", str(tmp_path / "folder"), image_size=32, workers=0)
    with np.load(tiny_npz) as f:
        assert (folder.n_train, folder.n_test) == (len(f["y_train"]), len(f["y_test"]))
        assert folder.class_names == [f"{k:03d}_{name}" for k, name in enumerate(f["class_names"])]
        for path, label in folder.test_set.samples[::20]:  # each PNG holds its image, unchanged, under its label
            i = int(Path(path).stem)
            assert label == f["y_test"][i] and np.array_equal(np.asarray(Image.open(path)), f["x_test"][i])
    with pytest.raises(errors.UserError, match="already exists"):
        npz_to_imagefolder.main([tiny_npz, str(tmp_path / "folder")])


@slow
def test_imagenet_folder_trains_one_epoch_and_evaluates(image_folder, tmp_path, capsys):
    """One epoch with a quarter of train/ held out for validation (val/ is the test set); eval.py reproduces
    the test metrics, and --predict on val/'s 40 x 40 files (Resize + CenterCrop to 32) gives the same classes."""
    out = tmp_path / "run"
    train.main(["--dataset", "imagenet", "--data", str(image_folder), "--image-size", "32", "--width", "4",
                "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "8", "--workers", "0", "--out", str(out),
                "--val-split", "0.25"])
    # 2 of each class's 8 held out
    assert "(imagenet setting, 32 px; 18 train, 6 validation, 12 test, 3 classes)" in capsys.readouterr().out
    record = metric_lines(out)[-1]
    assert record["epoch"] == 0
    assert list(record["test"]) == list(record["val"]) == ["backbone", "branch1", "branch2", "branch3", "self_teacher"]
    evaluation.main([str(out / "last.pt"), "--data", str(image_folder), "--workers", "0", "--json"])
    assert json.loads(capsys.readouterr().out)["heads"] == record["test"]
    assert torch.load(out / "deploy.pt", weights_only=True)["meta"]["stem"] == "imagenet"
    top = [p["top"][0]["index"] for p in predicted([str(out / "deploy.pt"), "--predict", str(image_folder / "val")],
                                                    capsys)]
    model, _, meta = checkpoints.model_from_checkpoint(torch.load(out / "deploy.pt", weights_only=True), "deploy.pt")
    folder = data.load_dataset("imagenet", str(image_folder), image_size=32, workers=0)
    assert top == evaluation.head_logits(model, None, folder)[0]["backbone"].argmax(1).tolist()


def test_imagenet_folder_missing_is_reported(tmp_path):
    with pytest.raises(errors.UserError, match="train/ and val/ in torchvision ImageFolder layout"):
        data.load_dataset("imagenet", str(tmp_path))



@pytest.mark.parametrize("method, flag, read", [("mixskd", ["--w-kd", "0"], ("w_kd", 0.0)),
                                                ("mixup", ["--alpha", "0.2"], ("alpha", 0.2)),
                                                ("cs-kd", ["--temperature", "3"], ("temperature", 3.0))])
def test_a_method_flag_its_method_reads_trains_with_it(method, flag, read, tiny_npz, tmp_path):
    tiny_run(tiny_npz, tmp_path, "--epochs", "1", "--method", method, *flag)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["settings"]["hp"][read[0]] == read[1] and summary["args"][read[0]] == read[1]
    if method == "mixskd":  # a weight of 0 removes its term from the total, and it is still logged
        record = metric_lines(tmp_path)[0]["loss"]
        assert record["total"] != pytest.approx(record["ce"] + record["mix"] + record["kd"] + record["feat"]
                                                + record["adv"])
