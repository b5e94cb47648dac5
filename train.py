"""Train MixSKD or a baseline (CE, Mixup, CutMix, the Self-KD methods) on CIFAR, ImageNet or your own data,
on one device or under torchrun.

    python train.py --arch resnet18 --dataset cifar100                     # MixSKD, recipe `paper`
    python train.py --arch resnet18 --dataset cifar100 --recipe official   # the released objective
    python train.py --arch resnet18 --dataset cifar100 --method ps-kd      # a Self-KD baseline, same schedule
    python train.py --dataset path/to/data.npz --width 16 --epochs 90      # your own data
    python train.py --out runs/cifar100-resnet18-mixskd-paper-seed0 --resume
    torchrun --standalone --nproc_per_node=8 train.py --arch resnet50 --dataset imagenet --data DIR

Top to bottom: the objective and its optimiser (docs/method.md sections 5-9 and 12); the run (setup, one step,
the loop, the end of an epoch, the summary). The command line is cli.py, the lr schedule schedule.py; plumbing:
runtime.py, checkpoints.py. A run writes
into --out: metrics.jsonl (a line per epoch), last.pt (every epoch, atomically), best.pt (best backbone
top-1 on the validation split of --val-split, else on the test set), deploy.pt (the backbone alone),
summary.json (the headline: final backbone top-1) and, with --tensorboard, TensorBoard's event file.
"""
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import torch

import checkpoints
import report
import runtime
from arch import network
from baselines import BRANCHED, SELF_KD_METHODS, PredictionStore, SelfKDObjective, ps_kd_alpha
from cli import parse_args, parser, resume_arguments
from data import hold_out, load_dataset, note_single_image_classes, steps_per_epoch, train_batches, train_labels
from errors import UserError, run_cli
from eval import evaluate
from losses import TERMS, BaselineObjective, MixSKDObjective, discriminators
from mixup import mix_batch
from schedule import clip_norm, default_warmup_iterations, lr_at, schedule_text, warmup_iterations
from self_teacher import SelfTeacher

CLEAR_LINE = "\r\033[K"  # back to the start of the terminal line and erase it
EXTRA = {"cs-kd": "partner", "ps-kd": "index"}  # what a method's batches carry besides images and labels


# ----------------------------------------------------------------------------- the objective and the optimiser


def build(args, num_classes, device, memory_format, image_size=None):
    """The run's objective (the network, with its branches for MixSKD, BYOT and DKS; for MixSKD also the
    self-teacher and the discriminators) and one SGD over what it trains (docs/method.md sections 7, 9, 12).
    image_size: the side of the images, for the transformers that are built for one input size."""
    # the released ImageNet script optimises L_mix and keeps the stem ReLU, its CIFAR script does neither
    recipe = "official-imagenet" if args.recipe == "official" and args.stem == "imagenet" else args.recipe
    stem_relu = not (args.method == "mixskd" and recipe == "official")  # docs/method.md section 6, item 5
    heads = args.method in ("mixskd", *BRANCHED)
    net = network(args.arch, num_classes, args.width, stem_relu, args.stem, heads, image_size)
    if args.method == "mixskd":
        channels, heads = net.feature_channels, len(net.branches) + 1
        objective = MixSKDObjective(net, SelfTeacher(channels, num_classes, heads), discriminators(channels, heads),
                                    recipe, {t: getattr(args, f"w_{t}") for t in TERMS}, args.temperature)
    elif args.method in SELF_KD_METHODS:
        objective = SelfKDObjective(net, args.method, args.temperature)
    else:
        objective = BaselineObjective(net)
    params = [p for p in objective.parameters() if p.requires_grad]  # what the recipe trains
    objective.to(device, memory_format=memory_format)
    # fused: one kernel over every parameter on CUDA, one pass of C++ on a CPU (42.6M parameters: 16 ms, against
    # 46 to 83 ms for foreach, which a CPU runs as a loop of per-tensor ops)
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, nesterov=args.nesterov, weight_decay=args.weight_decay,
                          fused=True)
    return objective, opt


