"""Fixtures and helpers shared by the test files: a small real dataset, a finished two-epoch run, an image folder,
settings resolved from a command line without data."""
import importlib.util
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
# real CIFAR-10 images, when present: $MIXSKD_TEST_NPZ, else the subset of docs/results.md beside the repository
SHARED_NPZ = Path(os.environ.get("MIXSKD_TEST_NPZ", HERE.parent / "shared" / "data" / "cifar10_q75_10k.npz"))
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None  # optional: its checks skip without it
TENSORBOARD = ["--tensorboard"] if HAS_TENSORBOARD else []
CPU = torch.device("cpu")


def batch(seed=0, n=4, classes=10):
    """n random 32 x 32 images and labels of `classes` classes, drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g)


def settings_of(argv, n_train=640, image_size=32, world=1):
    """settings.resolve of a train.py command line for n_train training images of image_size px, no data read."""
    import cli
    from settings import resolve

    return resolve(cli.parse_args(argv), SimpleNamespace(n_train=n_train, image_size=image_size), CPU, world)


def build(argv, classes=10, train_labels=None):
    """train.build for a command line: (settings, method, optimiser) on the CPU."""
    import train

    s = settings_of(argv)
    return (s, *train.build(s, classes, CPU, train_labels))


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory):
    """256 train and 128 test images: real CIFAR-10 (SHARED_NPZ) when present, else synthetic."""
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    if SHARED_NPZ.exists():
        with np.load(SHARED_NPZ) as f:
            arrays = {"x_train": f["x_train"][:256], "y_train": f["y_train"][:256],
                      "x_test": f["x_test"][:128], "y_test": f["y_test"][:128], "class_names": f["class_names"]}
    else:
        rng = np.random.default_rng(0)
        arrays = {"x_train": rng.integers(0, 256, (256, 32, 32, 3), dtype=np.uint8),
                  "y_train": rng.integers(0, 10, 256), "x_test": rng.integers(0, 256, (128, 32, 32, 3), dtype=np.uint8),
                  "y_test": np.arange(128) % 10, "class_names": np.array([f"class{k}" for k in range(10)])}
    np.savez(path, **arrays)
    return str(path)


def tiny_run(npz, out, *extra):
    """train.py at width 4 (our ResNets), batch 32, one warmup epoch, a decay after the first."""
    import train

    width = [] if any(":" in a for a in extra) else ["--width", "4"]  # library networks have widths of their own
    train.main(["--dataset", npz, *width, "--batch-size", "32", "--warmup-epochs", "1", "--milestones", "1",
                "--out", str(out), *extra])


@pytest.fixture(scope="session")
def run_dir(tiny_npz, tmp_path_factory):
    """Two epochs, 64 of the 256 training images held out for validation, logged to TensorBoard (when installed)."""
    out = tmp_path_factory.mktemp("runs") / "two-epochs"
    tiny_run(tiny_npz, out, "--epochs", "2", "--val-split", "64", *TENSORBOARD)
    return out


@pytest.fixture
def kept_run(run_dir, tmp_path):
    """A copy of the two-epoch run, and a check that its last.pt is byte-for-byte intact afterwards."""
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    before = (out / "last.pt").read_bytes()
    yield out
    assert (out / "last.pt").read_bytes() == before, "an error damaged last.pt"


def metric_lines(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def readme_block(after, language="python"):
    """The first ```language block of the README after the line containing `after`, as written."""
    text = (HERE / "README.md").read_text()
    start = text.index(f"```{language}\n", text.index(after)) + len(language) + 4
    return text[start:text.index("```", start)]


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """A tiny ImageFolder: 3 classes, 8 training and 4 validation images each, 40 x 40 PNGs."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for c in range(3):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) // (c + 1)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture
def stopped_after_first_checkpoint(monkeypatch):
    """stopped(run, *args): calls run(*args), a train.py run, as if Ctrl-C came right after its first
    checkpoint (train.py then exits with status 130)."""
    import checkpoints

    def stopped(run, *args):
        real_save = checkpoints.save_training

        def save_then_stop(*save_args, **kwargs):
            real_save(*save_args, **kwargs)
            raise KeyboardInterrupt

        monkeypatch.setattr(checkpoints, "save_training", save_then_stop)
        with pytest.raises(SystemExit) as e:
            run(*args)
        monkeypatch.setattr(checkpoints, "save_training", real_save)
        assert e.value.code == 130

    return stopped
