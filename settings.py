"""A run's settings: every value it trains with, resolved once from the arguments as given and the data.

    args = cli.parse_args(argv)                  # the command line as given: nothing writes into it later
    s = settings.resolve(args, data, device)     # the recipe's defaults, the method's, what the data decides

`args` keeps what the user typed (and argparse's plain defaults); `Settings` holds what the run computes with:
the recipe's values for the flags left out (CIFAR's or ImageNet's, docs/method.md sections 7 and 9), the method's
hyperparameters (methods.py), and what follows from the data, the device and the processes (steps per epoch,
warmup iterations, the clip, the batch per process, compile mode, memory format, autocast). Both are saved in
last.pt and summary.json, and a run resumed from last.pt takes its settings from there: it computes what the
run it continues computed (only the speed settings are resolved again, for the machine it resumes on).
"""
import dataclasses
import os

import speedups
from data import DATASETS, SMALL_IMAGES, steps_per_epoch
from folders import first_image_size
from methods import METHODS
from schedule import CLIP_NORM, IMAGENET_EPOCHS, SPEC_EPOCHS, SPEC_MILESTONES, WARMUP_FLOOR, default_warmup_iterations

# the flags whose recipe values differ between CIFAR (section 7) and ImageNet (section 9); ImageNet's batch is
# 128 in total across processes
RECIPE_DEFAULTS = {
    "cifar": {"epochs": SPEC_EPOCHS, "weight_decay": 5e-4, "batch_size": 64, "schedule": "step", "nesterov": True},
    "imagenet": {"epochs": IMAGENET_EPOCHS, "weight_decay": 1e-4, "batch_size": 128, "schedule": "cosine",
                 "nesterov": False},
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a run trains with (units in the comments); `resolve` makes it, `dataclasses.asdict` saves it."""

    arch: str
    width: int | None  # channels of our ResNets' first stage; None for a library network
    setting: str  # "cifar" or "imagenet": the recipe followed, and our ResNets' stem
    image_size: int  # pixels, the side of the images the network sees
    method: str
    hp: dict  # the hyperparameters the method reads (methods.py), resolved
    seed: int
    epochs: int
    lr: float  # base learning rate
    weight_decay: float
    nesterov: bool
    batch_size: int  # clean images per step and process
    schedule: str  # "step" or "cosine"
    milestones: list  # epochs where a step schedule multiplies the lr by 0.1
    steps_per_epoch: int  # per process
    warmup_iterations: int  # linear warmup, in steps
    clip: float  # the norm all trained gradients are clipped to; 0 = never
    amp: str  # autocast: "bf16", "fp16" or "off"
    channels_last: bool
    compile: str  # torch.compile mode, or "off"
    extended_at: int | None = None  # the epoch an --extend continued the run from (0-based)
    lr_ceiling: float | None = None  # from extended_at on, the lr never exceeds this (--extend-schedule capped)
    epochs_before: int | None = None  # the run's --epochs before its extension

    @property
    def capped_from(self):
        """(the last epoch before an --extend, the --epochs the run had then) under --extend-schedule capped, else
        None: what the lr never rises above, PS-KD's alpha_t never falls below."""
        if self.lr_ceiling is None or self.epochs_before is None:
            return None
        return self.extended_at - 1, self.epochs_before


def flags_of(saved):
    """A run's settings (a dict, as saved) under the names of the flags that set them: what the run trained with,
    to compare with a command line or with another run."""
    steps = saved["steps_per_epoch"]
    return {**{k: v for k, v in saved.items() if k != "hp"}, **saved["hp"], "clip_grad": saved["clip"],
            "warmup_epochs": saved["warmup_iterations"] / steps}


def setting_of(args):
    """"cifar" or "imagenet": --setting, or for auto the images' size (a folder of images up to SMALL_IMAGES px,
    .npz files and CIFAR: cifar). A ValueError where --setting cifar meets images too large to hold in memory."""
    folder = args.dataset not in DATASETS and os.path.isdir(args.dataset)
    if not (folder or args.dataset == "imagenet"):
        return "imagenet" if args.setting == "imagenet" else "cifar"
    size = args.image_size or (first_image_size(args.dataset) if folder else 224)
    if args.setting == "cifar" and size > SMALL_IMAGES:
        raise ValueError(f"--setting cifar reads the images into memory, and these are {size} px: pass --image-size "
                         f"{SMALL_IMAGES} or less to resize them, or --setting imagenet to stream them")
    if args.setting == "auto":
        return "cifar" if folder and size <= SMALL_IMAGES else "imagenet"
    return args.setting


def recipe_value(args, key, setting):
    """A flag's value: as given, else the recipe's for the setting."""
    return getattr(args, key, RECIPE_DEFAULTS[setting].get(key))


def milestones(args, epochs):
    """--milestones as given (none at all when given without a value), else the recipe's decays (105 and 155 of
    205) at the same fractions of a run of `epochs`, kept distinct."""
    if hasattr(args, "milestones"):
        return list(args.milestones)
    first, second = (round(m * epochs / SPEC_EPOCHS) for m in SPEC_MILESTONES)
    return [first, max(second, first + 1)]


def method_hp(args, setting):
    """The chosen method's hyperparameters: the flags it reads as given, else its defaults for the setting."""
    defaults = METHODS[args.method].defaults(setting)
    return {key: getattr(args, key, value) for key, value in defaults.items()}


def resolve(args, data, device, world=1, resume=None):
    """The Settings of a run of `args` on `data` (anything with n_train and image_size) on `device` with `world`
    processes. resume: what cli.resume_arguments read of the last.pt a run continues: its settings (taken as
    they are; None for a run saved before settings existed, resolved from its arguments), its epochs, the first
    epoch to run and the lr it last used. The speed settings are always resolved for this machine; --extend
    renews the length (--epochs, and the milestones unless given) and records the extension."""
    s = Settings(**resume["settings"]) if resume and resume["settings"] else from_arguments(args, data, world)
    if (steps := steps_per_epoch(data, s.batch_size, world)) != s.steps_per_epoch:  # resumed on another process count
        s = dataclasses.replace(s, steps_per_epoch=steps,  # the warmup keeps its length in epochs, as before
                                warmup_iterations=max(1, round(s.warmup_iterations * steps / s.steps_per_epoch)))
    if resume and getattr(args, "extend", False):
        s = dataclasses.replace(s, epochs=args.epochs, milestones=milestones(args, args.epochs),
                                extended_at=resume["start_epoch"], epochs_before=resume["epochs"],
                                lr_ceiling=None if args.extend_schedule == "new" else resume["lr"])
    # our ResNets' narrowest 1x1 strided convolution has at least `width` input channels; no library network has
    # one below 16 (none of torchvision 0.29's 80 classifiers nor timm 1.0.31's 484 supported models, scanned with
    # speedups.channels_last_hazard), and train.build refuses any that would
    narrow = s.width is not None and s.width < speedups.ONEDNN_1X1_BLOCK
    return dataclasses.replace(s, **speedups.resolve_speed(args.amp, args.channels_last, args.compile, device, world,
                                                          s.steps_per_epoch * s.epochs, narrow))


def from_arguments(args, data, world):
    """Settings from the arguments, the recipe's defaults for the flags left out and the method's for its own;
    the speed settings are left to `resolve`."""
    setting = setting_of(args)
    library = ":" in args.arch
    epochs = recipe_value(args, "epochs", setting)
    batch = getattr(args, "batch_size", None) or RECIPE_DEFAULTS[setting]["batch_size"] // (
        world if setting == "imagenet" else 1)  # ImageNet's 128 are in all, CIFAR's 64 per process
    steps = steps_per_epoch(data, batch, world)
    warmup = (round(args.warmup_epochs * steps) if args.warmup_epochs is not None
              else default_warmup_iterations(epochs, steps, setting))
    clip = args.clip_grad
    if clip is None:  # docs/stability.md: a MixSKD run too short for the warmup floor, or of a library network
        clip = CLIP_NORM if METHODS[args.method].clipped and (warmup < WARMUP_FLOOR or library) else 0.0
    # a run saved before settings existed kept its extension in its arguments
    extension = {k: getattr(args, k) for k in ("extended_at", "lr_ceiling") if hasattr(args, k)}
    return Settings(
        arch=args.arch, width=None if library else getattr(args, "width", 64), setting=setting,
        image_size=data.image_size, method=args.method, hp=method_hp(args, setting), seed=args.seed,
        epochs=epochs, lr=args.lr, weight_decay=recipe_value(args, "weight_decay", setting),
        nesterov=recipe_value(args, "nesterov", setting), batch_size=batch,
        schedule=recipe_value(args, "schedule", setting),
        milestones=milestones(args, epochs),
        steps_per_epoch=steps, warmup_iterations=warmup, clip=clip, amp="off", channels_last=False, compile="off",
        **extension)
