"""train.py's command line: the flags, their ranges, the flags each method reads, the arguments of a resumed run.

    args = cli.parse_args(["--arch", "resnet18", "--dataset", "cifar100"])   # the command line, as given

parse_args returns the command line as given: the flags whose defaults depend on the setting or the method are
left out unless given, and settings.py resolves them (the paper's recipes, docs/method.md sections 7 and 9: by
default CIFAR's for CIFAR, .npz files and folders of small images, ImageNet's for ImageNet and larger images;
each method's own, methods.py). Every numeric flag is checked against its range (RANGES) before any data is
read, and a method flag the chosen method does not read is refused. `--resume` takes every training argument,
and the settings, from the run's last.pt (resume_arguments), so a resumed run computes what the run it continues
computed.
"""
import argparse
import math
import os
import sys

import checkpoints
from arch import ARCHS, check_arch
from baselines import BASELINE_TEMPERATURE
from data import DATASETS, SMALL_IMAGES, dataset_name
from errors import ArgumentParser, UserError
from losses import TERMS
from methods import FLAGS, METHODS, MIXSKD_TEMPERATURE, RECIPES, readers, without_foreign_flags
from mixup import MIX_MODES
from schedule import CLIP_NORM, WARMUP_FLOOR, WARMUP_FLOOR_SHARE
from settings import flags_of, recipe_value, setting_of


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # a default where there is one to show; None and False are not
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def count_or_fraction(text):
    """--val-split: a whole number of images (0 or more, written without a point), or a fraction of the training set
    strictly between 0 and 1 (1.0 is refused: one image or all of them?)."""
    if text.isdigit():
        return int(text)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if 0 < value < 1:
        return value
    raise argparse.ArgumentTypeError(f"{text!r}: give a fraction below 1 (0.1) or a whole number of images (1000)")


parser = ArgumentParser(prog="train.py", formatter_class=HelpFormatter,
                        description="Train MixSKD (Yang et al., ECCV 2022) or a "
                        "baseline on CIFAR, ImageNet or your own data, with the paper's recipes as defaults "
                        "(docs/method.md sections 7 and 9).")
g = parser.add_argument_group("what to train")
g.add_argument("--arch", default="resnet18", help=f"{', '.join(ARCHS)} (the stem follows --setting: 3x3 for "
               "CIFAR, 7x7 + max-pool for ImageNet), or torchvision:NAME, a torchvision classifier of a family that "
               "layouts.TORCHVISION_FAMILIES lists (ResNet, ResNeXt, Wide-ResNet, RegNet, ConvNeXt, MobileNetV2/V3, "
               "EfficientNet, DenseNet, ViT, Swin), or timm:NAME, one of layouts.TIMM_FAMILIES (ResNet, ResNeXt, "
               "ConvNeXt, EfficientNet, MobileNetV3/V4, RegNet, ViT, DeiT, Swin; needs timm); transformers are "
               "built for the data's image size")
g.add_argument("--width", type=int, default=argparse.SUPPRESS, help="channels of our ResNets' first stage (default "
               "64, as in the paper); library networks (torchvision:, timm:) have their own")
g.add_argument("--dataset", default="cifar100", help="cifar10, cifar100 (torchvision, downloaded into --data), "
               "PATH.npz with x_train, y_train, x_test, y_test (uint8 NHWC images), imagenet (--data holds train/ "
               "and val/ in ImageFolder layout), or FOLDER, a folder of your own holding train/ and val/ in that "
               "layout")
g.add_argument("--setting", default="auto", choices=("auto", "cifar", "imagenet"), help="the paper's recipe to "
               "follow: cifar (3x3 stem, batch 64, alpha 0.4, step decays, Nesterov, weight decay 5e-4; the images "
               "on the device, cropped and flipped) or imagenet (7x7 stem and max-pool, batch 128 in all, alpha 0.2, "
               "cosine, weight decay 1e-4; a folder streamed through RandomResizedCrop). auto: imagenet for "
               f"imagenet and for a folder of images larger than {SMALL_IMAGES} px, else cifar")
