"""Datasets on the training device as uint8 tensors, with batched augmentation there; ImageNet streamed.

docs/method.md section 7: random crop 32 with 4-pixel zero padding of the raw pixels, horizontal flip with
probability 0.5, then normalisation. As in airbench, the whole training set is one uint8 tensor on
the device (150 MB for CIFAR), and augmentation is a few batched tensor ops per batch: no DataLoader,
no worker processes, no per-image Python.

Sources: torchvision's CIFAR-10/100 (downloaded when missing and online), an `.npz` file with x_train, y_train,
x_test, y_test (uint8 NHWC images, integer labels; class_names optional), or an image folder of small images
(the CIFAR setting), decoded once into the same tensors (folders.read_folder).

ImageNet (docs/method.md section 9) does not fit on the device: `DIR/train` and `DIR/val` in torchvision's
ImageFolder layout (ImageNet's, or a folder of one's own of larger images) are streamed by folders.py's
DataLoader and normalised on the device. A dataset's `kind` says which: "tensors" or "folder".

The Self-KD baselines' data (docs/method.md section 12): each image's position in the training set (PS-KD's
store) or a partner of its class (CS-KD), drawn from the run's seeded generators (train_batches' extra).

A validation split (train.py --val-split) is held out of the training set, stratified by class and
drawn from the seed alone (hold_out), so that a model can be selected without the test set.
"""
import copy
import os
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import torch

import folders
from errors import UserError

