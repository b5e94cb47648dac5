"""Predictions on image files: the top-k classes of each image, prepared as the run's test set was.

    python eval.py runs/cifar100-resnet18-mixskd-paper-seed0/deploy.pt --predict my_photos/ --top-k 3

eval.py's `--predict`. An image is converted to RGB, resized and centre-cropped to the image size the run
recorded (folders.test_transform: as it is at the trained size when the run's images were tensors, CIFAR, .npz
and small folders; Resize + CenterCrop when they were streamed from folders, ImageNet's way) and normalised
with the run's mean and std. A file that cannot be read as an image gets one line and the others go on.
Works for every network checkpoints.model_from_checkpoint rebuilds.
"""
import json
import os
import sys

import torch

from data import normalize, pixel_stats
from errors import UserError
from folders import test_transform


def image_files(path):
    """The image files to predict: path itself when it is a file, else every file under it whose name ends
    in an image extension torchvision knows (.png, .jpg, ...), sorted."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise UserError(f"--predict {path}: no such file or folder")
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                   if name.lower().endswith(IMG_EXTENSIONS))
    if not files:
        raise UserError(f"--predict {path}: no image files in it (names ending in {', '.join(IMG_EXTENSIONS)})")
    return files


@torch.no_grad()
def predict(model, meta, paths, device, top_k=5, batch_size=500):
    """The top_k classes of each image file with their probabilities, the image prepared as the run's test
    set was: folders.test_transform at meta's image size and stem (as is at the trained size on CIFAR; Resize
    + CenterCrop on ImageNet), normalised with meta's mean and std. Yields, in order of paths, one
    {"image": path, "top": [{"class", "index", "probability"}, ...]} per image, or {"image": path,
    "error": why} for a file that cannot be read as an image. model: model_from_checkpoint's, on device."""
    from PIL import Image

    folder = meta.get("image_pipeline", "folder" if meta.get("dataset") == "imagenet" else "tensors") == "folder"
    transform = test_transform(meta["image_size"], "imagenet" if folder else "cifar")
    stats = pixel_stats(meta["mean"], meta["std"], device)
    names = meta.get("class_names") or [str(k) for k in range(meta["num_classes"])]
    model.eval()
    for start in range(0, len(paths), batch_size):
        images, errors = {}, {}
        for path in paths[start:start + batch_size]:
            try:  # whatever fails in reading or decoding one file is that file's problem alone
                with Image.open(path) as image:
                    images[path] = transform(image.convert("RGB"))
            except Exception as e:
                errors[path] = " ".join(f"{type(e).__name__}: {e}".split())[:200]  # one line
        top = {}
        if images:
            out = model(normalize(torch.stack(list(images.values())).to(device), stats))
            logits = out[1][-1] if hasattr(model, "branches") else out  # a MixSKD network: the backbone's head
            probs, indices = logits.float().softmax(1).topk(min(top_k, logits.shape[1]))
            top = dict(zip(images, zip(probs.tolist(), indices.tolist())))
        for path in paths[start:start + batch_size]:
            if path in errors:
                yield {"image": path, "error": errors[path]}
            else:
                yield {"image": path, "top": [{"class": names[k], "index": k, "probability": p}
                                              for p, k in zip(*top[path])]}


def print_predictions(model, meta, args, device):
    """--predict: a line per image (top-k classes and probabilities), a line on stderr per unreadable file."""
    if "mean" not in meta or "image_size" not in meta:
        raise UserError(f"{args.checkpoint} does not record the image size and normalisation it was trained with: "
                        f"--predict needs a checkpoint written by train.py")
    model.to(device)
    results = []
    for result in predict(model, meta, image_files(args.predict), device, args.top_k, args.batch_size):
        results.append(result)
        if args.json:
            continue
        if "error" in result:
            print(f"{result['image']}: cannot read it as an image ({result['error']}), skipped", file=sys.stderr)
        else:
            print(f"{result['image']}: " + ", ".join(f"{t['class']} {100 * t['probability']:.1f}%"
                                                     for t in result["top"]), flush=True)
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "predictions": results}))
    if all("error" in r for r in results):
        raise UserError(f"--predict {args.predict}: no image could be read from it")