g.add_argument("--data", default="./data", help="torchvision dataset root, or the ImageNet folder")
g.add_argument("--image-size", type=int, default=None, help="image folders: the size images are cropped to "
               "(Resize(size * 256 / 224) to test under --setting imagenet); default 224 on ImageNet, a folder's own "
               "image size (its first training image's)")
g.add_argument("--workers", type=int, default=8, help="DataLoader workers per process that read an image folder "
               "(ImageNet's or your own; at most the cores)")
g.add_argument("--val-split", type=count_or_fraction, default=0, metavar="N", help="hold out N training images "
               "(a fraction of them when below 1), stratified by class and drawn from --seed, as a validation split: "
               "evaluated every epoch, it chooses best.pt, and the test set chooses nothing. On an ImageNet folder "
               "they come from train/ too, since val/ is the test set; 0: none")
g.add_argument("--method", default="mixskd", choices=list(METHODS), help="mixskd; a baseline on the backbone alone: "
               "ce (clean images), mixup, cutmix; or a Self-KD baseline (docs/method.md section 12) with the released "
               "loss: label-smooth, byot and dks (which train the branches of mixskd's network), cs-kd, ps-kd")
g = parser.add_argument_group("the methods' own flags (a method refuses the flags it does not read)")
read_by = lambda flag: f" (read by {', '.join(readers(flag))})"
g.add_argument("--recipe", default=argparse.SUPPRESS, choices=RECIPES,
               help="the objective: paper (Eq. (10), everything trained; the default) or official (the released "
                    "scripts: on CIFAR Eq. (10'), no L_mix, fixed self-teacher and discriminators; on ImageNet Eq. "
                    "(10) with fixed discriminators, docs/method.md section 9)" + read_by("recipe"))
g.add_argument("--mix", default=argparse.SUPPRESS, choices=MIX_MODES,
               help="how images are mixed (default mixup)" + read_by("mix"))
g.add_argument("--alpha", type=float, default=argparse.SUPPRESS,
               help="lam ~ Beta(alpha, alpha) (default 0.4 on CIFAR, 0.2 on ImageNet; 1.0 for --method cutmix)"
                    + read_by("alpha"))
g.add_argument("--temperature", type=float, default=argparse.SUPPRESS,
               help=f"KD temperature T (default {MIXSKD_TEMPERATURE:g} for mixskd, {BASELINE_TEMPERATURE:g} for the "
                    f"others, as released)" + read_by("temperature"))
for term in TERMS:
    g.add_argument(f"--w-{term}", type=float, default=argparse.SUPPRESS,
                   help=f"weight of L_{term} (default 1; 0 disables it)" + read_by(f"w_{term}"))
g = parser.add_argument_group("optimisation (docs/method.md sections 7 and 9)")
g.add_argument("--epochs", type=int, default=argparse.SUPPRESS, help="training epochs (default 205; 305 on ImageNet)")
g.add_argument("--warmup-epochs", type=float, default=None, help="linear warmup, per iteration (default: the "
               "recipe's 5 epochs, times --epochs/205 (305 on ImageNet) when --epochs is shorter, and at least "
               f"{WARMUP_FLOOR} iterations, or {WARMUP_FLOOR_SHARE:g} of a shorter run: docs/stability.md)")
g.add_argument("--schedule", choices=("step", "cosine"), default=argparse.SUPPRESS, help="after the warmup: step "
               "decays at --milestones (default under --setting cifar, docs/method.md section 7) or a cosine to 0 "
               "at the last epoch (default under --setting imagenet, section 9)")
g.add_argument("--milestones", type=int, nargs="*", default=argparse.SUPPRESS,
               help="--schedule step: absolute epochs where lr is multiplied by 0.1 (default: 105 155, scaled by "
                    "--epochs/205 when --epochs differs)")
g.add_argument("--lr", type=float, default=0.1, help="base learning rate")
g.add_argument("--weight-decay", type=float, default=argparse.SUPPRESS,
               help="on every trained parameter (default 5e-4; 1e-4 on ImageNet)")