# ----------------------------------------------------------------------------- the run


def main(argv=None):
    args = parse_args(argv)
    if args.resume:
        args = resume_arguments(args, argv)
    if complete := runtime.check_run_folder(args):  # --resume of a finished run: say so and change nothing
        return print(complete)
    try:
        with runtime.processes(args) as (rank, world, device), runtime.cleanup_failed_start(args.out, rank):
            run = setup(args, rank, world, device)
            try:
                train(run)
            finally:  # also when the run stops early: its writer's thread ends with it
                if run.tensorboard:
                    run.tensorboard.close()
    except KeyboardInterrupt:  # one line, not a traceback: where the run stands and how to resume it
        sys.exit(runtime.interrupted(args, sys.argv[1:] if argv is None else argv))


def setup(args, rank, world, device):
    """Everything that runs once: data, objective, optimiser, resume or init-from, metrics file, header."""
    run = SimpleNamespace(args=args, rank=rank, world=world, device=device, main=rank == 0, best={"top1": -1.0},
                          start_epoch=0, last=os.path.join(args.out, "last.pt"),
                          metrics=os.path.join(args.out, "metrics.jsonl"))
    runtime.seed_all(args.seed)  # the same initialisation on every rank (DDP also broadcasts rank 0's)
    run.data = data = hold_out(load_dataset(args.dataset, args.data, device, args.image_size, args.workers,
                                            in_memory=args.setting == "cifar"), args.val_split, args.seed)
    run.steps = steps_per_epoch(data, args.batch_size, world)
    run.speed = runtime.speed_settings(args, device, run.steps * args.epochs)
    runtime.check_writable(args.out, rank)
    if args.method == "cs-kd" and run.main:
        note_single_image_classes(data)
    run.objective, run.opt = build(args, data.num_classes, device, run.speed.memory_format, data.image_size)
    runtime.seed_all(args.seed + rank)  # each rank draws its own lam and perm for its own batch
    net, teacher, discs = (getattr(run.objective, name, None) for name in ("net", "self_teacher", "discs"))
    run.backbone = getattr(net, "backbone", net)
    run.meta = checkpoints.run_meta(args, data, run.backbone)
    # PS-KD's predictions, one row per training image; every rank holds all of them (section 12.5)
    run.store = PredictionStore(train_labels(data), data.num_classes) if args.method == "ps-kd" else None
    if args.resume:
        run.start_epoch, run.best = checkpoints.resume(run.last, args, run.meta, net, teacher, discs, run.opt,
                                                       run.speed.scaler, device, rank, run.store)
    elif args.init_from:
        checkpoints.init_from(args.init_from, net, teacher)
    if args.extend:  # the extension never raises the lr above its last, unless asked to
        args.lr_ceiling = None if args.extend_schedule == "new" else run.opt.param_groups[0]["lr"]
        args.extended_at = run.start_epoch
    run.step_fn = runtime.wrap(run.objective, args, device, world)
    if run.main:
        checkpoints.restart_metrics(run.metrics, run.start_epoch)
    run.tensorboard = None  # rank 0 alone writes files
    if args.tensorboard and run.main:
        run.tensorboard = checkpoints.tensorboard_writer(args.out, run.start_epoch)
    if run.main and (dropped := data.n_train - run.steps * args.batch_size * world) > 0.1 * data.n_train:
        print(f"note: each epoch trains on {data.n_train - dropped} of the {data.n_train} training images and drops "
              f"the other {dropped} (its last, incomplete batch of --batch-size {args.batch_size}): a smaller batch "
              f"drops fewer", file=sys.stderr)
    # the run's arguments record the warmup and the clip it resolved: a resume, --extend too, keeps them
    args.warmup_epochs = warmup_iterations(args, run.steps) / run.steps
    args.clip_grad = run.clip = clip_norm(args, run.steps)
    # the header line: what trains, on what, how fast, for how long
    run.images = args.batch_size * world  # clean images per step
    run.n_trained = sum(p.numel() for p in run.objective.parameters() if p.requires_grad)
    run.n_deployed = sum(p.numel() for p in run.backbone.parameters())
    if run.main:
        print(header(run, net), flush=True)
    return run


