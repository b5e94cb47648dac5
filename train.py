"""Train MixSKD, or a CE / Mixup / CutMix baseline, on CIFAR or ImageNet, on one device or under torchrun.

    python train.py --arch resnet18 --dataset cifar100                     # MixSKD, recipe `paper`
    python train.py --arch resnet18 --dataset cifar100 --recipe official   # the released objective
    python train.py --dataset ../shared/data/cifar10_q75_10k.npz --width 16 --epochs 90   # offline
    python train.py --arch resnet18 --dataset cifar100 --resume            # continue OUT/last.pt
    torchrun --standalone --nproc_per_node=8 train.py --arch resnet50 --dataset imagenet --data DIR

SPEC sections 5-9: one optimiser over everything the recipe trains, SGD with momentum, per-iteration
warmup, step decays (cosine on ImageNet); the headline is the backbone's top-1 at the final epoch.
A run writes into --out: metrics.jsonl (one line per epoch), last.pt (every epoch, atomically),
best.pt (best backbone top-1), deploy.pt (the backbone alone) and summary.json.
"""
import argparse
import hashlib
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from data import DATASETS, UserError, dataset_name, load_dataset, steps_per_epoch, train_batches
from eval import evaluate, load_state, model_from_checkpoint, read_checkpoint
from losses import RECIPES, TERMS, discriminators, mixskd_loss, trained_parameters
from mixup import MIX_MODES, mix_batch, mix_ce
from model import ARCHS, MixSKDNet, ResNet
from self_teacher import SelfTeacher

