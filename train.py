"""Train MixSKD or a baseline (CE, Mixup, CutMix, the Self-KD methods) on CIFAR, ImageNet or your own data,
on one device or under torchrun.

    python train.py --arch resnet18 --dataset cifar100                     # MixSKD, recipe `paper`
    python train.py --arch resnet18 --dataset cifar100 --recipe official   # the released objective
    python train.py --arch resnet18 --dataset cifar100 --method ps-kd      # a Self-KD baseline, same schedule
    python train.py --dataset path/to/data.npz --width 16 --epochs 90      # your own data
    python train.py --out runs/cifar100-resnet18-mixskd-paper-seed0 --resume
    torchrun --standalone --nproc_per_node=8 train.py --arch resnet50 --dataset imagenet --data DIR

Top to bottom: the method and its optimiser (methods.py; docs/method.md sections 5-9 and 12); one step; the run
(setup, the loop, the end of an epoch, the summary). The command line is cli.py, the settings a run resolves from
it settings.py, the lr schedule schedule.py; plumbing: runtime.py, speedups.py, checkpoints.py. A run writes into
--out: args.json (the arguments and settings, at the start), metrics.jsonl (a line per epoch), last.pt (every epoch,
atomically), best.pt (best backbone top-1 on the validation split of --val-split, else on the test set), deploy.pt
(the backbone alone), summary.json (the headline: final backbone top-1) and, with --tensorboard, TensorBoard's
event file.
"""
import dataclasses
import functools
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
import speedups
from arch import network
from cli import parse_args, parser, resume_arguments
from data import hold_out, load_dataset, note_single_image_classes, train_batches, train_labels
from errors import UserError, run_cli
from eval import evaluate
from methods import METHODS
from schedule import default_warmup_iterations, lr_at, schedule_text
from self_teacher import SelfTeacher
from settings import resolve, setting_of

CLEAR_LINE = "\r\033[K"  # back to the start of the terminal line and erase it


# ----------------------------------------------------------------------------- the method and the optimiser


def build(s, num_classes, device, train_labels=None):
    """The run's method (methods.py) for settings s: its objective (the network, with its branches for MixSKD, BYOT
    and DKS; for MixSKD also the self-teacher and the discriminators) on the device, and one SGD over what it trains
    (docs/method.md sections 7, 9, 12). train_labels: the training set's labels on the device (PS-KD's store)."""
    cls = METHODS[s.method]
    net = network(s.arch, num_classes, s.width, cls.stem_relu(s.hp, s.setting), s.setting, cls.heads, s.image_size)
    memory_format = torch.channels_last if s.channels_last else torch.contiguous_format
    method = cls(net, num_classes, s.hp, s.setting, memory_format, train_labels=train_labels)
    if device.type == "cpu" and s.channels_last and s.amp == "off" and (
            bad := speedups.channels_last_hazard(method.objective)):
        raise UserError(f"channels_last in fp32 on a CPU: oneDNN computes wrong weight gradients for a 1x1 strided "
                        f"convolution of fewer than {speedups.ONEDNN_1X1_BLOCK} input channels ({bad[0]} has "
                        f"{bad[1]}; docs/performance.md): use --channels-last off, --amp bf16 or a wider network")
    params = [p for p in method.objective.parameters() if p.requires_grad]  # what the recipe trains
    method.objective.to(device, memory_format=memory_format)
    for teacher in (m for m in method.objective.modules() if isinstance(m, SelfTeacher)):
        # its 1x1 conv runs as a matrix product (self_teacher.py), whose gradient comes in the default strides: its
        # weight kept in them too, DistributedDataParallel's bucket matches the gradient (else each rank warns)
        teacher.conv.weight.data = teacher.conv.weight.data.clone(memory_format=torch.contiguous_format)
    # fused: one kernel over every parameter on CUDA, one pass of C++ on a CPU (42.6M parameters: 16 ms, against
    # 46 to 83 ms for foreach, which a CPU runs as a loop of per-tensor ops)
    opt = torch.optim.SGD(params, lr=s.lr, momentum=0.9, nesterov=s.nesterov, weight_decay=s.weight_decay, fused=True)
    return method, opt


