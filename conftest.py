"""Fixtures shared by the test files: a small real dataset."""
import os
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
# real CIFAR-10 images, when present: $MIXSKD_TEST_NPZ, else the subset of docs/results.md beside the repository
SHARED_NPZ = Path(os.environ.get("MIXSKD_TEST_NPZ", HERE.parent / "shared" / "data" / "cifar10_q75_10k.npz"))


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
