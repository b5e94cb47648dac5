"""Train MixSKD, or a CE / Mixup / CutMix baseline, on CIFAR or ImageNet, on one device or under torchrun.

    python train.py --arch resnet18 --dataset cifar100                     # MixSKD, recipe `paper`
    python train.py --arch resnet18 --dataset cifar100 --recipe official   # the released objective
    python train.py --dataset ../shared/data/cifar10_q75_10k.npz --width 16 --epochs 90 --warmup-epochs 5
    python train.py --arch resnet18 --dataset cifar100 --resume            # continue OUT/last.pt
    torchrun --standalone --nproc_per_node=8 train.py --arch resnet50 --dataset imagenet --data DIR

Top to bottom: arguments; the method (schedule, objective, optimiser; SPEC sections 5-9); the run (setup,
one step, the loop, the end of an epoch, the summary). Plumbing: runtime.py, checkpoints.py. A run writes
into --out: metrics.jsonl (a line per epoch), last.pt (every epoch, atomically), best.pt (best backbone
top-1), deploy.pt (the backbone alone) and summary.json (the headline: final backbone top-1).
"""
import argparse
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

import checkpoints
import report
import runtime
from data import DATASETS, UserError, dataset_name, load_dataset, run_cli, steps_per_epoch, train_batches
from eval import evaluate
from losses import RECIPES, TERMS, BaselineObjective, MixSKDObjective, discriminators
from mixup import MIX_MODES, mix_batch
from model import ARCHS, check_arch, network
from self_teacher import SelfTeacher

METHODS = ("mixskd", "ce", "mixup", "cutmix")
CLEAR_LINE = "\r\033[K"  # back to the start of the terminal line and erase it
SPEC_EPOCHS, SPEC_MILESTONES = 205, (105, 155)
# the flags whose SPEC values differ between CIFAR (section 7) and ImageNet (section 9); ImageNet's
# batch is 128 in total across processes. The CutMix baseline draws lam with alpha 1.0 (section 7).
CIFAR_DEFAULTS = {"epochs": SPEC_EPOCHS, "weight_decay": 5e-4, "alpha": 0.4, "batch_size": 64}
IMAGENET_DEFAULTS = {"epochs": 305, "weight_decay": 1e-4, "alpha": 0.2, "batch_size": 128}

# ----------------------------------------------------------------------------- arguments

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # a default where there is one to show; None and False are not
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


parser = argparse.ArgumentParser(formatter_class=HelpFormatter, description="Train "
                                 "MixSKD (Yang et al., ECCV 2022) or a baseline on CIFAR or ImageNet with the SPEC's "
                                 "recipes (sections 7 and 9) as defaults.")
g = parser.add_argument_group("what to train")
g.add_argument("--arch", default="resnet18", help=f"{', '.join(ARCHS)} (the stem follows the dataset: 3x3 on "
               "CIFAR, 7x7 + max-pool on ImageNet), or torchvision:NAME, a torchvision classifier of a family that "
               "layouts.TORCHVISION_FAMILIES lists (ResNet, ResNeXt, Wide-ResNet, RegNet, ConvNeXt, MobileNetV2/V3, "
               "EfficientNet, DenseNet, ViT, Swin), or timm:NAME, one of layouts.TIMM_FAMILIES (ResNet, ResNeXt, "
               "ConvNeXt, EfficientNet, MobileNetV3/V4, RegNet, ViT, DeiT, Swin; needs timm); transformers are "
               "built for the data's image size")
g.add_argument("--width", type=int, default=64, help="channels of our ResNets' first stage (64 in the paper)")
g.add_argument("--dataset", default="cifar100", help="cifar10, cifar100 (torchvision, downloaded into --data), "
               "PATH.npz with x_train, y_train, x_test, y_test (uint8 NHWC images), or imagenet (--data holds train/ "
               "and val/ in ImageFolder layout)")
