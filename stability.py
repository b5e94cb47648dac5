"""Stability benchmark: the first steps of real runs over a grid of settings (docs/stability.md).

    python stability.py --dataset path/to/cifar10_q75_10k.npz       # docs/stability.md's grid
    python stability.py --dataset path/to/cifar10_q75_10k.npz --nets resnet18/64 --batch-sizes 64 --epochs 10 \
        --amps off --steps 100 --trace

Each case is a run as a user starts it: train.py's arguments parsed from the case's flags (so the defaults
apply, the warmup among them), train.py's objective and optimiser, data.train_batches on real images,
schedule.lr_at and train.train_step, for the first --steps steps (or the whole run when it is shorter). It
reports per case the warmup in iterations, the largest and the last loss, the self-teacher h's weight norms
(its 1x1 conv and its classifier, Eq. (4)) at the start, largest and last, the largest norm of h's
gradient, and whether every loss, weight and BatchNorm statistic stayed finite. This is a measurement, not a
test: it reads the device every step.
"""
import itertools
import json
import math
import time

import torch

import cli
import runtime
import schedule
import speedups
import train
from data import load_dataset, train_batches
from errors import ArgumentParser, run_cli
from settings import resolve

GRID = {"nets": ["resnet18/64", "resnet18/16", "torchvision:resnet18", "torchvision:mobilenet_v3_small",
                 "torchvision:convnext_tiny"], "batch_sizes": [16, 64], "epochs": [1, 10, 205], "amps": ["off", "bf16"]}


def parse_args(argv=None):
    p = ArgumentParser(prog="stability.py", description=__doc__.split("\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--dataset", required=True, help="an .npz, as train.py's (docs/stability.md: the 10,000-image "
                                                    "CIFAR-10 subset of docs/results.md)")
    p.add_argument("--train-images", type=int, default=640, help="the first N training images (0: all)")
    p.add_argument("--nets", nargs="+", default=GRID["nets"], help="ARCH/WIDTH for ours, or torchvision:NAME")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=GRID["batch_sizes"])
    p.add_argument("--epochs", nargs="+", type=int, default=GRID["epochs"], help="the runs' --epochs")
    p.add_argument("--amps", nargs="+", default=GRID["amps"], choices=("off", "bf16"))
    p.add_argument("--steps", type=int, default=30, help="steps per case (fewer when the run is shorter)")
    p.add_argument("--extra", default="", help="more train.py flags for every case, e.g. '--lr 0.05'")
    p.add_argument("--trace", action="store_true", help="print every step's loss terms and h's norms")
    p.add_argument("--json", default=None, help="append one JSON line per case to this file")
    return p.parse_args(argv)


def case_args(net, batch_size, epochs, amp, dataset, extra):
    arch, _, width = net.partition("/")
    argv = ["--arch", arch, "--batch-size", str(batch_size), "--epochs", str(epochs), "--amp", amp,
            "--dataset", dataset, "--compile", "off", "--out", "/nonexistent", *extra.split()]
    return cli.parse_args(argv + (["--width", width] if width else []))


def norms(teacher):
    """Frobenius norms of h's 1x1 conv and classifier weights, and of their gradients."""
    grad = lambda p: p.grad.norm().item() if p.grad is not None else 0.0
    conv, fc = teacher.conv.weight, teacher.fc.weight
    return conv.norm().item(), fc.norm().item(), math.hypot(grad(conv), grad(fc))


def run_case(args, data, device, steps_to_run, trace=False):
    """The first steps_to_run steps of the run `args` describes; returns the case's record."""
    s = resolve(args, data, device)
    speed = speedups.speed(s, device)
    runtime.seed_all(args.seed)
    method, opt = train.build(s, data.num_classes, device)
    steps, clip = s.steps_per_epoch, s.clip
    total_steps = min(steps_to_run, steps * s.epochs)
    teacher = method.objective.self_teacher
    conv0, fc0, _ = norms(teacher)
    losses, conv_max, fc_max, grad_max, net_grad_max, start = [], conv0, fc0, 0.0, 0.0, time.time()
    for step in range(total_steps):
        epoch, i = divmod(step, steps)
        if i == 0:
            batches = train_batches(data, s.batch_size, s.seed, epoch)
        lr = schedule.lr_at(step, s)
        speedups.set_lr(opt, lr)
        total, terms, _ = train.train_step(method, opt, speed, next(batches), clip)
        conv, fc, grad = norms(teacher)
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        net_grad_max = max(net_grad_max, torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        losses.append(total.item())
        conv_max, fc_max, grad_max = max(conv_max, conv), max(fc_max, fc), max(grad_max, grad)
        if trace:
            print(f"  step {step + 1} lr {lr:.4f} loss {losses[-1]:.4g} "
                  + " ".join(f"{k} {v.item():.4g}" for k, v in terms.items())
                  + f" | h conv {conv:.4g} fc {fc:.4g} grad {grad:.4g} | largest (clipped) gradient norm "
                  f"{net_grad_max:.4g}",
                  flush=True)
        if not math.isfinite(losses[-1]):
            break
    finite = all(map(math.isfinite, losses)) and not runtime.non_finite_tensors(method.objective)
    return {"warmup_iters": s.warmup_iterations, "clip": clip, "steps": len(losses), "run_steps": steps * s.epochs,
            "loss_first": losses[0], "loss_max": max(losses),
            "loss_last": losses[-1], "h_conv": [conv0, conv_max, conv], "h_fc": [fc0, fc_max, fc],
            "h_grad_max": grad_max, "grad_max": net_grad_max, "finite": finite, "seconds": time.time() - start}


def main(argv=None):
    opts = parse_args(argv)
    device = torch.device("cpu")
    data = load_dataset(opts.dataset, device=device)
    if opts.train_images:
        data.x_train, data.y_train = data.x_train[:opts.train_images], data.y_train[:opts.train_images]
        data.n_train = len(data.y_train)
    print(f"{data.name}: first {data.n_train} training images, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; up to {opts.steps} steps per case")
    print(f"{'net':<31}{'batch':>6}{'epochs':>7}{'amp':>5}{'warmup':>7}{'clip':>5}{'steps':>10}{'loss max':>10}"
          f"{'last':>10}{'h conv 0/max/last':>24}{'h fc 0/max/last':>24}{'h grad max':>11}  finite")
    for net, batch_size, epochs, amp in itertools.product(opts.nets, opts.batch_sizes, opts.epochs, opts.amps):
        r = run_case(case_args(net, batch_size, epochs, amp, opts.dataset, opts.extra), data, device, opts.steps,
                     opts.trace)
        h = lambda v: "/".join(f"{x:.3g}" for x in v)
        print(f"{net:<31}{batch_size:>6}{epochs:>7}{amp:>5}{r['warmup_iters']:>7}{r['clip']:>5g}"
              f"{r['steps']:>5}/{r['run_steps']:<4}{r['loss_max']:>10.4g}{r['loss_last']:>10.4g}"
              f"{h(r['h_conv']):>24}{h(r['h_fc']):>24}{r['h_grad_max']:>11.3g}  {'yes' if r['finite'] else 'NO'}",
              flush=True)
        if opts.json:
            with open(opts.json, "a") as f:
                f.write(json.dumps({"net": net, "batch_size": batch_size, "epochs": epochs, "amp": amp,
                                    "extra": opts.extra, **r}) + "\n")


if __name__ == "__main__":
    run_cli(main)