g.add_argument("--batch-size", type=int, default=argparse.SUPPRESS, help="clean images per step and process; "
               "MixSKD forwards twice as many (default 64; on ImageNet 128 divided by the number of processes)")
g.add_argument("--clip-grad", type=float, default=None, help="clip the norm of all trained gradients to this value, 0 "
               f"= never (default: {CLIP_NORM} for a MixSKD run too short to warm up for {WARMUP_FLOOR} iterations "
               "or of a library network, else never, as the recipe: docs/stability.md)")
g.add_argument("--seed", type=int, default=0, help="seeds initialisation, data order, augmentation, mixing")
g = parser.add_argument_group("speed")
g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
g.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"), help="autocast: auto = bf16 on "
               "CUDA (fp16 without bf16) and on CPUs with native bf16 kernels (AVX512-BF16/AMX), else fp32")
g.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"), help="the images and weights in "
               "channels_last memory format; auto = on for CUDA, and on a CPU for an eager (not compiled) step under "
               "bf16 autocast, or in fp32 on a CPU without native bf16 except for our ResNets below width 16; there it "
               "saves 9-28%% of a step (docs/performance.md)")
g.add_argument("--compile", default="auto", choices=("auto", "off", "default", "reduce-overhead", "max-autotune",
                                                     "step-graph"),
               help="torch.compile forward and loss; auto = reduce-overhead (CUDA graphs) on CUDA; on a CPU, default "
                    "for a run of at least 3,000 steps (compiling takes about 1.5 minutes there and saves 12-16%% of "
                    "a step: docs/performance.md), else off; step-graph (CUDA, one process, not fp16): default, and "
                    "the whole step, SGD included, replayed as one CUDA graph")
g = parser.add_argument_group("files")
g.add_argument("--out", default=None, help="run folder (default runs/<dataset>-<arch>-<method>[-<recipe>]-seed<k>)")
g.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
g.add_argument("--extend", action="store_true",
               help="with --resume: continue a run to another --epochs than it was started with (new schedule)")
g.add_argument("--extend-schedule", default="capped", choices=("capped", "new"), help="with --extend: capped keeps "
               "the lr at or below the last it used (the new schedule's decays may lie behind the run); new follows "
               "the schedule of the new --epochs, whose lr may rise")
g.add_argument("--init-from", default=None,
               help="start from the weights of a checkpoint: ours (last/best/deploy.pt), the released script's, or a "
                    "state dict of the backbone (torchvision's or timm's; a torch file or .safetensors)")
g.add_argument("--sync-bn", action="store_true",
               help="under torchrun on CUDA: BatchNorm statistics over all GPUs (off, as in the released code)")
g.add_argument("--log-every", type=int, default=100, help="steps between progress updates (each one syncs)")
g.add_argument("--tensorboard", action="store_true", help="also write metrics.jsonl's numbers as TensorBoard scalars "
               "into --out (needs the tensorboard package): tensorboard --logdir runs")


def parse_args(argv=None):
    """The command line as given, every value checked: the dataset named, numbers in range, the method's flags its
    own. The flags whose defaults depend on the setting or the method stay unset unless given (settings.py)."""
    args = parser.parse_args(argv)
    folder = args.dataset not in DATASETS and os.path.isdir(args.dataset)
    if args.dataset not in DATASETS and not args.dataset.endswith(".npz") and not folder:
        if os.sep in args.dataset or args.dataset.startswith((".", "~")):
            parser.error(f"--dataset {args.dataset}: no such folder; a folder of your own holds train/ and val/")
        parser.error(f"unknown dataset {args.dataset!r}: use cifar10, cifar100, imagenet, the path of an .npz file, "
                     f"or a folder holding train/ and val/ (ImageNet layout)")
    check_numbers(args)
    try:
        check_arch(args.arch)
        setting = setting_of(args)
        check_method_flags(args, vars(args), setting)
    except ValueError as e:
        parser.error(str(e))
    if ":" in args.arch and hasattr(args, "width"):
        parser.error(f"--width sets the channels of our ResNets; {args.arch} has its own: drop --width")
    schedule, epochs = recipe_value(args, "schedule", setting), recipe_value(args, "epochs", setting)
    if hasattr(args, "milestones") and schedule == "cosine":
        parser.error("--milestones place the decays of --schedule step; the cosine schedule has none")
    late = hasattr(args, "milestones") and any(m >= epochs for m in args.milestones)
    if late and int(os.environ.get("RANK", 0)) == 0:
        print(f"note: --milestones {' '.join(map(str, args.milestones))}: a decay at epoch {epochs} or later "
              f"comes after the last epoch of --epochs {epochs}, so the lr never makes it", file=sys.stderr)
    if args.out is None:  # --out's default names the run
        recipe = f"-{getattr(args, 'recipe', 'paper')}" if args.method == "mixskd" else ""
        arch = args.arch.replace(":", "-")
        args.out = f"runs/{dataset_name(args.dataset)}-{arch}-{args.method}{recipe}-seed{args.seed}"
    return args