def train_step(method, opt, speed, batch, clip=0.0):
    """One step on a batch of the loader (images, labels, and what the method's batches carry), as the paper's
    algorithm: the method's inputs (MixSKD, Mixup and CutMix mix here, Eq. (1); CS-KD's partners, PS-KD's soft
    targets), then `update` (forward and loss, backward, clip, SGD; with --compile step-graph replayed as one CUDA
    graph), and what the method keeps of the step (PS-KD's predictions). Returns the loss, its terms and the
    correct training predictions, on the device, never waiting for it."""
    inputs = method.inputs(*batch)
    if speed.cudagraphs:
        torch.compiler.cudagraph_mark_step_begin()  # a new step: last step's graph outputs are consumed
    step = functools.partial(update, method, opt, speed, clip)
    total, terms, logits = speed.step_graph(step, inputs, opt) if speed.step_graph else step(*inputs)
    method.after_step(batch, logits)
    return total, terms, method.hits(inputs, logits)


def update(method, opt, speed, clip, *inputs):
    """The step after its inputs: the method's forward and loss in one call (the network, then e.g.
    losses.mixskd_loss, Eqs. (5)-(10)), backward, the gradient norm clipped to `clip` unless 0, SGD. Returns the
    loss (detached), its terms and the logits the method's hits and after_step read."""
    with speed.autocast:
        total, terms, logits = method.forward(*inputs)
    opt.zero_grad(set_to_none=True)
    speed.scaler.scale(total).backward()
    if clip:  # on the device, no sync: the norm and the scale factor never leave it
        speed.scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], clip)
    speed.scaler.step(opt)
    speed.scaler.update()
    return total.detach(), terms, logits


# ----------------------------------------------------------------------------- the run


def main(argv=None):
    args, resume = parse_args(argv), None
    if args.resume:
        args, resume = resume_arguments(args, argv)
    if complete := runtime.check_run_folder(args, resume):  # --resume of a finished run: say so, change nothing
        return print(complete)
    try:
        with runtime.processes(args) as (rank, world, device), runtime.cleanup_failed_start(args.out, rank):
            run = setup(args, rank, world, device, resume)
            try:
                train(run)
            finally:  # also when the run stops early: its writer's thread ends with it
                if run.tensorboard:
                    run.tensorboard.close()
    except KeyboardInterrupt:  # one line, not a traceback: where the run stands and how to resume it
        sys.exit(runtime.interrupted(args, sys.argv[1:] if argv is None else argv))


def setup(args, rank, world, device, resume=None):
    """Everything that runs once: data, settings, method, optimiser, resume or init-from, metrics file, header."""
    run = SimpleNamespace(args=args, rank=rank, world=world, device=device, main=rank == 0, best={"top1": -1.0},
                          start_epoch=0, last=os.path.join(args.out, "last.pt"),
                          metrics=os.path.join(args.out, "metrics.jsonl"))
    runtime.seed_all(args.seed)  # the same initialisation on every rank (DDP also broadcasts rank 0's)
    run.data = data = hold_out(load_dataset(args.dataset, args.data, device, args.image_size, args.workers,
                                            in_memory=setting_of(args) == "cifar"), args.val_split, args.seed)
    run.s = s = resolve(args, data, device, world, resume)
    run.speed = speedups.speed(s, device)
    runtime.check_writable(args.out, rank)
    run.method, run.opt = build(s, data.num_classes, device, train_labels(data))
    runtime.seed_all(args.seed + rank)  # each rank draws its own lam and perm for its own batch
    objective = run.method.objective
    run.backbone = getattr(objective.net, "backbone", objective.net)
    run.meta = checkpoints.run_meta(args, s, data, run.backbone)
    if resume:
        run.start_epoch, run.best = checkpoints.resume(run.last, s.epochs, run.meta, objective, run.opt,
                                                       run.speed.scaler, device, rank, run.method.store)
    elif args.init_from:
        checkpoints.init_from(args.init_from, objective.net, getattr(objective, "self_teacher", None))
    speedups.wrap(run.method, s.compile, device, world, args.sync_bn)
    run.record = {"args": vars(args), "settings": dataclasses.asdict(s)}  # saved in every checkpoint
    run.tensorboard = None  # rank 0 alone writes files
    if run.main:
        checkpoints.restart_metrics(run.metrics, run.start_epoch)
        checkpoints.write_json_atomic({**run.record, **runtime.provenance(device)}, os.path.join(args.out, "args.json"))
        if args.tensorboard:
            run.tensorboard = checkpoints.tensorboard_writer(args.out, run.start_epoch)
        notes(run)
    run.images = s.batch_size * world  # clean images per step
    run.n_trained = sum(p.numel() for p in objective.parameters() if p.requires_grad)
    run.n_deployed = sum(p.numel() for p in run.backbone.parameters())
    if run.main:
        print(header(run), flush=True)
    return run