METHODS = ("mixskd", "ce", "mixup", "cutmix")
CLEAR_LINE = "\r\033[K"  # back to the start of the terminal line and erase it
SPEC_EPOCHS, SPEC_MILESTONES = 205, (105, 155)
# the flags whose SPEC values differ between CIFAR (section 7) and ImageNet (section 9); ImageNet's
# batch is 128 in total across processes
CIFAR_DEFAULTS = {"epochs": SPEC_EPOCHS, "weight_decay": 5e-4, "alpha": 0.4, "batch_size": 64}
IMAGENET_DEFAULTS = {"epochs": 305, "weight_decay": 1e-4, "alpha": 0.2, "batch_size": 128}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Train MixSKD (Yang et al., ECCV 2022) or a baseline on CIFAR or ImageNet. Defaults "
                    "are the SPEC's recipes: on CIFAR ResNet-18, batch 64, SGD 0.1 Nesterov, weight decay "
                    "5e-4, alpha 0.4, 205 epochs with step decays; on ImageNet batch 128 in total, no "
                    "Nesterov, weight decay 1e-4, alpha 0.2, 305 epochs with a cosine schedule.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("what to train")
    g.add_argument("--arch", default="resnet18", choices=list(ARCHS),
                   help="ResNet; the stem follows the dataset (3x3 on CIFAR, 7x7 + max-pool on ImageNet)")
    g.add_argument("--width", type=int, default=64, help="channels of the first stage (64 in the paper)")
    g.add_argument("--dataset", default="cifar100",
                   help="cifar10, cifar100 (torchvision, downloaded into --data), PATH.npz with "
                        "x_train, y_train, x_test, y_test (uint8 NHWC images), or imagenet (--data holds "
                        "train/ and val/ in ImageFolder layout)")
    g.add_argument("--data", default="./data", help="torchvision dataset root, or the ImageNet folder")
    g.add_argument("--image-size", type=int, default=224,
                   help="ImageNet crop size (Resize(size * 256 / 224) for evaluation)")
    g.add_argument("--workers", type=int, default=8, help="ImageNet DataLoader workers per process")
    g.add_argument("--method", default="mixskd", choices=METHODS,
                   help="mixskd; or a baseline on the backbone alone: ce (clean images), mixup, cutmix")
    g.add_argument("--recipe", default="paper", choices=RECIPES[:2],
                   help="mixskd objective: paper (Eq. 10, everything trained) or official (the released "
                        "scripts: on CIFAR Eq. 10', no L_mix, fixed self-teacher and discriminators; on "
                        "ImageNet Eq. 10 with fixed discriminators, SPEC section 9)")
    g.add_argument("--mix", default="mixup", choices=MIX_MODES, help="how mixskd mixes images")
    g.add_argument("--alpha", type=float, default=argparse.SUPPRESS,
                   help="lam ~ Beta(alpha, alpha) (default 0.4 on CIFAR, 0.2 on ImageNet)")
    g.add_argument("--temperature", type=float, default=3.0, help="KD temperature T")
    for term in TERMS:
        g.add_argument(f"--w-{term}", type=float, default=1.0, help=f"weight of L_{term} (0 disables it)")
    g = p.add_argument_group("optimisation (SPEC sections 7 and 9)")
    g.add_argument("--epochs", type=int, default=argparse.SUPPRESS, help="training epochs (default 205; 305 on ImageNet)")
    g.add_argument("--warmup-epochs", type=int, default=5, help="linear warmup, per iteration")
    g.add_argument("--milestones", type=int, nargs="*", default=argparse.SUPPRESS,
                   help="CIFAR: absolute epochs where lr is multiplied by 0.1 (default: 105 155, scaled "
                        "by --epochs/205 when --epochs differs); ImageNet decays by a cosine instead")
    g.add_argument("--lr", type=float, default=0.1, help="base learning rate")
    g.add_argument("--weight-decay", type=float, default=argparse.SUPPRESS,
                   help="on every trained parameter (default 5e-4; 1e-4 on ImageNet)")
    g.add_argument("--batch-size", type=int, default=argparse.SUPPRESS,
                   help="clean images per step and process; MixSKD forwards twice as many (default 64; on "
                        "ImageNet 128 divided by the number of processes)")
    g.add_argument("--seed", type=int, default=0, help="seeds initialisation, data order, augmentation, mixing")
    g = p.add_argument_group("speed")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                   help="autocast: auto = bf16 on CUDA (fp16 without bf16) and on CPUs with native bf16 "
                        "kernels (AVX512-BF16/AMX), else fp32")
    g.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"), help="auto = on for CUDA")
    g.add_argument("--compile", default="auto", choices=("auto", "off", "default", "reduce-overhead", "max-autotune"),
                   help="torch.compile the forward and loss with this mode; auto = reduce-overhead (CUDA graphs) "
                        "on CUDA, off on CPU")
    g = p.add_argument_group("files")
    g.add_argument("--out", default=None, help="run folder (default runs/<dataset>-<arch>-<method>[-<recipe>]-seed<k>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    g.add_argument("--init-from", default=None,
                   help="start from the weights of a checkpoint: ours (last/best/deploy.pt) or the released script's")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on CUDA: BatchNorm statistics over all GPUs (off, as in the released code)")
    g.add_argument("--log-every", type=int, default=100, help="steps between progress updates (each one syncs)")
    args = p.parse_args(argv)

    imagenet = args.dataset == "imagenet"
    for key, value in (IMAGENET_DEFAULTS if imagenet else CIFAR_DEFAULTS).items():
        if not hasattr(args, key):
            setattr(args, key, value // int(os.environ.get("WORLD_SIZE", 1)) if key == "batch_size" and imagenet
                    else value)
    args.stem = "imagenet" if imagenet else "cifar"
    args.schedule = "cosine" if imagenet else "step"
    args.nesterov = not imagenet
    # the objective: the released ImageNet script optimises L_mix, its CIFAR script does not
    args.loss_recipe = "official-imagenet" if imagenet and args.recipe == "official" else args.recipe
    if not args.alpha > 0:
        p.error(f"--alpha must be > 0, got {args.alpha}")
    if args.batch_size < 2:
        p.error(f"--batch-size must be at least 2 (mixup pairs images, BatchNorm needs a batch), got {args.batch_size}")
    if args.width < 1 or args.epochs < 1 or args.warmup_epochs < 0 or args.log_every < 1:
        p.error("--width, --epochs and --log-every must be positive and --warmup-epochs non-negative")
    if not all(np.isfinite(getattr(args, f"w_{t}")) and getattr(args, f"w_{t}") >= 0 for t in TERMS):
        p.error("loss weights must be finite and non-negative")
    if args.dataset not in DATASETS and not args.dataset.endswith(".npz"):
        p.error(f"unknown dataset {args.dataset!r}: use cifar10, cifar100, imagenet or the path of an .npz file")
    if not hasattr(args, "milestones"):
        args.milestones = [round(m * args.epochs / SPEC_EPOCHS) for m in SPEC_MILESTONES]
    if args.out is None:
        recipe = f"-{args.recipe}" if args.method == "mixskd" else ""
        args.out = os.path.join("runs", f"{dataset_name(args.dataset)}-{args.arch}-{args.method}{recipe}-seed{args.seed}")
    return args


