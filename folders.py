"""Image folders (torchvision's ImageFolder layout: train/ and val/, a folder of images per class): read once
into arrays, or streamed by a DataLoader, with one line naming the images that cannot be read.

ImageNet (docs/method.md section 9), or a folder of one's own of larger images, does not fit on the device: a
DataLoader with workers reads it, RandomResizedCrop + flip for training and Resize(256) + CenterCrop(224) for
evaluation, as uint8 into pinned memory, copied to the device without blocking (data.py normalises it there). A
folder of small images (the CIFAR setting) is decoded once into the arrays of an .npz (read_folder). The
Self-KD baselines' extras (each image's position for PS-KD, a partner of its class for CS-KD, docs/method.md
section 12) come through the loader (WithExtra). Needs torch and torchvision (and Pillow, which torchvision
needs); data.py builds its datasets on this file.
"""
import functools
import os
import re

import numpy as np
import torch

from errors import UserError


def open_image_folder(root, image_size, name="imagenet"):
    """The train and test ImageFolder datasets of root/train and root/val, and the image size they give:
    RandomResizedCrop + flip to train, Resize + CenterCrop to test. image_size None: 224 for ImageNet, the size
    of a folder's first training image for a folder (its images at their own size)."""
    import torchvision.transforms as T

    train_dir, test_dir = image_folder_splits(root, name)
    image_size = image_size or (224 if name == "imagenet" else first_image_size(root))
    train = image_folder(train_dir, T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(),
                                               T.PILToTensor()]))
    test = image_folder(test_dir, test_transform(image_size, "imagenet"))
    if train.classes != test.classes:
        raise UserError(f"{name}: {train_dir} and {test_dir} hold different class folders")
    return train, test, image_size


def image_folder_splits(root, name):
    """root/train and root/val, or a one-line error naming the one missing."""
    folders = [os.path.join(root, split) for split in ("train", "val")]
    missing = [f for f in folders if not os.path.isdir(f)]
    if missing:
        where = "--data" if name == "imagenet" else "--dataset FOLDER"
        raise UserError(f"{name}: {missing[0]} does not exist; {where} must hold train/ and val/ in "
                        f"torchvision ImageFolder layout (one folder of images per class)")
    return folders


@functools.lru_cache(maxsize=None)  # a folder's size decides its setting, asked more than once per start
def first_image_size(root):
    """The smaller side of the first image in root/train (ImageFolder's order): a folder's own image size."""
    import torchvision

    folder = os.path.join(root, "train")
    try:
        first = torchvision.datasets.ImageFolder(folder).samples[0][0]
        return min(read_image(first).size)
    except (FileNotFoundError, IndexError):  # no train/, no class folder, no image file
        raise UserError(f"{root}: {folder} holds no images in class folders (ImageFolder layout)") from None
    except UnreadableImage as e:
        raise UserError(f"cannot read the image {first} ({str(e).split(chr(9))[-1]}): remove or replace it") from None


def read_folder(root, image_size, workers):
    """An image folder's train/ and val/ as the arrays of an .npz (uint8 N x H x W x 3, labels, class_names),
    each image at image_size (Resize + CenterCrop, which leaves an image of that size unchanged), decoded once
    by a DataLoader with workers. For small images, whose whole set fits in memory (the CIFAR setting)."""
    image_size = image_size or first_image_size(root)
    arrays = {}
    for split, folder in zip(("train", "test"), image_folder_splits(root, os.path.basename(root))):
        dataset = image_folder(folder, test_transform(image_size, "cifar"))
        # a generator of its own: the loader's seed is not drawn from torch's global one, which then initialises the
        # network as it does after an .npz is read (a folder and the .npz of its pixels train alike)
        loader = torch.utils.data.DataLoader(dataset, 256, num_workers=min(workers, os.cpu_count() or 1),
                                             generator=torch.Generator().manual_seed(0))
        x, y = zip(*checked(loader, dataset))
        arrays[f"x_{split}"] = torch.cat(x).permute(0, 2, 3, 1).numpy()
        arrays[f"y_{split}"] = torch.cat(y).numpy()
        arrays.setdefault("class_names", np.array(dataset.classes))
        if list(arrays["class_names"]) != dataset.classes:
            raise UserError(f"{root}: train/ and val/ hold different class folders")
    return arrays


class UnreadableImage(Exception):
    """An image file that PIL cannot read; its message, "unreadable image:<TAB>path<TAB>why", is what checked()
    finds again in the traceback text a DataLoader worker passes on."""