def header(run, net):
    """The run's first line: what trains, on what, how fast, for how long, at which lr."""
    args, data = run.args, run.data
    spec_batch = " (the recipe: 128 on ImageNet)" if args.dataset == "imagenet" and run.images != 128 else ""
    heads = len(net.branches) + 1 if hasattr(net, "branches") else 1
    return (f"{args.method}{' ' + args.recipe if args.method == 'mixskd' else ''}"
            f"{f' alpha {args.alpha}' if args.method in ('mixskd', 'mixup', 'cutmix') else ''}"
            f"{f' T {args.temperature:g}' if args.temperature else ''} | {args.arch}"
            f"{'' if ':' in args.arch else f' width {args.width}'}, "
            f"{f'backbone and {heads - 1} branches' if heads > 1 else 'the backbone alone'}"
            f" on {data.name} ({args.setting} setting, {data.image_size} px; {data.n_train} train, "
            f"{f'{data.n_val} validation, ' if data.n_val else ''}{data.n_test} test, {data.num_classes} classes) | "
            f"{run.world} x {run.device.type} amp {run.speed.amp} "
            f"channels_last {run.speed.memory_format == torch.channels_last} compile {args.compile} | batch "
            f"{args.batch_size} per process, {run.images} in all{spec_batch} | {run.n_trained:,} trained params, "
            f"{run.n_deployed:,} deployed | epochs {run.start_epoch + 1}..{args.epochs}, warmup "
            f"{(w := warmup_iterations(args, run.steps))} iteration{'s' * (w != 1)},"
            f"{f' gradient norm clipped to {run.clip:g},' * bool(run.clip)}"
            f" {schedule_text(args, run.steps, run.start_epoch)}"
            + (f" (an --extend keeps the lr at or below {args.lr_ceiling:.3g}, its last; --extend-schedule new "
               f"follows the new schedule)" if args.extend and args.lr_ceiling is not None else ""))


def train_step(objective, opt, speed, x, y, args, clip=0.0, extra=None):
    """One step on a clean batch (x, y): mix (Eq. (1)), forward and loss in one call of the objective
    (losses.MixSKDObjective: the network, then mixskd_loss, Eqs. (5)-(10); or a baseline's), backward, the
    gradient norm clipped to `clip` when it is not 0 (clip_norm), SGD. extra: CS-KD's partner images or PS-KD's
    soft targets (section 12).
    Returns loss, terms, correct predictions and the backbone's logits, on the device, never waiting for it;
    lam goes in as a 0-d device tensor, so a new lam neither recompiles nor syncs."""
    inputs, lam, perm = x, None, None
    if args.method in ("mixskd", "mixup", "cutmix"):
        x_mix, perm, lam = mix_batch(x, args.alpha, args.mix if args.method == "mixskd" else args.method)
        # MixSKD forwards clean and mixed images in one pass, so BatchNorm sees both (docs/method.md section 2)
        inputs = torch.cat([x, x_mix]) if args.method == "mixskd" else x_mix
        lam = torch.full((), lam, device=x.device)
    if speed.cudagraphs:
        torch.compiler.cudagraph_mark_step_begin()  # a new step: last step's graph outputs are consumed
    if extra is not None and extra.dim() == 4:  # partner images, laid out as the anchors
        extra = extra.contiguous(memory_format=speed.memory_format)
    with speed.autocast:
        total, terms, logits = objective(inputs.contiguous(memory_format=speed.memory_format), y, lam, perm, extra)
    opt.zero_grad(set_to_none=True)
    speed.scaler.scale(total).backward()
    if clip:  # on the device, no sync: the norm and the scale factor never leave it
        speed.scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], clip)
    speed.scaler.step(opt)
    speed.scaler.update()
    # train top-1: the clean images for mixskd and ce; a mixed image counts lam and 1 - lam for its labels
    hits = (logits[:len(y)].argmax(1) == y).sum()
    if args.method in ("mixup", "cutmix"):
        hits = lam * hits + (1 - lam) * (logits.argmax(1) == y[perm]).sum()
    return total.detach(), terms, hits, logits