def lr_at(step, steps_per_epoch, args):
    """SPEC section 7: lr_i = lr (i + 1) / (warmup iterations) during warmup, then lr times 0.1 for
    every milestone epoch reached. SPEC section 9 (ImageNet): after the warmup, per epoch,
    lr 0.5 (1 + cos(pi (epoch - warmup) / (epochs - warmup)))."""
    warmup = args.warmup_epochs * steps_per_epoch
    if step < warmup:
        return args.lr * (step + 1) / warmup
    epoch = step // steps_per_epoch
    if args.schedule == "cosine":
        return args.lr * 0.5 * (1 + math.cos(math.pi * (epoch - args.warmup_epochs) / (args.epochs - args.warmup_epochs)))
    return args.lr * 0.1 ** sum(epoch >= m for m in args.milestones)


def speed_settings(args, device):
    """Resolve the `auto` speed flags for a device: (autocast dtype or None, memory format); sets
    args.compile. On an H100 these take the ResNet-18 MixSKD step from 38 ms to 7.7 ms (bench.py)."""
    if args.compile == "auto":  # CUDA graphs with DDP's gradient hooks are unverified here: plain compile there
        distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
        args.compile = "off" if device.type != "cuda" else "default" if distributed else "reduce-overhead"
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and device.type == "cuda")
    return autocast_dtype(args.amp, device), torch.channels_last if channels_last else torch.contiguous_format


def mixed_precision(dtype, device):
    """(GradScaler, autocast context) for an autocast dtype; the scaler works only for fp16."""
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return scaler, torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def autocast_dtype(choice, device):
    """auto: bf16 on CUDA (fp16 where the GPU lacks bf16); on a CPU, bf16 only where oneDNN reports
    native bf16 kernels (AVX512-BF16 or AMX: 2.0x the fp32 step on a 2-core EPYC, see bench.py),
    else fp32, since emulated bf16 is slower than fp32."""
    if choice == "off":
        return None
    if choice == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    if choice == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs CUDA; on CPU use --amp bf16 or off")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[choice]


# ----------------------------------------------------------------------------- setup


def build(args, num_classes, device, memory_format):
    """The model, self-teacher and discriminators (MixSKD only), and one SGD over what the recipe trains."""
    stem_relu = not (args.method == "mixskd" and args.loss_recipe == "official")  # SPEC section 6, item 5
    if args.method == "mixskd":
        model = MixSKDNet(args.arch, num_classes, args.width, stem_relu, args.stem)
        channels = model.backbone.feature_channels
        teacher, discs = SelfTeacher(channels, num_classes), discriminators(channels)
        params = trained_parameters(args.loss_recipe, model, teacher, discs)
        # what the recipe does not train needs no .grad (official's would pile up, never zeroed)
        trained = {id(p) for p in params}
        for module in (teacher, discs):
            for q in module.parameters():
                q.requires_grad_(id(q) in trained)
        teacher.to(device, memory_format=memory_format)
        discs.to(device)
    else:
        model = ResNet(args.arch, num_classes, args.width, stem_relu, args.stem)
        teacher = discs = None
        params = list(model.parameters())
    model.to(device, memory_format=memory_format)
    # fused on CUDA: 0.5 ms per step for the 42M parameters of ResNet-18 MixSKD on an H100, against
    # 1.5 ms for foreach; foreach on CPU, one multi-tensor kernel instead of a loop over tensors
    cuda = device.type == "cuda"
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, nesterov=args.nesterov, weight_decay=args.weight_decay,
                          fused=cuda or None, foreach=not cuda or None)
    return model, teacher, discs, opt