def read_image(path):
    """An image file as an RGB PIL image (ImageFolder's loader), or UnreadableImage naming the file."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:
        raise UnreadableImage(f"unreadable image:\t{path}\t{type(e).__name__}: {' '.join(str(e).split())[:120]}")


def image_folder(folder, transform):
    import torchvision

    return torchvision.datasets.ImageFolder(folder, transform, loader=read_image)


def checked(loader, dataset, limit=20_000, named=5):
    """The batches of a DataLoader over an image folder; an image that cannot be read ends it with one line that
    names every file of the folder that cannot be read (all checked when there are at most `limit`; the first
    `named` with their reasons, then a count), instead of a traceback from the worker. The workers have ended when
    it is raised: the worker's exception holds them in a reference cycle, and a later garbage collection (in a
    notebook, a test) stopped them 5 s each."""
    batches = iter(loader)
    try:
        yield from batches
        return
    except UnreadableImage as e:
        text = str(e)
        e.__traceback__ = None  # its frames hold the iterator, in a reference cycle through the exception
    del batches  # the workers end here, by reference count (at a collection they would take 5 s)
    found = re.findall(r"unreadable image:\t(.*)\t(.*)$", text, re.M)  # tabs: any file name parses
    path, why = found[-1] if found else (text, "")
    while not hasattr(dataset, "samples") and hasattr(dataset, "dataset"):  # a Subset, WithExtra
        dataset = dataset.dataset
    files = [p for p, _ in getattr(dataset, "samples", [])]
    if len(files) > limit:
        raise UserError(f"cannot read the image {path} ({why}); the other {len(files) - 1} files were not checked: "
                        f"remove or replace it")
    bad = {path: why, **{p: reason for p in files if p != path and (reason := unreadable(p))}}
    listed = ", ".join(f"{p} ({reason})" for p, reason in sorted(bad.items())[:named])
    more = f" and {len(bad) - named} more" if len(bad) > named else ""
    where = getattr(dataset, "root", None) or os.path.dirname(path)
    raise UserError(f"cannot read {len(bad)} of the {len(files) or '?'} image files in {where}: {listed}{more}: "
                    f"remove or replace {'it' if len(bad) == 1 else 'them'}")


def unreadable(path):
    """Why an image file cannot be read, or None when it can."""
    try:
        read_image(path)
        return None
    except UnreadableImage as e:
        return str(e).split("\t")[-1]


def test_transform(image_size, stem):
    """A PIL image to the uint8 3 x image_size x image_size tensor that a run's test set feeds: on ImageNet
    (stem "imagenet") Resize(256) + CenterCrop(224) at the recipe's size (section 9); on CIFAR, whose test
    images are used as they are, Resize + CenterCrop to image_size, which leaves an image of that size unchanged."""
    import torchvision.transforms as T

    resize = round(image_size * 256 / 224) if stem == "imagenet" else image_size
    return T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.PILToTensor()])


def folder_batches(dataset, batch_size, seed, epoch, rank, world_size, train, device, workers, generator, extra=None):
    """The uint8 batches of a DataLoader over an ImageFolder (or a Subset of one) on the device: this rank's shard
    (DistributedSampler, reshuffled by (seed, epoch)), worker seeds from `generator` (never torch's global one,
    which the training step draws from), pinned memory copied to a GPU without blocking. extra: "index" adds each
    image's position in the dataset, "partner" an image of its class (WithExtra)."""
    sampler = torch.utils.data.DistributedSampler(dataset, world_size, rank, shuffle=train, seed=seed, drop_last=train)
    sampler.set_epoch(epoch)
    cuda = device.type == "cuda"
    if extra:
        dataset = WithExtra(dataset, extra, seed, epoch)
    loader = torch.utils.data.DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers, pin_memory=cuda,
                                         drop_last=train, generator=generator)
    for batch in checked(loader, dataset):
        yield tuple(t.to(device, non_blocking=cuda) for t in batch)


def folder_labels(dataset):
    """The labels of an ImageFolder, or of a Subset of one, in the dataset's own order."""
    if isinstance(dataset, torch.utils.data.Subset):
        return np.asarray(folder_labels(dataset.dataset))[dataset.indices]
    return np.asarray(dataset.targets)


class WithExtra(torch.utils.data.Dataset):
    """An image folder's items with what train_batches' `extra` asks for: (image, label, its index) or
    (image, label, an image of the same class). The partner of item i in an epoch is drawn by a generator of
    (seed, epoch, i), so it is the same in every worker and in a resumed run."""

    def __init__(self, dataset, extra, seed, epoch):
        self.dataset, self.extra, self.key = dataset, extra, (seed, epoch)
        if extra == "partner":
            labels = folder_labels(dataset)
            self.labels, self.members = labels, {c: np.flatnonzero(labels == c) for c in np.unique(labels)}

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        if self.extra == "index":
            return x, y, i
        members = self.members[self.labels[i]]
        return x, y, self.dataset[members[np.random.default_rng([*self.key, i]).integers(len(members))]][0]