g.add_argument("--data", default="./data", help="torchvision dataset root, or the ImageNet folder")
g.add_argument("--image-size", type=int, default=224, help="ImageNet crop size (Resize(size * 256 / 224) to test)")
g.add_argument("--workers", type=int, default=8, help="ImageNet DataLoader workers per process")
g.add_argument("--method", default="mixskd", choices=METHODS,
               help="mixskd; or a baseline on the backbone alone: ce (clean images), mixup, cutmix")
g.add_argument("--recipe", default="paper", choices=RECIPES[:2],
               help="mixskd objective: paper (Eq. (10), everything trained) or official (the released scripts: on "
                    "CIFAR Eq. (10'), no L_mix, fixed self-teacher and discriminators; on ImageNet Eq. (10) with "
                    "fixed discriminators, SPEC section 9)")
g.add_argument("--mix", default="mixup", choices=MIX_MODES, help="how mixskd mixes images")
g.add_argument("--alpha", type=float, default=argparse.SUPPRESS,
               help="lam ~ Beta(alpha, alpha) (default 0.4 on CIFAR, 0.2 on ImageNet; 1.0 for --method cutmix)")
g.add_argument("--temperature", type=float, default=3.0, help="KD temperature T")
for term in TERMS:
    g.add_argument(f"--w-{term}", type=float, default=1.0, help=f"weight of L_{term} (0 disables it)")
g = parser.add_argument_group("optimisation (SPEC sections 7 and 9)")
g.add_argument("--epochs", type=int, default=argparse.SUPPRESS, help="training epochs (default 205; 305 on ImageNet)")
g.add_argument("--warmup-epochs", type=int, default=argparse.SUPPRESS, help="linear warmup, per iteration (default "
               "5, times --epochs/205 (305 on ImageNet) when --epochs is shorter)")
g.add_argument("--milestones", type=int, nargs="*", default=argparse.SUPPRESS,
               help="CIFAR: absolute epochs where lr is multiplied by 0.1 (default: 105 155, scaled by --epochs/205 "
                    "when --epochs differs); ImageNet decays by a cosine instead")
g.add_argument("--lr", type=float, default=0.1, help="base learning rate")
g.add_argument("--weight-decay", type=float, default=argparse.SUPPRESS,
               help="on every trained parameter (default 5e-4; 1e-4 on ImageNet)")
g.add_argument("--batch-size", type=int, default=argparse.SUPPRESS, help="clean images per step and process; "
               "MixSKD forwards twice as many (default 64; on ImageNet 128 divided by the number of processes)")
g.add_argument("--seed", type=int, default=0, help="seeds initialisation, data order, augmentation, mixing")
g = parser.add_argument_group("speed")
g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
g.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"), help="autocast: auto = bf16 on "
               "CUDA (fp16 without bf16) and on CPUs with native bf16 kernels (AVX512-BF16/AMX), else fp32")
g.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"), help="auto = on for CUDA")
g.add_argument("--compile", default="auto", choices=("auto", "off", "default", "reduce-overhead", "max-autotune"),
               help="torch.compile forward and loss; auto = reduce-overhead (CUDA graphs) on CUDA, off on CPU")
g = parser.add_argument_group("files")
g.add_argument("--out", default=None, help="run folder (default runs/<dataset>-<arch>-<method>[-<recipe>]-seed<k>)")
g.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
g.add_argument("--extend", action="store_true",
               help="with --resume: continue a run to another --epochs than it was started with (new schedule)")
g.add_argument("--init-from", default=None,
               help="start from the weights of a checkpoint: ours (last/best/deploy.pt), the released script's, or a "
                    "state dict of the backbone (torchvision's or timm's; a torch file or .safetensors)")
g.add_argument("--sync-bn", action="store_true",
               help="under torchrun on CUDA: BatchNorm statistics over all GPUs (off, as in the released code)")
g.add_argument("--log-every", type=int, default=100, help="steps between progress updates (each one syncs)")