DATASETS = ("cifar10", "cifar100", "imagenet")
STATS = {  # per-channel mean and std of the training set, docs/method.md sections 7 and 9
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
SMALL_IMAGES = 64  # a folder of images up to this size follows the CIFAR setting by default (cli.py --setting)


def dataset_name(dataset):
    """Short name of a dataset argument: cifar10, cifar100, imagenet, the stem of an .npz path, or the name of
    an image folder."""
    return dataset if dataset in DATASETS else os.path.splitext(os.path.basename(os.path.normpath(dataset)))[0]


def is_folder(dataset):
    """Whether a dataset argument names image folders: imagenet (in --data), or a folder of one's own."""
    return dataset == "imagenet" or (dataset not in DATASETS and os.path.isdir(dataset))


def load_dataset(dataset, root="./data", device="cpu", image_size=None, workers=8, in_memory=False):
    """Train and test sets as device tensors: x uint8 N x 3 x H x W, y int64, plus num_classes, mean,
    std; for imagenet (in root) or a folder of its own (the dataset argument), the two ImageFolder datasets
    of its train/ and val/ that train_batches and eval_batches stream, or with in_memory (a folder of small
    images under the CIFAR setting) their images read once into device tensors, as an .npz's are."""
    if is_folder(dataset) and not in_memory:
        return load_image_folder(root if dataset == "imagenet" else dataset, device, image_size, workers,
                                 dataset_name(dataset))
    if is_folder(dataset):
        arrays = folders.read_folder(root if dataset == "imagenet" else dataset, image_size, workers)
        stats_key = "cifar10" if tuple(arrays["class_names"]) == CIFAR10_CLASSES else None
    elif dataset in DATASETS:
        arrays, stats_key = load_torchvision(dataset, root), dataset
    elif dataset.endswith(".npz"):
        arrays = load_npz(dataset)
        stats_key = "cifar10" if tuple(arrays.get("class_names", ())) == CIFAR10_CLASSES else None
    else:
        raise UserError(f"unknown dataset {dataset!r}: use cifar10, cifar100, imagenet, a folder with train/ and val/, "
                        f"or the path of an .npz file")
    if stats_key:
        mean, std = STATS[stats_key]
    else:  # an unknown dataset: normalise with its own training statistics
        pixels = arrays["x_train"].reshape(-1, 3) / 255.0
        mean, std = tuple(pixels.mean(0).tolist()), tuple(pixels.std(0).tolist())
    to_device = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
    classes = [str(c) for c in arrays["class_names"]] if "class_names" in arrays else None
    return SimpleNamespace(
        kind="tensors",
        name=dataset_name(dataset),
        image_size=arrays["x_train"].shape[1],
        class_names=classes,
        n_train=len(arrays["y_train"]),
        n_test=len(arrays["y_test"]),
        x_train=to_device(arrays["x_train"].transpose(0, 3, 1, 2)),
        y_train=to_device(arrays["y_train"].astype(np.int64)),
        x_test=to_device(arrays["x_test"].transpose(0, 3, 1, 2)),
        y_test=to_device(arrays["y_test"].astype(np.int64)),
        num_classes=class_count(arrays),
        mean=mean,
        std=std,
        stats=pixel_stats(mean, std, device),
    )


def load_image_folder(root, device, image_size, workers, name="imagenet"):
    """ImageNet (docs/method.md section 9), or a folder of one's own in the same layout, streamed from its files
    (folders.open_image_folder), with ImageNet's mean and std. Workers: at most the cores."""
    train, test, image_size = folders.open_image_folder(root, image_size, name)
    mean, std = STATS["imagenet"]
    return SimpleNamespace(kind="folder", name=name, train_set=train, test_set=test, n_train=len(train),
                           n_test=len(test), num_classes=len(train.classes), image_size=image_size,
                           class_names=train.classes, mean=mean, std=std, device=torch.device(device),
                           workers=min(workers, os.cpu_count() or 1), stats=pixel_stats(mean, std, device))


def load_torchvision(dataset, root):
    import torchvision

    cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
    made = not os.path.exists(root)
    try:
        train, test = (cls(root, train=split, download=True) for split in (True, False))
    except Exception as e:  # offline: URLError, socket errors, or a corrupt partial archive
        if made:  # the attempt made the folder: leave none behind
            shutil.rmtree(root, ignore_errors=True)
        folder = os.path.join(root, cls.base_folder)
        raise UserError(f"{dataset} not found in {folder} and could not be downloaded from {cls.url} "
                        f"({type(e).__name__}): download it and extract it into {root} (or pass --data where it "
                        f"is), or train on an .npz of your own with --dataset PATH.npz") from None
    return {"x_train": train.data, "y_train": np.array(train.targets), "x_test": test.data,
            "y_test": np.array(test.targets), "class_names": np.array(train.classes)}


def class_count(arrays):
    """The number of classes: len(class_names) when the file names them, else 1 + the largest training label."""
    return len(arrays["class_names"]) if "class_names" in arrays else int(arrays["y_train"].max()) + 1


def load_npz(path):
    """Read and validate an .npz dataset (keys, dtypes, shapes, labels), with one-line errors: labels must
    lie in 0..C-1 for C classes (class_count), and neither split may be empty."""
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise UserError(f"dataset file {path} does not exist") from None
    except Exception as e:
        raise UserError(f"cannot read {path} as .npz ({type(e).__name__}: {e})") from None
    missing = [k for k in NPZ_KEYS if k not in arrays]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: an .npz dataset needs {', '.join(NPZ_KEYS)}")
    for split in ("train", "test"):
        check_split(path, split, arrays[f"x_{split}"], arrays[f"y_{split}"])
    classes, source = class_count(arrays), "class_names" if "class_names" in arrays else "the training labels"
    for split in ("train", "test"):
        y = arrays[f"y_{split}"]
        bad = y[(y < 0) | (y >= classes)]
        if len(bad):
            raise UserError(f"{path}: y_{split} holds label {bad[0]}, outside 0..{classes - 1} for the {classes} "
                            f"classes of {source}")
    empty = sorted(set(range(classes)) - set(arrays["y_train"].tolist()))
    if empty == [0] and source == "the training labels":
        raise UserError(f"{path}: y_train runs 1..{classes - 1} with no 0: labels look 1-based; subtract 1 so that "
                        f"they run 0..{classes - 2} (or add class_names to say that class 0 exists)")
    untrained = sorted(set(arrays["y_test"].tolist()) & set(empty))
    if untrained:
        raise UserError(f"{path}: y_test holds label {untrained[0]}, a class with no training image: its test "
                        f"images could never be classified right; check that both splits use the same labels")
    if empty and source == "the training labels" and 2 * len(empty) > classes:
        raise UserError(f"{path}: {len(empty)} of the {classes} classes 0..{classes - 1} have no training image "
                        f"(labels {shown(sorted(set(arrays['y_train'].tolist())))}): relabel them as 0..K-1, or add "
                        f"class_names to say how many classes there are")
    if empty:
        names = [f"{c} ({arrays['class_names'][c]})" if "class_names" in arrays else str(c) for c in empty]
        print(f"note: {path}: class{'es' * (len(empty) > 1)} {shown(names)} of {classes} "
              f"ha{'ve' if len(empty) > 1 else 's'} no training image", file=sys.stderr)
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise UserError(f"{path}: train images {arrays['x_train'].shape[1:]} and test images "
                        f"{arrays['x_test'].shape[1:]} differ in size")
    return arrays


def check_split(path, split, x, y):
    """One split of an .npz: uint8 N x H x W x 3 images and N integer labels, with a one-line error that says how
    to fix the data."""
    if x.ndim != 4 or x.shape[3] != 3:
        first = x.ndim == 4 and x.shape[1] == 3
        layout = " (channels first? np.transpose(x, (0, 2, 3, 1)) puts them last)" if first else ""
        raise UserError(f"{path}: x_{split} must be N x H x W x 3 images, got shape {x.shape}{layout}")
    if x.dtype != np.uint8:
        floats = np.issubdtype(x.dtype, np.floating)
        fix = ("scale them to 0..255 and cast: x = (x * 255).round().astype(np.uint8)" if floats
               else "cast them: x.astype(np.uint8), after bringing them to 0..255")
        raise UserError(f"{path}: x_{split} must be uint8 images (0..255), got {x.dtype}: {fix}")
    if x.shape[0] == 0:
        raise UserError(f"{path}: x_{split} holds no images; both splits need at least one")
    if y.ndim != 1 or len(y) != len(x):
        raise UserError(f"{path}: x_{split} has {len(x)} images, y_{split} {len(y) if y.ndim else 1} labels of shape "
                        f"{y.shape}: one integer label per image")
    if not np.issubdtype(y.dtype, np.integer):
        fix = ("map them to 0..C-1 and put the names, in that order, in class_names" if y.dtype.kind in "USO"
               else "cast them with y.astype(np.int64) when they are whole numbers")
        raise UserError(f"{path}: y_{split} must hold integer labels 0..C-1, got {y.dtype}: {fix}")


# ----------------------------------------------------------------------------- validation split


def stratified_sample(labels, n, seed):
    """n indices into `labels` (int array), sorted: each class gets its share of n in proportion to its
    images (largest remainder, ties to the lower class), drawn without replacement by a generator of
    `seed` alone, so the same (seed, labels) always give the same indices."""
    classes, counts = np.unique(labels, return_counts=True)
    quota = n * counts / counts.sum()
    share = np.floor(quota).astype(np.int64)
    share[np.argsort(-(quota - share), kind="stable")[:n - share.sum()]] += 1
    generator = epoch_generator(seed, -1, "cpu")  # epoch -1: a stream that no epoch's order draws from
    picked = []
    for c, k in zip(classes, share):
        members = np.flatnonzero(labels == c)
        picked.append(members[torch.randperm(len(members), generator=generator)[:k].numpy()])
    return np.sort(np.concatenate(picked))


def hold_out(data, val_split, seed):
    """Move a validation split out of the training set (in place; returns data). val_split: a number of
    images, or a fraction of the training set when below 1; 0 holds nothing out. The images are a
    stratified_sample of (seed, training labels), so a resumed run holds out the same ones, and
    train_batches never sees them. Sets n_val, val_index and train_index (positions in the training set
    as loaded), and x_val, y_val (tensors) or val_set (an ImageFolder subset read with the test transform)."""
    data.n_val = 0
    if not val_split:
        return data
    folder = data.kind == "folder"
    labels = np.asarray(data.train_set.targets) if folder else data.y_train.cpu().numpy()
    n = round(val_split * len(labels)) if val_split < 1 else int(val_split)
    if not 0 < n < len(labels):
        raise UserError(f"--val-split {val_split} holds out {n} of the {len(labels)} training images: give a number "
                        f"from 1 to {len(labels) - 1}, or a fraction between 0 and 1")
    data.val_index = stratified_sample(labels, n, seed)
    data.train_index = np.setdiff1d(np.arange(len(labels)), data.val_index)
    data.n_train, data.n_val = len(data.train_index), n
    gone = sorted(set(labels.tolist()) - set(labels[data.train_index].tolist()))
    if gone:  # a class with very few images can go to validation whole
        print(f"note: --val-split {val_split} holds out every training image of class{'es' * (len(gone) > 1)} "
              f"{shown(gone)}: {'they' if len(gone) > 1 else 'it'} will not be learned", file=sys.stderr)
    if folder:  # the same files, read for validation as the test set is read
        val_set = copy.copy(data.train_set)
        val_set.transform = data.test_set.transform
        data.val_set = torch.utils.data.Subset(val_set, data.val_index.tolist())
        data.train_set = torch.utils.data.Subset(data.train_set, data.train_index.tolist())
        return data
    val, train = (torch.from_numpy(i).to(data.x_train.device) for i in (data.val_index, data.train_index))
    data.x_val, data.y_val = data.x_train[val], data.y_train[val]
    data.x_train, data.y_train = data.x_train[train], data.y_train[train]
    return data


def shown(items, limit=8):
    """The first items of a list for a message, and how many more there are."""
    items = [str(i) for i in items]
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


# ----------------------------------------------------------------------------- augmentation


def pixel_stats(mean, std, device):
    """Mean and std in pixel units as 1 x 3 x 1 x 1 device tensors, made once, not per batch."""
    to_pixels = lambda v: torch.tensor(v, device=device).view(1, 3, 1, 1) * 255
    return to_pixels(mean), to_pixels(std)


def normalize(x, stats):
    """uint8 N x 3 x H x W -> float, standardised per channel; stats from pixel_stats."""
    return (x.float() - stats[0]) / stats[1]


def random_crop_flip(x, generator, pad=4):
    """Random crop with `pad` pixels of zero padding and a horizontal flip with probability 0.5,
    each drawn per image, as batched gathers (docs/method.md section 7). x: uint8 N x C x H x W."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1, 1), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1, 1), device=x.device, generator=generator)
    flip = torch.rand(n, 1, 1, 1, device=x.device, generator=generator) < 0.5
    rows = dy + torch.arange(h, device=x.device).view(1, 1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, 1, w)
    cols = dx + torch.where(flip, w - 1 - cols, cols)
    batch_idx = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    chan_idx = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[batch_idx, chan_idx, rows, cols]


def epoch_generator(seed, epoch, device, stream=0):
    """A generator that is a function of (seed, epoch, stream) alone, so a resumed run draws exactly
    what the uninterrupted run drew. Stream 0 orders the epoch; stream 1 + rank augments."""
    return torch.Generator(device=device).manual_seed((seed * 100_003 + epoch) * 1_009 + stream)


def train_batches(data, batch_size, seed, epoch, rank=0, world_size=1, extra=None):
    """Shuffled, augmented, normalised batches of one epoch for one rank: (x, y), or (x, y, e) with `extra`:
    "index", e the positions of the batch's images in the training set (PS-KD's store rows); "partner", e one
    augmented image of the same class per image, drawn uniformly from the training images of its class, the
    image itself included (CS-KD, docs/method.md section 12.4).

    Every rank draws the same permutation and takes every world_size-th index of it, so the shards
    are disjoint and together cover the epoch (DistributedSampler's way, on the device). The last
    incomplete batch is dropped, so every step has the same shape (steady memory, no recompiles).
    Augmentation and partners come from a generator of (seed, epoch, rank): a resumed epoch draws the same.
    """
    if data.kind == "folder":
        generator = epoch_generator(seed, epoch, "cpu", stream=1 + rank)  # the workers' seeds
        for x, y, *e in folders.folder_batches(data.train_set, batch_size, seed, epoch, rank, world_size, True,
                                               data.device, data.workers, generator, extra):
            yield normalize(x, data.stats), y, *(normalize(t, data.stats) if extra == "partner" else t for t in e)
        return
    x, y = data.x_train, data.y_train
    order = torch.randperm(x.shape[0], device=x.device, generator=epoch_generator(seed, epoch, x.device))
    order = order[rank::world_size]
    augment = epoch_generator(seed, epoch, x.device, stream=1 + rank)
    classes = class_members(y) if extra == "partner" else None
    for i in range(steps_per_epoch(data, batch_size, world_size)):
        idx = order[i * batch_size:(i + 1) * batch_size]
        batch = normalize(random_crop_flip(x[idx], augment), data.stats), y[idx]
        if extra == "index":
            batch += (idx,)
        elif extra == "partner":
            partner = same_class_partner(y[idx], classes, augment)
            batch += (normalize(random_crop_flip(x[partner], augment), data.stats),)
        yield batch


def note_single_image_classes(data):
    """CS-KD pairs each image with another of its class (docs/method.md section 12.4): a class with one training
    image can only be paired with itself, as the released sampler does; a note names such classes."""
    counts = torch.bincount(train_labels(data), minlength=data.num_classes).tolist()
    single = [k if not data.class_names else f"{k} ({data.class_names[k]})" for k, n in enumerate(counts) if n == 1]
    if single:
        print(f"note: class{'es' * (len(single) > 1)} {shown(single)} ha{'ve' if len(single) > 1 else 's'} one "
              f"training image: CS-KD pairs it with itself, as the released sampler does", file=sys.stderr)


def class_members(y):
    """The training set's indices grouped by class, for same_class_partner: (indices sorted by label, first
    position of each class among them, images per class), all on y's device."""
    counts = torch.bincount(y)
    return torch.argsort(y, stable=True), torch.cumsum(counts, 0) - counts, counts