class Objective(nn.Module):
    """Model, self-teacher and discriminators under one module whose forward is the method's loss.

    One module, so that one DistributedDataParallel wrapper synchronises every trained gradient (the
    self-teacher's and the discriminators' too), and torch.compile sees forward and losses as one graph.
    forward(inputs, y, lam, perm) -> (total, stats), stats = [total, *TERMS, correct] on the device;
    inputs: cat([x, x_mix]) for mixskd, x for ce, x_mix for mixup/cutmix; lam a 0-d device tensor.
    """

    def __init__(self, args, model, teacher=None, discs=None):
        super().__init__()
        self.method, self.recipe, self.temperature = args.method, args.loss_recipe, args.temperature
        self.weights = {t: getattr(args, f"w_{t}") for t in TERMS}
        self.model, self.teacher, self.discs = model, teacher, discs

    def forward(self, inputs, y, lam, perm):
        batch = y.shape[0]
        zero = torch.zeros((), device=y.device)
        if self.method == "mixskd":
            feats, logits = self.model(inputs)
            total, terms = mixskd_loss(feats, logits, y, lam, perm, self.teacher, self.discs, self.recipe,
                                       self.weights, self.temperature)
            correct = (logits[-1][:batch].argmax(1) == y).sum()
        elif self.method == "ce":
            logits = self.model(inputs)
            total = F.cross_entropy(logits, y)
            terms = {"ce": total.detach()}
            correct = (logits.argmax(1) == y).sum()
        else:  # mixup / cutmix baseline: the backbone on mixed images only, mixed CE (Eq. 3)
            logits = self.model(inputs)
            total = mix_ce(logits, y, lam, perm)
            terms = {"mix": total.detach()}
            pred = logits.argmax(1)
            correct = lam * (pred == y).sum() + (1 - lam) * (pred == y[perm]).sum()
        stats = [total.detach().float()] + [terms.get(t, zero).float() for t in TERMS] + [correct.float()]
        return total, torch.stack(stats)


def make_loss_fn(args, model, teacher, discs, device=None, distributed=False):
    """The Objective of this run, wrapped in DDP under torchrun and compiled when --compile asks."""
    loss_fn = Objective(args, model, teacher, discs)
    if distributed:
        # a loss weight of 0 leaves parameters without gradient (the discriminators under --w-adv 0)
        unused = any(getattr(args, f"w_{t}") == 0 for t in TERMS)
        loss_fn = DistributedDataParallel(loss_fn, device_ids=[device] if device.type == "cuda" else None,
                                          find_unused_parameters=unused)
    if args.compile == "off":
        return loss_fn
    # where a frame cannot be compiled (no Triton, no C++ compiler, an unsupported op), run it eager
    # with a warning instead of stopping the run
    torch._dynamo.config.suppress_errors = True
    return torch.compile(loss_fn, mode=None if args.compile == "default" else args.compile)


def model_inputs(args, x):
    """Draw this step's pairing and build the model's input: (inputs, lam, perm), lam a float.
    mixskd: cat([x, x_mix]), one forward so BatchNorm statistics cover both (SPEC section 2);
    ce: x; mixup / cutmix: x_mix. Never mutates x."""
    if args.method == "ce":
        return x, None, None
    x_mix, perm, lam = mix_batch(x, args.alpha, args.mix if args.method == "mixskd" else args.method)
    return (torch.cat([x, x_mix]) if args.method == "mixskd" else x_mix), lam, perm


def train_step(args, loss_fn, opt, scaler, autocast, memory_format, x, y):
    """One optimisation step on a clean batch (x, y); returns loss_fn's stats, never syncing the host.

    Mixing happens here, outside any compiled region: lam is drawn on the host and handed over as a
    0-d device tensor (torch.full launches a fill, no copy), so a new lam neither recompiles nor syncs.
    """
    inputs, lam, perm = model_inputs(args, x)
    if args.compile in ("reduce-overhead", "max-autotune"):
        torch.compiler.cudagraph_mark_step_begin()  # a new step: last step's graph outputs are consumed
    if lam is not None:
        lam = torch.full((), lam, device=x.device)
    with autocast:
        total, stats = loss_fn(inputs.contiguous(memory_format=memory_format), y, lam, perm)
    opt.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    scaler.step(opt)
    scaler.update()
    return stats