def check_method_flags(args, given, setting, resumed=None):
    """A ValueError naming the method and the flags it reads for every method flag in `given` (a dict of flags
    given on the command line) that the method does not read; or where its values leave nothing to train.
    resumed: the folder of the run a --resume continues, whose method is fixed."""
    method = METHODS[args.method]
    reads = method.defaults(setting)
    foreign = [flag for flag in FLAGS if flag in given and flag not in reads]
    if foreign:
        flag = lambda name: f"--{name.replace('_', '-')}"
        own = f"its flags: {', '.join(map(flag, reads))}" if reads else "it reads none of the method flags"
        it = "it" if len(foreign) == 1 else "them"
        what = f"{resumed} was trained with --method {args.method}, which" if resumed else f"--method {args.method}"
        fix = f"drop {it}" + ("" if resumed else f", or choose a method that reads {it}")
        raise ValueError(f"{what} does not read {', '.join(map(flag, foreign))} ({own}): {fix}")
    method.check({k: v for k, v in given.items() if k in reads}, setting)


def finite_at_least(low, strict=False):
    """A check that a number is finite and >= low (> low when strict), with its text for the error line."""
    ok = (lambda v: math.isfinite(v) and (v > low if strict else v >= low))
    return ok, f"a finite number {'>' if strict else '>='} {low:g}"


def int_in(low, high=None):
    ok = (lambda v: low <= v and (high is None or v < high))
    return ok, f"an integer >= {low}" + (f" and < {high}" if high else "")


# every numeric flag and what it accepts: checked before any data is read
RANGES = {"width": int_in(1), "image_size": int_in(8), "workers": int_in(0), "alpha": finite_at_least(0, True),
          "temperature": finite_at_least(0, True), **{f"w_{t}": finite_at_least(0) for t in TERMS},
          "epochs": int_in(1), "warmup_epochs": finite_at_least(0), "milestones": int_in(1),
          "lr": finite_at_least(0, True),
          "weight_decay": finite_at_least(0), "batch_size": int_in(2), "clip_grad": finite_at_least(0),
          "seed": int_in(0, 2**32), "log_every": int_in(1), "val_split": finite_at_least(0)}
WHY = {"batch_size": " (mixup pairs images, BatchNorm needs a batch)", "clip_grad": " (0: never clip)",
       "seed": " (NumPy's generator takes 32 bits)"}


def check_numbers(args):
    """One line naming the flag and its valid range for any numeric value outside it (argparse's exit 2)."""
    for key, (ok, valid) in RANGES.items():
        values = getattr(args, key, None)
        for value in values if isinstance(values, list) else [values]:
            if value is not None and not ok(value):
                parser.error(f"--{key.replace('_', '-')} must be {valid}{WHY.get(key, '')}, got {value}")


# what a run saved before these flags existed did: never clipped, no validation split
LEGACY = {"clip_grad": 0.0, "val_split": 0}
# the arguments that do not change what a run computes: a resume may give them anew
NOT_TRAINING = {"device", "amp", "channels_last", "compile", "out", "resume", "extend", "extend_schedule",
                "init_from", "log_every",
                "data", "workers", "tensorboard"}