def same_class_partner(labels, classes, generator):
    """For each label, a training image of that class drawn uniformly (the image itself may be drawn, as in
    the released CS-KD sampler), as indices into the training set: on the device, no host sync."""
    by_class, first, counts = classes
    u = torch.rand(labels.shape[0], device=labels.device, generator=generator)
    return by_class[first[labels] + (u * counts[labels]).long().clamp(max=counts[labels] - 1)]


def steps_per_epoch(data, batch_size, world_size=1):
    steps = data.n_train // world_size // batch_size
    if steps == 0:
        raise UserError(f"--batch-size {batch_size} exceeds the {data.n_train // world_size} training images of "
                        f"each of the {world_size} process(es)")
    return steps


def eval_batches(data, batch_size, split="test"):
    """The test set (or the validation split, split="val") in order, normalised, in batches of batch_size
    (the last may be smaller)."""
    if data.kind == "folder":
        for x, y in folders.folder_batches(getattr(data, f"{split}_set"), batch_size, 0, 0, 0, 1, False, data.device,
                                           data.workers, epoch_generator(0, -1, "cpu")):
            yield normalize(x, data.stats), y
        return
    x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
    for i in range(0, x.shape[0], batch_size):
        yield normalize(x[i:i + batch_size], data.stats), y[i:i + batch_size]


def train_labels(data):
    """The training set's labels on the device, in the order of the positions train_batches' "index" gives."""
    if data.kind == "folder":
        return torch.as_tensor(folders.folder_labels(data.train_set), device=data.device)
    return data.y_train


