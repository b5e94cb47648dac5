"""Write an .npz image dataset out as an ImageFolder, to train the ImageNet path on real images offline.

    python npz_to_imagefolder.py path/to/cifar10_q75_10k.npz runs/cifar10-folder
    python train.py --dataset imagenet --data runs/cifar10-folder --image-size 64 --arch resnet18 --width 16

The .npz holds x_train, y_train, x_test, y_test (uint8 N x H x W x 3, integer labels) and optionally
class_names, as data.py reads it. The folder gets train/ and val/, one sub-folder per class named
`<index>_<name>`, the index zero-padded to one width for every class (so that ImageFolder's alphabetical
order keeps the .npz's label order for any number of classes), one PNG per image (lossless, so the
pixels are the .npz's). The images are written at run time, never committed.
"""
import os

from PIL import Image

from data import class_count, load_npz
from errors import ArgumentParser, UserError, run_cli


def write_image_folder(npz, out):
    """Write every image of `npz` under out/train and out/val; returns the number of images per split."""
    arrays = load_npz(npz)
    classes = class_count(arrays)
    names = [str(n).replace(os.sep, "_") for n in arrays.get("class_names", [f"class{k}" for k in range(classes)])]
    for split in ("train", "test"):  # ImageFolder needs every class, with at least one image, in both splits
        missing = sorted(set(range(classes)) - set(arrays[f"y_{split}"].tolist()))
        if missing:
            raise UserError(f"{npz}: y_{split} has no image of class {missing[0]} ({names[missing[0]]}); an "
                            f"ImageFolder needs every class in both splits")
    counts, digits = {}, max(3, len(str(classes - 1)))  # zero-padded to one width: folders sort in label order
    folders = [f"{k:0{digits}d}_{names[k]}" for k in range(classes)]
    for split, folder in (("train", "train"), ("test", "val")):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        for name in folders:
            os.makedirs(os.path.join(out, folder, name), exist_ok=True)
        for i, (image, label) in enumerate(zip(x, y)):
            Image.fromarray(image).save(os.path.join(out, folder, folders[label], f"{i:06d}.png"))
        counts[folder] = len(y)
    return counts


def main(argv=None):
    p = ArgumentParser(prog="npz_to_imagefolder.py",
                       description="Write an .npz dataset as an ImageFolder (train/ and val/).")
    p.add_argument("npz", help="x_train, y_train, x_test, y_test (uint8 NHWC), class_names optional")
    p.add_argument("out", help="folder to create; it must not exist yet")
    args = p.parse_args(argv)
    if os.path.exists(args.out):
        raise UserError(f"{args.out} already exists: choose a new folder")
    counts = write_image_folder(args.npz, args.out)
    print(f"wrote {counts['train']} training images (train/) and {counts['val']} test images (val/, ImageFolder's "
          f"name for them) under {args.out}")


if __name__ == "__main__":
    run_cli(main)