def notes(run):
    """What the user should know before the run starts: the method's notes, the images each epoch drops."""
    s, data = run.s, run.data
    lines = run.method.notes(s.epochs)
    if run.method.extra == "partner":  # CS-KD: a class of one image pairs it with itself
        note_single_image_classes(data)
    if (dropped := data.n_train - s.steps_per_epoch * s.batch_size * run.world) > 0.1 * data.n_train:
        lines.append(f"note: each epoch trains on {data.n_train - dropped} of the {data.n_train} training images and "
                     f"drops the other {dropped} (its last, incomplete batch of --batch-size {s.batch_size}): a "
                     f"smaller batch drops fewer")
    for line in lines:
        print(line, file=sys.stderr)


def header(run):
    """The run's first line, in named parts: what trains, on what data, on what machine, the batch, the
    parameters, and the schedule of the epochs to run."""
    s, data = run.s, run.data
    heads = len(run.method.objective.net.branches) + 1 if run.method.heads else 1
    network = (f"{s.arch}{'' if s.width is None else f' width {s.width}'}, "
               + (f"backbone and {heads - 1} branches" if heads > 1 else "the backbone alone"))
    dataset = (f"{data.name} ({s.setting} setting, {s.image_size} px; {data.n_train} train, "
               f"{f'{data.n_val} validation, ' if data.n_val else ''}{data.n_test} test, {data.num_classes} classes)")
    machine = f"{run.world} x {run.device.type} amp {s.amp} channels_last {s.channels_last} compile {s.compile}"
    spec = " (the recipe: 128 on ImageNet)" if run.args.dataset == "imagenet" and run.images != 128 else ""
    batch = f"batch {s.batch_size} per process, {run.images} in all{spec}"
    params = f"{run.n_trained:,} trained params, {run.n_deployed:,} deployed"
    w = s.warmup_iterations
    schedule = (f"epochs {run.start_epoch + 1}..{s.epochs}, warmup {w} iteration{'s' * (w != 1)},"
                f"{f' gradient norm clipped to {s.clip:g},' * bool(s.clip)} {schedule_text(s, run.start_epoch)}")
    if s.lr_ceiling is not None:
        schedule += (f" (an --extend keeps the lr at or below {s.lr_ceiling:.3g}, its last; --extend-schedule new "
                     f"follows the new schedule)")
    return " | ".join([run.method.describe(), f"{network} on {dataset}", machine, batch, params, schedule])


def train(run):
    """The loop: per step lr, batch, train_step (inputs, forward + loss, backward, SGD), now and then a log."""
    s, opt, method = run.s, run.opt, run.method
    # a terminal gets one live line per epoch; a log file a progress line at most once a minute
    run.live = run.main and sys.stdout.isatty()
    run.start_time = last_progress = time.time()
    for epoch in range(run.start_epoch, s.epochs):
        method.objective.train()
        method.set_epoch(epoch, s.epochs, s.capped_from)
        sums, first_bad, epoch_start = 0, torch.full((), -1, device=run.device), time.time()
        for i, batch in enumerate(train_batches(run.data, s.batch_size, s.seed, epoch, run.rank, run.world,
                                                method.extra)):
            lr = lr_at(epoch * s.steps_per_epoch + i, s)
            speedups.set_lr(opt, lr)
            total, terms, hits = train_step(method, opt, run.speed, batch, s.clip)
            logged = {"total": total, **terms, "hits": hits}
            values = torch.stack([value.float() for value in logged.values()])  # all on the device, no sync
            sums, first_bad = sums + values, torch.where(torch.isfinite(values).all() | (first_bad >= 0), first_bad, i)
            if (i + 1) % run.args.log_every == 0:  # the only host sync inside an epoch
                means = epoch_means(run, epoch, logged, sums, first_bad, i + 1)
                if run.live or (run.main and time.time() - last_progress > 60):
                    last_progress = time.time()
                    progress(run, epoch, i + 1, means["total"], lr, last_progress - epoch_start)
        end_epoch(run, epoch, epoch_means(run, epoch, logged, sums, first_bad, s.steps_per_epoch), lr,
                  time.time() - epoch_start)
    finish(run)


