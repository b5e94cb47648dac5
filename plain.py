"""The plain way to write the training step, which `python bench.py --baseline` times train.py's against: a
DataLoader with per-image PIL transforms on the host (torchvision's CIFAR recipe: random crop with 4 px of
padding, horizontal flip, normalisation), eager fp32 in NCHW, default SGD, and `.item()` on every loss term
each step. The network and the objective are train.py's own (`train.build`), so only the way differs."""
import argparse

import torch
import torchvision.transforms as T
from PIL import Image

import train
from mixup import mix_batch
from settings import resolve


class PILCifar(torch.utils.data.Dataset):
    """CIFAR as torchvision serves it: a PIL image per item, transformed on the host."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images.numpy(), labels.numpy(), transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def plain_step(method, opt, x, y):
    """The step as it is usually written: eager fp32 NCHW, a host float lam, default SGD, and the
    habit of reading every loss term with .item() each step (one host sync per term)."""
    inputs, lam, perm = x, None, None
    if method.name != "ce":
        x_mix, perm, lam = mix_batch(x, method.hp["alpha"], method.hp.get("mix", method.name))
        inputs = torch.cat([x, x_mix]) if method.name == "mixskd" else x_mix
    total, terms, _ = method.objective(inputs, y, lam, perm)
    opt.zero_grad()
    total.backward()
    opt.step()
    return [total.item()] + [v.item() for v in terms.values()]


def plain_stepper(targs, data, device, workers):
    """(step, settings): step() runs one plain step on the next batch of a DataLoader over data's images with
    workers processes, for bench.py's args targs (their amp, channels_last and compile set to the plain way's)."""
    torch.manual_seed(0)
    plain = argparse.Namespace(**{**vars(targs), "amp": "off", "channels_last": "off", "compile": "off"})
    method, _ = train.build(resolve(plain, data, device), data.num_classes, device)
    params = [p for p in method.objective.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    transform = T.Compose([T.RandomCrop(data.images.shape[1], padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(data.mean, data.std)])
    loader = torch.utils.data.DataLoader(PILCifar(data.images, data.labels, transform), batch_size=targs.batch_size,
                                         shuffle=True, num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0)
    state = {"batches": iter(loader)}

    def step():
        batch = next(state["batches"], None)
        if batch is None:
            state["batches"] = iter(loader)
            batch = next(state["batches"])
        x, y = batch
        plain_step(method, opt, x.to(device), y.to(device))

    return step, {"amp": "off", "channels_last": False, "compile": "off", "data": f"DataLoader+PIL, {workers} workers"}