def parse_args(argv=None):
    """The command line, with the dataset's SPEC defaults filled in and every value checked."""
    args = parser.parse_args(argv)
    imagenet = args.dataset == "imagenet"
    spec = IMAGENET_DEFAULTS if imagenet else CIFAR_DEFAULTS
    for key, value in {**spec, **({"alpha": 1.0} if args.method == "cutmix" else {})}.items():
        if not hasattr(args, key):
            setattr(args, key, value // runtime.world_size() if key == "batch_size" and imagenet else value)
    args.stem, args.schedule, args.nesterov = ("imagenet", "cosine", False) if imagenet else ("cifar", "step", True)
    if not hasattr(args, "warmup_epochs"):  # the SPEC's 5 warmup epochs, shortened with a shorter run
        args.warmup_epochs = round(5 * min(args.epochs, spec["epochs"]) / spec["epochs"])
    if not args.alpha > 0:
        parser.error(f"--alpha must be > 0, got {args.alpha}")
    if args.batch_size < 2:
        parser.error(f"--batch-size must be at least 2 (mixup pairs images, BatchNorm needs a batch), "
                     f"got {args.batch_size}")
    if args.width < 1 or args.epochs < 1 or args.warmup_epochs < 0 or args.log_every < 1:
        parser.error("--width, --epochs and --log-every must be positive and --warmup-epochs non-negative")
    try:
        check_arch(args.arch)
    except ValueError as e:
        parser.error(str(e))
    if not all(np.isfinite(getattr(args, f"w_{t}")) and getattr(args, f"w_{t}") >= 0 for t in TERMS):
        parser.error("loss weights must be finite and non-negative")
    if args.dataset not in DATASETS and not args.dataset.endswith(".npz"):
        parser.error(f"unknown dataset {args.dataset!r}: use cifar10, cifar100, imagenet or the path of an .npz file")
    if not hasattr(args, "milestones"):
        args.milestones = sorted({round(m * args.epochs / SPEC_EPOCHS) for m in SPEC_MILESTONES})
        if not imagenet and len(args.milestones) == 1 and args.milestones[0] < args.epochs:
            parser.error(f"--epochs {args.epochs} is too short to scale the SPEC's decays at epochs 105 and 155 "
                         f"(both fall on epoch {args.milestones[0]}): pass --milestones")
    recipe = f"-{args.recipe}" if args.method == "mixskd" else ""
    arch = args.arch.replace(":", "-")
    args.out = args.out or f"runs/{dataset_name(args.dataset)}-{arch}-{args.method}{recipe}-seed{args.seed}"
    return args


# ----------------------------------------------------------------------------- the method: schedule, objective


def lr_at(step, steps_per_epoch, args):
    """SPEC section 7: lr_i = lr (i + 1) / (warmup iterations) during warmup, then lr times 0.1 for
    every milestone epoch reached. SPEC section 9 (ImageNet): after the warmup, per epoch,
    lr 0.5 (1 + cos(pi (epoch - warmup) / (epochs - warmup)))."""
    warmup = args.warmup_epochs * steps_per_epoch
    if step < warmup:
        return args.lr * (step + 1) / warmup
    epoch = step // steps_per_epoch
    if args.schedule == "cosine":
        progress = (epoch - args.warmup_epochs) / (args.epochs - args.warmup_epochs)
        return args.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return args.lr * 0.1 ** sum(epoch >= m for m in args.milestones)


def build(args, num_classes, device, memory_format, image_size=None):
    """The run's objective (the network; for MixSKD also the self-teacher and the discriminators) and
    one SGD over what it trains (SPEC sections 7 and 9). image_size: the side of the images, for the
    transformers that are built for one input size."""
    # the released ImageNet script optimises L_mix and keeps the stem ReLU, its CIFAR script does neither
    recipe = "official-imagenet" if args.recipe == "official" and args.dataset == "imagenet" else args.recipe
    stem_relu = not (args.method == "mixskd" and recipe == "official")  # SPEC section 6, item 5
    net = network(args.arch, num_classes, args.width, stem_relu, args.stem, args.method == "mixskd", image_size)
    if args.method == "mixskd":
        channels, heads = net.feature_channels, len(net.branches) + 1
        objective = MixSKDObjective(net, SelfTeacher(channels, num_classes, heads), discriminators(channels, heads),
                                    recipe, {t: getattr(args, f"w_{t}") for t in TERMS}, args.temperature)
    else:
        objective = BaselineObjective(net)
    params = [p for p in objective.parameters() if p.requires_grad]  # what the recipe trains
    objective.to(device, memory_format=memory_format)
    # fused on CUDA: one kernel for every parameter; foreach on CPU: one multi-tensor op, not a loop
    cuda = device.type == "cuda"
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, nesterov=args.nesterov, weight_decay=args.weight_decay,
                          fused=cuda or None, foreach=not cuda or None)
    return objective, opt