def train(run):
    """The loop: per step lr, batch, train_step (mix, forward + loss, backward, SGD), now and then a log."""
    args, opt, steps = run.args, run.opt, run.steps
    # a terminal gets one live line per epoch; a log file a progress line at most once a minute
    run.live = run.main and sys.stdout.isatty()
    run.start_time = last_progress = time.time()
    for epoch in range(run.start_epoch, args.epochs):
        run.objective.train()
        sums, first_bad, epoch_start = 0, torch.full((), -1, device=run.device), time.time()
        for i, (x, y, *extra) in enumerate(train_batches(run.data, args.batch_size, args.seed, epoch, run.rank,
                                                         run.world, EXTRA.get(args.method))):
            lr = lr_at(epoch * steps + i, steps, args)
            for group in opt.param_groups:
                group["lr"] = lr
            if run.store:  # PS-KD: soft targets from the previous epoch's rows of these images, then this step's
                idx = extra.pop()
                extra.append(run.store.targets(idx, y, ps_kd_alpha(epoch, args.epochs)))
            total, terms, hits, logits = train_step(run.step_fn, opt, run.speed, x, y, args, run.clip, *extra)
            if run.store:
                run.store.write(idx, logits)
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
        raise UserError(f"non-finite loss from {where} of epoch {epoch + 1}/{run.args.epochs} on "
                        f"(L_{', L_'.join(bad)}): stopped, {kept_checkpoint(run)}; {divergence_hint(run)}")
    return means


def stop_broken(run, epoch, what):
    """Stop before a checkpoint when the network is broken though its loss was finite (a diverged run's
    deploy.pt gave NaN for every input): what names the non-finite test NLL, weights or statistics."""
    raise UserError(f"epoch {epoch + 1}/{run.args.epochs}: the network's outputs are not finite ({what}): "
                    f"stopped before saving it, {kept_checkpoint(run)}; {divergence_hint(run)}")


def kept_checkpoint(run):
    return f"{run.last} from the previous epoch is kept" if os.path.exists(run.last) else "nothing was saved"


def divergence_hint(run):
    """The lever that helps a diverged run: the user's own warmup or lr where they are the cause."""
    args, default = run.args, default_warmup_iterations(run.args, run.steps)
    warmup = warmup_iterations(args, run.steps)
    if warmup < default:
        return (f"--warmup-epochs {args.warmup_epochs:g} gives {warmup} warmup iterations where the default gives "
                f"{default}: drop the flag")
    if args.lr > parser.get_default("lr"):
        return f"--lr {args.lr:g} is above the recipe's {parser.get_default('lr')}: lower it"
    return ("a longer --warmup-epochs or a lower --lr help (docs/stability.md)"
            + ("; fp16 overflows where bf16 does not: try --amp bf16 or off" if run.speed.amp == "fp16" else ""))