def rng_state(device):
    """Every generator the step draws from, as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "python": random.getstate()}


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


def save_atomic(obj, path):
    """Write to a temporary file, flush it to disk, then rename: a crash never leaves a torn file."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(obj, path):
    with open(f"{path}.tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(f"{path}.tmp", path)


def check_writable(out, rank=0):
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{rank}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to output folder {out} ({e.strerror}): choose another --out") from None


def init_from(path, model, teacher):
    """Copy the weights of any checkpoint eval.py reads (ours or the released script's) into model."""
    source, source_teacher, _ = model_from_checkpoint(read_checkpoint(path), path)
    if isinstance(model, ResNet) and isinstance(source, MixSKDNet):
        source = source.backbone
    target = model.backbone if isinstance(model, MixSKDNet) and isinstance(source, ResNet) else model
    load_state(target, source.state_dict(), f"--init-from {path}")
    if teacher is not None and source_teacher is not None:
        load_state(teacher, source_teacher.state_dict(), f"--init-from {path} (self-teacher)")


def resume(path, args, meta, model, teacher, discs, opt, scaler, device, rank):
    """Load last.pt into everything; returns (first epoch to run, best-so-far record)."""
    ckpt = read_checkpoint(path)
    if "meta" not in ckpt or "optimizer" not in ckpt:
        raise UserError(f"{path} is not a training checkpoint of this project: --resume needs a last.pt")
    # the dataset by name: an .npz may have moved since
    saved = {**ckpt["meta"], "dataset": dataset_name(ckpt["meta"]["dataset"])}
    current = {**meta, "dataset": dataset_name(meta["dataset"])}
    for key in ("arch", "width", "num_classes", "method", "recipe", "stem_relu", "stem", "seed", "dataset"):
        if saved.get(key) != current[key]:
            raise UserError(f"{path} was trained with {key}={saved.get(key)!r}, this run has {current[key]!r}: "
                            f"pass the same arguments to resume, or another --out for a new run")
    load_state(model, ckpt["model"], f"checkpoint {path}")
    for module, key in ((teacher, "self_teacher"), (discs, "discriminators")):
        if module is not None:
            load_state(module, ckpt[key], f"checkpoint {path} ({key})")
    opt.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    states = ckpt["rng"]  # one per rank; a run resumed on more ranks gives the extra ones rank 0's
    set_rng_state(states[rank] if rank < len(states) else states[0], device)
    return ckpt["epoch"] + 1, ckpt["best"]


def read_metrics(path, before_epoch):
    """metrics.jsonl lines of epochs < before_epoch: on resume, later lines belong to lost work."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line for line in f if json.loads(line)["epoch"] < before_epoch]


def check_finite(loss, epoch, last_path):
    """Stop on a non-finite loss before it reaches a checkpoint, naming the term."""
    bad = [name for name, value in loss.items() if not np.isfinite(value)]
    if bad:
        kept = f"{last_path} from the previous epoch is kept" if os.path.exists(last_path) else "nothing was saved"
        terms = [t for t in bad if t != "total"] or bad
        raise UserError(f"non-finite loss in epoch {epoch} (L_{', L_'.join(terms)}): stopped, {kept}; "
                        f"lower --lr or try --amp off")


def count(module):
    """Parameters that are trained (official recipes freeze the self-teacher and/or discriminators)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad) if module is not None else 0