# ----------------------------------------------------------------------------- the run


def main(argv=None):
    args = parse_args(argv)
    if complete := runtime.check_run_folder(args):  # --resume of a finished run: say so and change nothing
        return print(complete)
    try:
        with runtime.processes(args) as (rank, world, device), runtime.cleanup_failed_start(args.out, rank):
            train(setup(args, rank, world, device))
    except KeyboardInterrupt:  # one line, not a traceback: where the run stands and how to resume it
        sys.exit(runtime.interrupted(args, sys.argv[1:] if argv is None else argv))


def setup(args, rank, world, device):
    """Everything that runs once: data, objective, optimiser, resume or init-from, metrics file, header."""
    run = SimpleNamespace(args=args, rank=rank, world=world, device=device, main=rank == 0, best={"top1": -1.0},
                          start_epoch=0, last=os.path.join(args.out, "last.pt"),
                          metrics=os.path.join(args.out, "metrics.jsonl"), speed=runtime.speed_settings(args, device))
    runtime.seed_all(args.seed)  # the same initialisation on every rank (DDP also broadcasts rank 0's)
    run.data = data = load_dataset(args.dataset, args.data, device, args.image_size, args.workers)
    runtime.check_writable(args.out, rank)
    run.objective, run.opt = build(args, data.num_classes, device, run.speed.memory_format, data.image_size)
    runtime.seed_all(args.seed + rank)  # each rank draws its own lam and perm for its own batch
    net, teacher, discs = (getattr(run.objective, name, None) for name in ("net", "self_teacher", "discs"))
    run.backbone = getattr(net, "backbone", net)
    run.meta = checkpoints.run_meta(args, data, run.backbone)
    if args.resume:
        run.start_epoch, run.best = checkpoints.resume(run.last, args, run.meta, net, teacher, discs, run.opt,
                                                       run.speed.scaler, device, rank)
    elif args.init_from:
        checkpoints.init_from(args.init_from, net, teacher)
    run.step_fn = runtime.wrap(run.objective, args, device, world)
    if run.main:
        checkpoints.restart_metrics(run.metrics, run.start_epoch)
    run.steps = steps_per_epoch(data, args.batch_size, world)
    # the header line: what trains, on what, how fast, for how long
    run.images = args.batch_size * world  # clean images per step
    run.n_trained = sum(p.numel() for p in run.objective.parameters() if p.requires_grad)
    run.n_deployed = sum(p.numel() for p in run.backbone.parameters())
    if not run.main:
        return run
    spec_batch = " (the SPEC: 128 on ImageNet)" if args.dataset == "imagenet" and run.images != 128 else ""
    print(f"{args.method}{' ' + args.recipe if args.method == 'mixskd' else ''}"
          f"{'' if args.method == 'ce' else f' alpha {args.alpha}'} {args.arch}"
          f"{'' if ':' in args.arch else f' width {args.width}'} on {data.name} ({data.n_train} train, "
          f"{data.n_test} test, {data.num_classes} classes) | {run.world} x {run.device.type} amp {run.speed.amp} "
          f"channels_last {run.speed.memory_format == torch.channels_last} compile {args.compile} | batch "
          f"{args.batch_size} per process, {run.images} in all{spec_batch} | {run.n_trained:,} trained params, "
          f"{run.n_deployed:,} deployed | epochs {run.start_epoch + 1}..{args.epochs}, "
          f"{'milestones ' + str(args.milestones) if args.schedule == 'step' else 'cosine schedule'}", flush=True)
    return run