def progress(run, epoch, done, loss, lr, elapsed):
    """The progress line: where the epoch is, its mean loss so far, the lr, the speed and the time left."""
    s, steps = run.s, run.s.steps_per_epoch
    eta = elapsed / done * (steps - done) + (s.epochs - epoch - 1) * steps * elapsed / done
    print(f"{CLEAR_LINE if run.live else ''}epoch {epoch + 1}/{s.epochs} step {done}/{steps} loss {loss:.4f} "
          f"lr {lr:.4f} {done * run.images / elapsed:.0f} img/s ETA {eta / 60:.1f} min",
          end="" if run.live else "\n", flush=True)


def epoch_means(run, epoch, keys, sums, first_bad, steps_done):
    """The epoch's means so far (`sums` of `keys` over steps and ranks). A non-finite loss stops the run here,
    before a checkpoint, naming every non-finite term and the first step where the loss was not finite."""
    means = dict(zip(keys, (runtime.sum_over_ranks(sums, run.world) / (steps_done * run.world)).tolist()))
    bad = [key for key, value in means.items() if not math.isfinite(value)]
    if bad:
        where = f"step {int(first_bad) + 1}/{run.s.steps_per_epoch}" if first_bad >= 0 else "a step of another process"
        raise UserError(f"non-finite loss from {where} of epoch {epoch + 1}/{run.s.epochs} on "
                        f"(L_{', L_'.join(bad)}): stopped, {kept_checkpoint(run)}; {divergence_hint(run)}")
    return means


def stop_broken(run, epoch, what):
    """Stop before a checkpoint when the network is broken though its loss was finite (a diverged run's
    deploy.pt gave NaN for every input): what names the non-finite test NLL, weights or statistics."""
    raise UserError(f"epoch {epoch + 1}/{run.s.epochs}: the network's outputs are not finite ({what}): "
                    f"stopped before saving it, {kept_checkpoint(run)}; {divergence_hint(run)}")


def kept_checkpoint(run):
    return f"{run.last} from the previous epoch is kept" if os.path.exists(run.last) else "nothing was saved"


def divergence_hint(run):
    """The lever that helps a diverged run: the user's own warmup or lr where they are the cause."""
    s = run.s
    default = default_warmup_iterations(s.epochs, s.steps_per_epoch, s.setting)
    if s.warmup_iterations < default:
        return (f"--warmup-epochs {s.warmup_iterations / s.steps_per_epoch:g} gives {s.warmup_iterations} warmup "
                f"iterations where the default gives {default}: drop the flag")
    if s.lr > parser.get_default("lr"):
        return f"--lr {s.lr:g} is above the recipe's {parser.get_default('lr')}: lower it"
    return ("a longer --warmup-epochs or a lower --lr help (docs/stability.md)"
            + ("; fp16 overflows where bf16 does not: try --amp bf16 or off" if s.amp == "fp16" else ""))