def setup_distributed(args):
    """(rank, world size, device). Under torchrun (WORLD_SIZE, RANK, LOCAL_RANK set) join the process
    group: NCCL on CUDA, one GPU per process; gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if world == 1:
        return 0, 1, torch.device(args.device or ("cuda" if cuda else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = torch.device("cpu")
    if cuda:
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:
            raise UserError(f"torchrun started more processes on this node than its {gpus} GPU(s): "
                            f"use --nproc_per_node={gpus} or fewer")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif args.sync_bn:
        raise UserError("--sync-bn needs CUDA: SyncBatchNorm has no CPU kernels")
    dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, device


def all_ranks(value, world):
    """[value of rank 0, value of rank 1, ...] on every rank."""
    if world == 1:
        return [value]
    values = [None] * world
    dist.all_gather_object(values, value)
    return values


def parameter_digest(*modules):
    """sha256 of every parameter's bytes: equal on all ranks exactly when the replicas agree."""
    h = hashlib.sha256()
    for module in modules:
        for p in module.parameters() if module is not None else ():
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args)
    try:
        run(args, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args, rank, world, device):
    main_process = rank == 0  # only rank 0 prints and writes files
    log = print if main_process else lambda *a, **k: None
    dtype, memory_format = speed_settings(args, device)
    channels_last = memory_format == torch.channels_last
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
    last_path = os.path.join(args.out, "last.pt")
    if os.path.exists(last_path) and not args.resume:
        raise UserError(f"{args.out} already holds a run (last.pt): pass --resume to continue it, or another --out")
    if args.resume and not os.path.exists(last_path):
        raise UserError(f"--resume: no {last_path} to continue from")

    torch.manual_seed(args.seed)  # the same initialisation on every rank (DDP also broadcasts rank 0's)
    np.random.seed(args.seed)
    random.seed(args.seed)
    data = load_dataset(args.dataset, args.data, device, args.image_size, args.workers)
    check_writable(args.out, rank)
    model, teacher, discs, opt = build(args, data.num_classes, device, memory_format)
    if args.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # each rank draws its own lam and perm for its own batch
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    random.seed(args.seed + rank)
    scaler, autocast = mixed_precision(dtype, device)
    backbone = model.backbone if isinstance(model, MixSKDNet) else model
    meta = {"arch": args.arch, "num_classes": data.num_classes, "width": args.width,
            "stem_relu": backbone.stem_relu, "stem": args.stem, "method": args.method, "recipe": args.recipe,
            "dataset": args.dataset, "image_size": args.image_size, "seed": args.seed,
            "mean": list(data.mean), "std": list(data.std)}

    start_epoch, best = 0, {"epoch": -1, "top1": -1.0, "released": -1.0, "released_head": None, "released_epoch": -1}
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if args.resume:
        start_epoch, best = resume(last_path, args, meta, model, teacher, discs, opt, scaler, device, rank)
    elif args.init_from:
        init_from(args.init_from, model, teacher)
    loss_fn = make_loss_fn(args, model, teacher, discs, device, distributed=world > 1)
    if main_process:
        kept = read_metrics(metrics_path, start_epoch) if args.resume else []
        with open(metrics_path, "w") as f:
            f.writelines(kept)

    steps = steps_per_epoch(data, args.batch_size, world)
    if steps == 0:
        raise UserError(f"--batch-size {args.batch_size} exceeds the {data.n_train // world} training "
                        f"images of each of the {world} process(es)")
    images_per_step = args.batch_size * world
    if args.dataset == "imagenet" and images_per_step != 128:
        log(f"note: the global batch is {images_per_step}, the SPEC's ImageNet recipe uses 128 in total")
    logged = TERMS if args.method == "mixskd" else ("ce",) if args.method == "ce" else ("mix",)
    n_train = count(model) + count(teacher) + count(discs)
    log(f"{args.method}{' ' + args.recipe if args.method == 'mixskd' else ''} {args.arch} width {args.width} "
        f"on {data.name} ({data.n_train} train, {data.n_test} test, {data.num_classes} classes) | "
        f"{world} x {device.type} amp {dtype} channels_last {channels_last} compile {args.compile} | batch "
        f"{args.batch_size} per process, {images_per_step} in all | {n_train:,} trained params, "
        f"{count(backbone):,} deployed | epochs {start_epoch}..{args.epochs - 1}, "
        f"{'milestones ' + str(args.milestones) if args.schedule == 'step' else 'cosine schedule'}", flush=True)
    # a terminal gets one live line per epoch; a log file a progress line at most once a minute
    live = main_process and sys.stdout.isatty()
    run_start = last_progress = time.time()

    for epoch in range(start_epoch, args.epochs):
        model.train()
        sums = torch.zeros(len(TERMS) + 2, device=device)
        epoch_start = time.time()
        for i, (x, y) in enumerate(train_batches(data, args.batch_size, args.seed, epoch, rank, world)):
            lr = lr_at(epoch * steps + i, steps, args)
            for group in opt.param_groups:
                group["lr"] = lr
            sums += train_step(args, loss_fn, opt, scaler, autocast, memory_format, x, y)
            if (i + 1) % args.log_every == 0:  # the only host sync inside an epoch
                total = sums[0].clone()
                if world > 1:
                    dist.all_reduce(total)  # every rank sees the same value, so all stop together
                check_finite({"total": total.item()}, epoch, last_path)
                if live or (main_process and time.time() - last_progress > 60):
                    done, elapsed, last_progress = i + 1, time.time() - epoch_start, time.time()
                    eta = elapsed / done * (steps - done) + (args.epochs - epoch - 1) * steps * elapsed / done
                    print(f"{CLEAR_LINE if live else ''}epoch {epoch}/{args.epochs} step {done}/{steps} "
                          f"loss {total.item() / done / world:.4f} lr {lr:.4f} {done * images_per_step / elapsed:.0f} "
                          f"img/s ETA {eta / 60:.1f} min", end="" if live else "\n", flush=True)

        if world > 1:
            dist.all_reduce(sums)  # training metrics over every rank's shard
        means = (sums / (steps * world)).tolist()
        epoch_time = time.time() - epoch_start
        loss = {"total": means[0], **{t: means[1 + TERMS.index(t)] for t in logged}}
        check_finite(loss, epoch, last_path)
        rng = all_ranks(rng_state(device), world)
        if not main_process:
            continue
        # rank 0 evaluates the whole test set with its weights and BatchNorm statistics, the ones it
        # saves, so eval.py on the checkpoint reproduces these numbers
        test = evaluate(model, teacher, data, channels_last=channels_last)
        record = {"epoch": epoch, "lr": lr, "loss": loss, "train_top1": 100.0 * means[-1] / args.batch_size,
                  "test": test, "epoch_time": epoch_time, "img_per_s": steps * images_per_step / epoch_time}
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

        top1 = test["backbone"]["top1"]
        improved = top1 > best["top1"]
        if improved:
            best.update(epoch=epoch, top1=top1)
        head, value = max(((h, m["top1"]) for h, m in test.items() if h != "self_teacher"), key=lambda hv: hv[1])
        if value > best["released"]:
            best.update(released=value, released_head=head, released_epoch=epoch)
        ckpt = {"meta": meta, "args": vars(args), "epoch": epoch, "best": best,
                "model": model.state_dict(),
                "self_teacher": teacher.state_dict() if teacher is not None else None,
                "discriminators": discs.state_dict() if discs is not None else None,
                "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "rng": rng}
        save_atomic(ckpt, last_path)
        if improved:
            save_atomic(ckpt, os.path.join(args.out, "best.pt"))
        heads = " ".join(f"{h} {m['top1']:.2f}" for h, m in test.items() if h != "backbone")
        print(f"{CLEAR_LINE if live else ''}epoch {epoch}/{args.epochs} loss {loss['total']:.4f} "
              f"train {record['train_top1']:.2f} | test backbone {top1:.2f} {heads} | "
              f"{epoch_time:.1f}s {record['img_per_s']:.0f} img/s", flush=True)

    digests = all_ranks(parameter_digest(model, teacher, discs), world)
    if not main_process:
        return
    records = [json.loads(line) for line in read_metrics(metrics_path, args.epochs)]
    final = records[-1]
    save_atomic({"meta": meta, "backbone": backbone.state_dict()}, os.path.join(args.out, "deploy.pt"))
    summary = {
        "headline_final_backbone_top1": final["test"]["backbone"]["top1"],
        "final_epoch": final["epoch"],
        "final_test": final["test"],
        "best_backbone_top1": best["top1"],
        "best_backbone_epoch": best["epoch"],
        "released_code_metric_max_over_heads_and_epochs": best["released"],
        "released_code_metric_head": best["released_head"],
        "released_code_metric_epoch": best["released_epoch"],
        "trained_params": n_train,
        "deployed_params": count(backbone),
        "train_time_s": sum(r["epoch_time"] for r in records),
        "wall_time_s_this_process": time.time() - run_start,
        "processes": world,
        "parameter_sha256_per_rank": digests,
        "args": vars(args),
    }
    write_json_atomic(summary, os.path.join(args.out, "summary.json"))
    print(f"final backbone top-1 {summary['headline_final_backbone_top1']:.2f} (headline) | best {best['top1']:.2f} "
          f"at epoch {best['epoch']} | released code's metric {best['released']:.2f} ({best['released_head']}, "
          f"epoch {best['released_epoch']}, max over heads and epochs on the test set) | {args.out}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