def train_step(objective, opt, speed, x, y, args):
    """One step on a clean batch (x, y): mix (Eq. (1)), forward and loss in one call of the objective
    (losses.MixSKDObjective: the network, then mixskd_loss, Eqs. (5)-(10); or a baseline's), backward, SGD.
    Returns loss, terms and correct predictions on the device, never waiting for it; lam goes in as a 0-d
    device tensor, so a new lam neither recompiles nor syncs."""
    inputs, lam, perm = x, None, None
    if args.method != "ce":
        x_mix, perm, lam = mix_batch(x, args.alpha, args.mix if args.method == "mixskd" else args.method)
        # MixSKD forwards clean and mixed images in one pass, so BatchNorm sees both (SPEC section 2)
        inputs = torch.cat([x, x_mix]) if args.method == "mixskd" else x_mix
        lam = torch.full((), lam, device=x.device)
    if speed.cudagraphs:
        torch.compiler.cudagraph_mark_step_begin()  # a new step: last step's graph outputs are consumed
    with speed.autocast:
        total, terms, logits = objective(inputs.contiguous(memory_format=speed.memory_format), y, lam, perm)
    opt.zero_grad(set_to_none=True)
    speed.scaler.scale(total).backward()
    speed.scaler.step(opt)
    speed.scaler.update()
    # train top-1: the clean images for mixskd and ce; a mixed image counts lam and 1 - lam for its labels
    hits = (logits[:len(y)].argmax(1) == y).sum()
    if args.method in ("mixup", "cutmix"):
        hits = lam * hits + (1 - lam) * (logits.argmax(1) == y[perm]).sum()
    return total.detach(), terms, hits


def train(run):
    """The loop: per step lr, batch, train_step (mix, forward + loss, backward, SGD), now and then a log."""
    args, opt, steps = run.args, run.opt, run.steps
    # a terminal gets one live line per epoch; a log file a progress line at most once a minute
    run.live = run.main and sys.stdout.isatty()
    run.start_time = last_progress = time.time()
    for epoch in range(run.start_epoch, args.epochs):
        run.objective.train()
        sums, first_bad, epoch_start = 0, torch.full((), -1, device=run.device), time.time()
        for i, (x, y) in enumerate(train_batches(run.data, args.batch_size, args.seed, epoch, run.rank, run.world)):
            lr = lr_at(epoch * steps + i, steps, args)
            for group in opt.param_groups:
                group["lr"] = lr
            total, terms, hits = train_step(run.step_fn, opt, run.speed, x, y, args)
            logged = {"total": total, **terms, "hits": hits}
            values = torch.stack([value.float() for value in logged.values()])  # all on the device, no sync
            sums, first_bad = sums + values, torch.where(torch.isfinite(values).all() | (first_bad >= 0), first_bad, i)
            if (i + 1) % args.log_every == 0:  # the only host sync inside an epoch
                means = epoch_means(run, epoch, logged, sums, first_bad, i + 1)
                if run.live or (run.main and time.time() - last_progress > 60):
                    done, elapsed, last_progress = i + 1, time.time() - epoch_start, time.time()
                    eta = elapsed / done * (steps - done) + (args.epochs - epoch - 1) * steps * elapsed / done
                    print(f"{CLEAR_LINE if run.live else ''}epoch {epoch + 1}/{args.epochs} step {done}/{steps} "
                          f"loss {means['total']:.4f} lr {lr:.4f} {done * run.images / elapsed:.0f} "
                          f"img/s ETA {eta / 60:.1f} min", end="" if run.live else "\n", flush=True)
        end_epoch(run, epoch, epoch_means(run, epoch, logged, sums, first_bad, steps), lr, time.time() - epoch_start)
    finish(run)