def end_epoch(run, epoch, means, lr, epoch_time):
    """Evaluate on the test set (and the validation split), append to metrics.jsonl (and TensorBoard), save
    last.pt (and best.pt when its backbone top-1 on the validation split, else on the test set, is the best)."""
    args = run.args
    loss = {key: value for key, value in means.items() if key != "hits"}
    if bad := runtime.non_finite_tensors(run.objective):  # on every rank, so that all of them stop
        stop_broken(run, epoch, f"{len(bad)} weights or BatchNorm statistics ({bad[0]}, ...)")
    if run.store:  # every rank gets the rows the others wrote
        runtime.merge_store(run.store, run.world)
    rng = runtime.all_ranks(runtime.rng_state(run.device), run.world)
    if not run.main:
        return
    # rank 0 evaluates the whole test set with the weights and BatchNorm statistics it saves, so
    # eval.py on the checkpoint reproduces these numbers
    net, teacher = run.objective.net, getattr(run.objective, "self_teacher", None)
    channels_last = run.speed.memory_format == torch.channels_last
    test = evaluate(net, teacher, run.data, channels_last=channels_last)
    if heads := [head for head, m in test.items() if not math.isfinite(m["nll"])]:
        stop_broken(run, epoch, f"test NLL of {', '.join(heads)}")
    val = {"val": evaluate(net, teacher, run.data, channels_last=channels_last, split="val")} if run.data.n_val else {}
    record = {"epoch": epoch, "lr": lr, "loss": loss, "train_top1": 100.0 * means["hits"] / args.batch_size,
              **val, "test": test, "epoch_time": epoch_time, "img_per_s": run.steps * run.images / epoch_time}
    with open(run.metrics, "a") as f:
        f.write(json.dumps(record) + "\n")
    if run.tensorboard:
        checkpoints.write_tensorboard(run.tensorboard, record)
    chosen_on = "val" if val else "test"  # the test set chooses nothing when there is a validation split
    top1, paths = record[chosen_on]["backbone"]["top1"], [run.last]
    if top1 > run.best["top1"]:
        run.best = {"epoch": epoch, "top1": top1, "split": chosen_on}
        paths = [run.last, os.path.join(args.out, "best.pt")]
    checkpoints.save_training(paths, run.meta, args, epoch, run.best, run.objective, run.opt, run.speed.scaler, rng,
                              run.store)
    heads = "".join(f" {h} {m['top1']:.2f}" for h, m in test.items() if h != "backbone")
    print(f"{CLEAR_LINE if run.live else ''}epoch {epoch + 1}/{args.epochs} loss {loss['total']:.4f} "
          f"train {record['train_top1']:.2f} | {f'val backbone {top1:.2f} | ' if val else ''}"
          f"test backbone {test['backbone']['top1']:.2f}{heads} | "
          f"{epoch_time:.1f}s {record['img_per_s']:.0f} img/s", flush=True)


def finish(run):
    """deploy.pt (the backbone alone) and summary.json (docs/method.md section 8: each number labelled)."""
    digests = runtime.all_ranks(runtime.parameter_digest(run.objective), run.world)
    if not run.main:
        return
    args, data = run.args, run.data
    checkpoints.save_atomic({"meta": run.meta, "backbone": run.backbone.state_dict()}, f"{args.out}/deploy.pt")
    s = {**report.summarise(checkpoints.read_metrics(run.metrics)), "trained_params": run.n_trained,
         "deployed_params": run.n_deployed, "wall_time_s_this_process": time.time() - run.start_time,
         "processes": run.world, "parameter_sha256_per_rank": digests, **runtime.provenance(run.device),
         "args": vars(args),
         "data": {"dataset": run.meta["dataset_path"] or args.dataset, "num_classes": data.num_classes,
                  "n_train": data.n_train, "n_val": data.n_val, "n_test": data.n_test, "image_size": data.image_size}}
    checkpoints.write_json_atomic(s, f"{args.out}/summary.json")
    print(f"final backbone top-1 {s['headline_final_backbone_top1']:.2f} (headline) | best epoch "
          f"{s['best_backbone_epoch']} (chosen on {s['best_epoch_chosen_on']}): test top-1 "
          f"{s['best_backbone_top1']:.2f} | released code's metric "
          f"{s['released_code_metric_max_over_heads_and_epochs']:.2f} ({s['released_code_metric_head']}, epoch "
          f"{s['released_code_metric_epoch']}, max over heads and epochs on the test set) | {args.out}")


if __name__ == "__main__":
    run_cli(main)