def given_flags(argv):
    """The arguments the command line gave explicitly, as parsed values (no defaults)."""
    quiet = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = {"action": type(action)} if not isinstance(action, argparse._StoreAction) else {
                "type": action.type, "nargs": action.nargs, "choices": action.choices}
            quiet.add_argument(*action.option_strings, dest=action.dest, **kwargs)
    return vars(quiet.parse_args(argv))


def resume_arguments(args, argv):
    """--resume continues the run in --out as it was started: every training argument comes from its last.pt, and
    one given on the command line that differs from what the run trained with is refused, naming each, as is a
    method flag its method does not read. --epochs may differ with --extend (the schedule is then placed anew for
    the new length); speed and file flags may differ. Returns (args, resume): the run's arguments, and what
    settings.resolve takes of its last.pt (its settings, its epochs, the first epoch to run, the lr it last used)."""
    last = os.path.join(args.out, "last.pt")
    if not os.path.exists(last):
        raise UserError(f"--resume: no {last} to continue from")
    ckpt = checkpoints.read_checkpoint(last)
    saved, settings = ckpt.get("args"), ckpt.get("settings")  # no settings: saved before they existed
    if not isinstance(saved, dict) or "optimizer" not in ckpt:
        raise UserError(f"{last} is not a training checkpoint of this project: --resume needs a last.pt")
    given = given_flags(sys.argv[1:] if argv is None else argv)
    if args.extend and "epochs" not in given:
        raise UserError(f"--extend continues {args.out} to another length: give the new one with --epochs N (the run "
                        f"has {(settings or saved)['epochs']})")
    setting = (settings or {}).get("setting") or saved.get("setting") or saved.get("stem", "cifar")
    try:
        check_method_flags(argparse.Namespace(method=saved["method"]), given, setting, resumed=args.out)
    except ValueError as e:
        raise UserError(str(e)) from None
    # what the run trained with, under the names of the flags: its settings, else (saved before) its arguments
    trained = {**saved, **(flags_of(settings) if settings else {})}
    renewed = {"epochs", "milestones"} if args.extend else set()
    differ = [key for key, value in given.items() if key in trained and key not in NOT_TRAINING | renewed
              and value != saved.get(key) and not same(key, value, trained[key])]
    if differ:
        raise UserError(f"--resume continues {args.out} with the arguments it was started with; these differ: "
                        + ", ".join(f"--{k.replace('_', '-')} {given[k]} (the run: {trained[k]})" for k in differ)
                        + ("; --epochs may change with --extend" if "epochs" in differ else "")
                        + ": drop them, or start a new run in another --out")
    if trained.get("schedule") == "cosine" and "milestones" in given:
        raise UserError(f"{args.out} follows the cosine schedule, which has no decays for --milestones to place")
    keep = {**LEGACY, **without_foreign_flags({key: value for key, value in saved.items()
                                               if key not in NOT_TRAINING | renewed}, saved["method"], setting)}
    keep.setdefault("setting", setting)  # a run saved before --setting: its stem's recipe
    if "dataset" in given:  # the same dataset, perhaps moved: the path as given now
        keep["dataset"] = given["dataset"]
    # how the run logs stays as it was unless given anew (speed flags are resolved again for this machine)
    keep.update({key: saved[key] for key in ("tensorboard", "log_every") if key in saved and key not in given})
    resume = {"settings": settings, "epochs": (settings or saved)["epochs"], "start_epoch": ckpt["epoch"] + 1,
              "lr": ckpt["optimizer"]["param_groups"][0]["lr"]}
    return argparse.Namespace(**{**vars(args), **keep}), resume


def same(key, given, trained):
    """Whether a flag given on resume says what the run trained with."""
    if key == "dataset":  # the same file, perhaps moved
        return dataset_name(given) == dataset_name(trained)
    if key == "warmup_epochs":  # the same number of iterations
        return given is not None and abs(given - trained) < 1e-9
    return given == trained