def epoch_means(run, epoch, keys, sums, first_bad, steps_done):
    """The epoch's means so far (`sums` of `keys` over steps and ranks). A non-finite loss stops the run here,
    before a checkpoint, naming every non-finite term and the first step where the loss was not finite."""
    means = dict(zip(keys, (runtime.sum_over_ranks(sums, run.world) / (steps_done * run.world)).tolist()))
    bad = [key for key, value in means.items() if not math.isfinite(value)]
    if bad:
        where = f"step {int(first_bad) + 1}/{run.steps}" if first_bad >= 0 else "a step of another process"
        kept = f"{run.last} from the previous epoch is kept" if os.path.exists(run.last) else "nothing was saved"
        raise UserError(f"non-finite loss from {where} of epoch {epoch + 1}/{run.args.epochs} on "
                        f"(L_{', L_'.join(bad)}): stopped, {kept}; lower --lr or try --amp off")
    return means


def end_epoch(run, epoch, means, lr, epoch_time):
    """Evaluate on the test set, append to metrics.jsonl, save last.pt (and best.pt when it is the best)."""
    args = run.args
    loss = {key: value for key, value in means.items() if key != "hits"}
    rng = runtime.all_ranks(runtime.rng_state(run.device), run.world)
    if not run.main:
        return
    # rank 0 evaluates the whole test set with the weights and BatchNorm statistics it saves, so
    # eval.py on the checkpoint reproduces these numbers
    net, teacher = run.objective.net, getattr(run.objective, "self_teacher", None)
    test = evaluate(net, teacher, run.data, channels_last=run.speed.memory_format == torch.channels_last)
    record = {"epoch": epoch, "lr": lr, "loss": loss, "train_top1": 100.0 * means["hits"] / args.batch_size,
              "test": test, "epoch_time": epoch_time, "img_per_s": run.steps * run.images / epoch_time}
    with open(run.metrics, "a") as f:
        f.write(json.dumps(record) + "\n")
    top1, paths = test["backbone"]["top1"], [run.last]
    if top1 > run.best["top1"]:
        run.best, paths = {"epoch": epoch, "top1": top1}, [run.last, os.path.join(args.out, "best.pt")]
    checkpoints.save_training(paths, run.meta, args, epoch, run.best, run.objective, run.opt, run.speed.scaler, rng)
    heads = " ".join(f"{h} {m['top1']:.2f}" for h, m in test.items() if h != "backbone")
    print(f"{CLEAR_LINE if run.live else ''}epoch {epoch + 1}/{args.epochs} loss {loss['total']:.4f} "
          f"train {record['train_top1']:.2f} | test backbone {top1:.2f} {heads} | "
          f"{epoch_time:.1f}s {record['img_per_s']:.0f} img/s", flush=True)


def finish(run):
    """deploy.pt (the backbone alone) and summary.json (SPEC section 8: each number labelled)."""
    digests = runtime.all_ranks(runtime.parameter_digest(run.objective), run.world)
    if not run.main:
        return
    args = run.args
    checkpoints.save_atomic({"meta": run.meta, "backbone": run.backbone.state_dict()}, f"{args.out}/deploy.pt")
    s = {**report.summarise(checkpoints.read_metrics(run.metrics)), "trained_params": run.n_trained,
         "deployed_params": run.n_deployed, "wall_time_s_this_process": time.time() - run.start_time,
         "processes": run.world, "parameter_sha256_per_rank": digests, "args": vars(args)}
    checkpoints.write_json_atomic(s, f"{args.out}/summary.json")
    print(f"final backbone top-1 {s['headline_final_backbone_top1']:.2f} (headline) | best "
          f"{s['best_backbone_top1']:.2f} at epoch {s['best_backbone_epoch'] + 1} | released code's metric "
          f"{s['released_code_metric_max_over_heads_and_epochs']:.2f} ({s['released_code_metric_head']}, epoch "
          f"{s['released_code_metric_epoch'] + 1}, max over heads and epochs on the test set) | {args.out}")


if __name__ == "__main__":
    run_cli(main)