def end_epoch(run, epoch, means, lr, epoch_time):
    """Evaluate on the test set (and the validation split), append to metrics.jsonl (and TensorBoard), save
    last.pt (and best.pt when its backbone top-1 on the validation split, else on the test set, is the best)."""
    s, objective, store = run.s, run.method.objective, run.method.store
    loss = {key: value for key, value in means.items() if key != "hits"}
    if bad := runtime.non_finite_tensors(objective):  # on every rank, so that all of them stop
        stop_broken(run, epoch, f"{len(bad)} weights or BatchNorm statistics ({bad[0]}, ...)")
    if store is not None:  # every rank gets the rows the others wrote
        runtime.merge_store(store, run.world)
    rng = runtime.all_ranks(runtime.rng_state(run.device), run.world)
    if not run.main:
        return
    # rank 0 evaluates the whole test set with the weights and BatchNorm statistics it saves, so
    # eval.py on the checkpoint reproduces these numbers
    net, teacher = objective.net, getattr(objective, "self_teacher", None)
    test = evaluate(net, teacher, run.data, channels_last=s.channels_last)
    if heads := [head for head, m in test.items() if not math.isfinite(m["nll"])]:
        stop_broken(run, epoch, f"test NLL of {', '.join(heads)}")
    val = {}
    if run.data.n_val:
        val["val"] = evaluate(net, teacher, run.data, channels_last=s.channels_last, split="val")
    record = {"epoch": epoch, "lr": lr, "loss": loss, **run.method.logged(),
              "train_top1": 100.0 * means["hits"] / s.batch_size, **val, "test": test, "epoch_time": epoch_time,
              "img_per_s": s.steps_per_epoch * run.images / epoch_time}
    with open(run.metrics, "a") as f:
        f.write(json.dumps(record) + "\n")
    if run.tensorboard:
        checkpoints.write_tensorboard(run.tensorboard, record)
    chosen_on = "val" if val else "test"  # the test set chooses nothing when there is a validation split
    top1, paths = record[chosen_on]["backbone"]["top1"], [run.last]
    if top1 > run.best["top1"]:
        run.best = {"epoch": epoch, "top1": top1, "split": chosen_on}
        paths = [run.last, os.path.join(run.args.out, "best.pt")]
    checkpoints.save_training(paths, {"meta": run.meta, **run.record}, epoch, run.best, objective, run.opt,
                              run.speed.scaler, rng, store)
    heads = "".join(f" {h} {m['top1']:.2f}" for h, m in test.items() if h != "backbone")
    print(f"{CLEAR_LINE if run.live else ''}epoch {epoch + 1}/{s.epochs} loss {loss['total']:.4f} "
          f"train {record['train_top1']:.2f} | {f'val backbone {top1:.2f} | ' if val else ''}"
          f"test backbone {test['backbone']['top1']:.2f}{heads} | "
          f"{epoch_time:.1f}s {record['img_per_s']:.0f} img/s", flush=True)


def finish(run):
    """deploy.pt (the backbone alone) and summary.json (docs/method.md section 8: each number labelled)."""
    digests = runtime.all_ranks(runtime.parameter_digest(run.method.objective), run.world)
    if not run.main:
        return
    out, data = run.args.out, run.data
    checkpoints.save_atomic({"meta": run.meta, "backbone": run.backbone.state_dict()}, f"{out}/deploy.pt")
    summary = {**report.summarise(checkpoints.read_metrics(run.metrics), run.s.method), "trained_params": run.n_trained,
               "deployed_params": run.n_deployed, "wall_time_s_this_process": time.time() - run.start_time,
               "processes": run.world, "parameter_sha256_per_rank": digests, **runtime.provenance(run.device),
               **run.record, "data": {"dataset": run.meta["dataset_path"] or run.args.dataset,
                                      "num_classes": data.num_classes, "n_train": data.n_train, "n_val": data.n_val,
                                      "n_test": data.n_test, "image_size": data.image_size}}
    checkpoints.write_json_atomic(summary, f"{out}/summary.json")
    print(f"final backbone top-1 {summary['headline_final_backbone_top1']:.2f} (headline) | best epoch "
          f"{summary['best_backbone_epoch']} (chosen on {summary['best_epoch_chosen_on']}): test top-1 "
          f"{summary['best_backbone_top1']:.2f} | released code's number {summary['released_code_metric']:.2f} "
          f"({summary['released_code_metric_head']}, epoch {summary['released_code_metric_epoch']}: "
          f"{summary['released_code_metric_rule']}, on the test set) | {out}")


if __name__ == "__main__":
    run_cli(main)
