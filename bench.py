"""Benchmark the training step of MixSKD and the other methods: ms/step, clean images/s, peak memory, the first
step's time (compilation included), projected run time.

    python bench.py                       # the project's MixSKD step, best settings for this device
    python bench.py --baseline            # ... and the plain way, same process, with the speed-up
    python bench.py --profile 2           # where the step's time goes: torch.profiler, by operator and shape
    python bench.py --profile 2 --baseline   # ... and the plain way's, each with its convolutions' share
    python bench.py --method all          # every method's step, one after the other, in one process
    python bench.py --amp off --channels-last off --compile off --json
    python bench.py --compile off --alternate channels-last --width 16   # channels_last off and on, alternating
    python bench.py --alternate step-graph   # CUDA: today's CUDA graphs against the whole step as one graph
    python bench.py --width 16 --concurrent 1 4 10   # images/s of 1, 4 and 10 runs sharing this machine

The timed step is train.py's own (`train.train_step` fed by `data.train_batches`), never a copy.
`--baseline` also times the plain way to write it (plain.py): a DataLoader with per-image PIL transforms on the
host, eager fp32 in NCHW, default SGD, and `.item()` on every loss term each step. Data are synthetic
CIFAR-100-shaped uint8 images (50,000 x 32 x 32 x 3, 100 classes): speed does not depend on pixels.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch

import cli
import runtime
import speedups
import train
from data import STATS, pixel_stats, train_batches
from errors import ArgumentParser, run_cli
from methods import METHODS, RECIPES
from plain import plain_stepper
from settings import resolve

SPEC_STEPS = 50_000 // 64 * 205  # the recipe's CIFAR-100 run: 781 steps per epoch, 205 epochs
PLAIN = ("mixskd", "ce", "mixup", "cutmix")  # the methods whose plain way plain_step writes
# --alternate NAME: the flag it varies and its two values (the last two: CUDA's levers against its default)
ALTERNATIVES = {"channels-last": ("channels_last", ("off", "on")), "compile": ("compile", ("off", "default")),
                "max-autotune": ("compile", ("reduce-overhead", "max-autotune")),
                "step-graph": ("compile", ("reduce-overhead", "step-graph"))}


def parser():
    p = ArgumentParser(prog="bench.py",
                       description="Time the MixSKD training step (and the plain way with --baseline).",
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--arch", default="resnet18", help="as train.py's --arch: ours, torchvision:NAME or timm:NAME")
    p.add_argument("--width", type=int, default=64, help="channels of the first stage, as train.py's --width")
    p.add_argument("--stem", default="cifar", choices=("cifar", "imagenet"), help="our ResNets' stem")
    p.add_argument("--image-size", type=int, default=32, help="side of the synthetic square images")
    p.add_argument("--batch-size", type=int, default=64, help="clean images per step")
    p.add_argument("--method", nargs="+", default=["mixskd"], choices=("all", *METHODS),
                   help="as train.py's --method; several, or all, are timed one after the other in one process")
    p.add_argument("--recipe", default="paper", choices=RECIPES, help="as train.py's --recipe (mixskd)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                   help="as train.py: auto = bf16 on CUDA and on CPUs with native bf16 kernels")
    p.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"), help="auto: on for CUDA")
    p.add_argument("--compile", default="auto",
                   choices=("auto", "off", "default", "reduce-overhead", "max-autotune", "step-graph"),
                   help="as train.py for the recipe's 205-epoch CIFAR-100 run: reduce-overhead (CUDA graphs) on CUDA, "
                        "default on a CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 50 on CUDA, 4 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 20 on CUDA, 2 on CPU)")
    p.add_argument("--baseline", action="store_true", help="also time the plain way and print the ratio (mixskd, "
                                                           "ce, mixup and cutmix)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the baseline")
    p.add_argument("--alternate", choices=tuple(ALTERNATIVES), default=None,
                   help="time the step with channels_last off and on (compile: eager and --compile default; "
                        "max-autotune, step-graph: --compile reduce-overhead and that mode, on CUDA), each its own "
                        "model, in alternating blocks of --steps steps in this process, and print each's median and "
                        "the ratio (one process, so that a drift of the machine's speed falls on both)")
    p.add_argument("--blocks", type=int, default=None, help="blocks per setting of --alternate (default 5); with "
                   "--baseline, more than 1 times the plain way and ours in alternating blocks (default 1: one after "
                   "the other)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="instead of timing, profile N steps of the step (after --warmup) with torch.profiler and print "
                        "its operators by self time, grouped by input shape (on CUDA, by self CUDA time), and on a CPU "
                        "the convolutions' share of it; with --baseline the plain way's step likewise")
    p.add_argument("--concurrent", type=int, nargs="+", default=None, metavar="N",
                   help="for each N, start N processes of this benchmark at once (one method; on a CPU each gets "
                        "cores/N threads, as experiments.sh's JOBS), time every one's step over the same --window "
                        "seconds after all have warmed up, and print the images/s of all N together: how many runs "
                        "to start on one machine")
    p.add_argument("--window", type=float, default=None,
                   help="seconds each --concurrent process steps for (default 30 on CUDA, 20 on a CPU)")
    p.add_argument("--ready", default=None, help=argparse.SUPPRESS)  # DIR:N, a --concurrent process's barrier
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def parse_args(argv=None):
    return parser().parse_args(argv)


def train_args(args, method, **speed):
    """train.py's arguments for this benchmark: the recipe's defaults plus the speed flags (speed: any of them
    instead of args', as channels_last="on")."""
    speed = {key: speed.get(key) or getattr(args, key) for key in ("amp", "channels_last", "compile")}
    width = [] if ":" in args.arch else ["--width", str(args.width)]  # library networks have their own widths
    recipe = ["--recipe", args.recipe] if method == "mixskd" else []
    return cli.parse_args(["--arch", args.arch, *width, "--batch-size", str(args.batch_size), "--method", method,
                           *recipe, "--amp", speed["amp"], "--channels-last", speed["channels_last"],
                           "--compile", speed["compile"],
                           "--dataset", "imagenet" if args.stem == "imagenet" else "cifar100"])


def synthetic_cifar(device, size=32, classes=100):
    """CIFAR-100-shaped random uint8 images: 50,000 at 32 x 32, fewer when larger (150 MB at most)."""
    n = min(50_000, 150_000_000 // (3 * size * size))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    mean, std = STATS["cifar100"]
    return SimpleNamespace(kind="tensors", images=images, labels=labels, num_classes=classes, mean=mean, std=std,
                           n_train=n,
                           x_train=images.permute(0, 3, 1, 2).contiguous().to(device), y_train=labels.to(device),
                           stats=pixel_stats(mean, std, device), image_size=size)


def peak_memory_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:  # Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(step, warmup, steps, device):
    """(seconds per step of step() after warmup steps, peak memory, seconds of the first step), with the device
    drained at both ends. The first step holds the compilation of a compiled step."""
    first = 0.0
    for i in range(warmup):
        start = time.perf_counter()
        step()
        if i == 0:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first = time.perf_counter() - start
    peak_memory_reset(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps, peak_memory_mib(device), first


# ----------------------------------------------------------------------------- the project's step


def fast_stepper(targs, data, device):
    """train.py's loop body: device-side batches from data.train_batches, then train.train_step."""
    torch.manual_seed(0)
    s = resolve(targs, data, device)  # --compile auto as for the recipe's run: 50,000 images, 205 epochs
    speed = speedups.speed(s, device)
    method, opt = train.build(s, data.num_classes, device, data.y_train)
    speedups.wrap(method, s.compile, device, world=1)
    state = {"epoch": 0, "batches": iter(())}

    def step():
        batch = next(state["batches"], None)
        if batch is None:
            state["epoch"] += 1
            method.set_epoch(state["epoch"], s.epochs)
            state["batches"] = train_batches(data, s.batch_size, 0, state["epoch"], extra=method.extra)
            batch = next(state["batches"])
        speedups.set_lr(opt, 0.01)
        train.train_step(method, opt, speed, batch)

    return step, {"amp": s.amp, "channels_last": s.channels_last, "compile": s.compile}


def measured(modes, blocks, warmup, steps, device):
    """(mode, seconds per step, peak memory, first step's seconds, settings) of each (mode, make) of modes. With one
    block, one mode after the other, each alone in memory; with more (--baseline --blocks N), all built, then
    their steps timed in alternating blocks, seconds the median of each's blocks (so that a drift of the
    machine's speed falls on all of them; peak memory then counts every mode's model)."""
    if blocks == 1:
        for mode, make in modes:
            step, settings = make()
            yield mode, *timed(step, warmup, steps, device), settings
            del step
        return
    built = {mode: make() for mode, make in modes}
    first = {mode: timed(step, warmup, 1, device)[2] for mode, (step, _) in built.items()}
    seconds, memory = {mode: [] for mode in built}, {}
    for block in range(blocks):
        for mode in list(built) if block % 2 == 0 else list(built)[::-1]:
            took, memory[mode], _ = timed(built[mode][0], 0, steps, device)
            seconds[mode].append(took)
    for mode, (_, settings) in built.items():
        yield mode, float(np.median(seconds[mode])), memory[mode], first[mode], settings


def alternated(args, method, data, device, warmup, steps):
    """--alternate FLAG: {value: seconds} for FLAG's two values (ALTERNATIVES), each one's step timed by measured:
    the median over --blocks blocks of `steps` steps, the blocks alternating, after `warmup` steps of each."""
    flag, values = ALTERNATIVES[args.alternate]
    modes = [(value, lambda value=value: fast_stepper(train_args(args, method, **{flag: value}), data, device))
             for value in values]
    return {value: seconds for value, seconds, *_ in measured(modes, args.blocks, warmup, steps, device)}


def windowed(step, warmup, window, device, ready):
    """A --concurrent process: (steps, seconds) of step() called for `window` seconds, after `warmup` steps and
    after every process of its group has warmed up. ready is "DIR:N": each process writes a file in DIR once
    warm and starts timing when N are there, so that all N time their steps over the same seconds."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    folder, n = ready.rsplit(":", 1)
    open(os.path.join(folder, f"ready.{os.getpid()}"), "w").close()
    deadline = time.monotonic() + 1800
    while sum(name.startswith("ready.") for name in os.listdir(folder)) < int(n):
        if time.monotonic() > deadline:
            sys.exit(f"error: {n} --concurrent processes were not all warm after 30 minutes: fewer at once")
        time.sleep(0.01)
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < window:
        step()
        steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps, time.perf_counter() - start


def read_back(f):
    """The text written to the open file f, which is then closed."""
    f.seek(0)
    with f:
        return f.read()


def concurrent(args, method, device, warmup, window):
    """--concurrent: for each N, N processes of this benchmark started together, each timing its step over the
    same window (windowed); a dict per N with the images/s of each process and of all N together. On a CPU each
    process gets cores/N threads (at least one), as experiments.sh gives its JOBS, unless OMP_NUM_THREADS is
    set."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    width = [] if ":" in args.arch else ["--width", str(args.width)]
    argv = [sys.executable, os.path.abspath(__file__), "--arch", args.arch, *width, "--stem", args.stem,
            "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--method", method,
            "--recipe", args.recipe, "--device", str(device), "--amp", args.amp, "--channels-last",
            args.channels_last, "--compile", args.compile, "--warmup", str(warmup), "--window", str(window), "--json"]
    rows = []
    for n in args.concurrent:
        env = dict(os.environ)
        if device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
            env["OMP_NUM_THREADS"] = str(max(1, cores // n))
        with tempfile.TemporaryDirectory() as folder:
            outs, errs = ([open(os.path.join(folder, f"{kind}{i}"), "w+") for i in range(n)] for kind in "oe")
            procs = [subprocess.Popen(argv + ["--ready", f"{folder}:{n}"], stdout=out, stderr=err, env=env)
                     for out, err in zip(outs, errs)]
            while any(p.poll() is None for p in procs) and all(p.poll() in (None, 0) for p in procs):
                time.sleep(0.2)
            failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
            for p in procs:
                if failed is not None:
                    p.kill()  # the others would wait for it at the barrier
                p.wait()
            outs, errs = [[read_back(f) for f in files] for files in (outs, errs)]
        if failed is not None:
            tail = errs[failed].strip().splitlines()[-1:] or ["(no output)"]
            sys.exit(f"error: --concurrent process {failed + 1} of {n} failed: {tail[0]}")
        runs = [json.loads(out) for out in outs]
        rows.append({"runs": n, "threads_per_run": runs[0]["threads"], "settings": runs[0]["settings"],
                     "images_per_s": sum(r["images_per_s"] for r in runs),
                     "images_per_s_each": [r["images_per_s"] for r in runs], "steps_each": [r["steps"] for r in runs]})
    return rows


def profiled(step, warmup, steps, device, rows=15):
    """torch.profiler's table of steps calls of step() after warmup ones: the operators by self time (CPU, or
    CUDA on a GPU), grouped by input shape, so that one layer's convolution stands apart from another's. On a CPU
    a line follows with the ms per step of all operators and of the convolutions (forward and backward) among them;
    not on CUDA, where the time falls on kernels (cuDNN's, or a CUDA graph's replay) that no operator name marks."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
    with profile(activities=activities, record_shapes=True) as trace:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    rows_by_shape = trace.key_averages(group_by_input_shape=True)
    table = rows_by_shape.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=rows,
                                max_name_column_width=32, max_shapes_column_width=80)
    if cuda:
        return table
    total = sum(e.self_cpu_time_total for e in rows_by_shape) / steps / 1e3  # microseconds -> ms per step
    conv = sum(e.self_cpu_time_total for e in rows_by_shape if "convolution" in e.key) / steps / 1e3
    return (table + f"\nper step (profiled): {total:.1f} ms of operators, {conv:.1f} ms of them convolutions "
            f"({100 * conv / max(total, 1e-9):.0f}%), {total - conv:.1f} ms the rest")


# ----------------------------------------------------------------------------- main


def stepper_makers(args, method, data, device):
    """[(mode, make)] for method: "fast", train.py's step, and with --baseline (for PLAIN's methods) "baseline",
    the plain way's, first; make() builds that stepper, so that each is built only when its turn comes."""
    targs = train_args(args, method)
    makers = [("fast", lambda: fast_stepper(targs, data, device))]
    if args.baseline and method in PLAIN:
        makers.insert(0, ("baseline", lambda: plain_stepper(targs, data, device, args.workers)))
    return makers


def print_profiles(args, methods, data, device, warmup, name):
    """--profile: each method's step under torch.profiler (profiled); with --baseline the plain way's first."""
    for method in methods:
        for mode, make in stepper_makers(args, method, data, device):
            step, settings = make()
            print(f"{name}, {method} {mode} {args.arch} width {args.width}, "
                  + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in settings.items())
                  + f": {args.profile} step{'s' * (args.profile > 1)} profiled after {warmup}")
            print(profiled(step, warmup, args.profile, device))


def print_alternated(args, methods, data, device, warmup, steps, name):
    """--alternate: each method's step with the setting off and on, in alternating blocks (alternated)."""
    flag, (a, b) = ALTERNATIVES[args.alternate]
    for method in methods:
        median = alternated(args, method, data, device, warmup, steps)
        fixed = {k: getattr(args, k) for k in ("amp", "channels_last", "compile") if k != flag}
        print(json.dumps({"device": name, "method": method, "arch": args.arch, "width": args.width, **fixed,
                          "alternate": args.alternate, "blocks": args.blocks, "steps": steps,
                          "ms_per_step": {k: 1000 * v for k, v in median.items()},
                          "ratio": median[b] / median[a]}) if args.json else
              f"{name}, {method} {args.arch} width {args.width}, "
              + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in fixed.items())
              + f": --{flag.replace('_', '-')} {a} {1000 * median[a]:.1f} ms/step, {b} {1000 * median[b]:.1f} "
              f"ms/step "
              f"({b}/{a} {median[b] / median[a]:.3f}; medians of {args.blocks} alternating blocks of {steps} "
              f"steps)")


def print_concurrent(args, method, device, warmup, window):
    """--concurrent: the images/s of N processes together for each N (concurrent), and against one process."""
    rows = concurrent(args, method, device, warmup, window)
    one = next((r["images_per_s"] for r in rows if r["runs"] == 1), None)
    for r in rows:
        r["ratio_to_one"] = r["images_per_s"] / one if one else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    if args.json:
        return print(json.dumps({"device": name, "torch": torch.__version__, "method": method, "arch": args.arch,
                                 "width": args.width, "batch_size": args.batch_size, "warmup": warmup,
                                 "window_s": window, "results": rows}))
    print(f"{name}, torch {torch.__version__}: {method} {args.arch} width {args.width}, batch {args.batch_size}, "
          + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in rows[0]["settings"].items())
          + f"; each process steps for {window:g} s once all have taken {warmup} warm-up steps")
    for r in rows:
        each = ", ".join(f"{x:.0f}" for x in r["images_per_s_each"])
        threads = r["threads_per_run"]
        print(f"{r['runs']:>3} at once, {threads} CPU thread{'s' * (threads > 1)} each: {r['images_per_s']:8.0f} "
              f"img/s together ({each})" + (f", {r['ratio_to_one']:.2f}x one run" if r["ratio_to_one"] else ""))


def print_window(args, method, data, device, warmup, window, name):
    """One process of --concurrent: its step timed over the window all processes share, as one JSON line."""
    step, settings = fast_stepper(train_args(args, method), data, device)
    steps_done, seconds = windowed(step, warmup, window, device, args.ready)
    return print(json.dumps({"device": name, "threads": torch.get_num_threads(), "settings": settings,
                             "steps": steps_done, "seconds": seconds,
                             "images_per_s": steps_done * args.batch_size / seconds}))


def print_measured(args, methods, data, device, warmup, steps, name):
    """The default mode: each method's fast step (and with --baseline the plain way's, alternating in blocks)
    timed, printed as a line per method and mode, or as one JSON object with --json."""
    # few timed steps make a noisy mean, and the projection multiplies it by 160,000 steps
    estimate = "training steps only" + (f"; rough, from {steps} timed step{'s' * (steps > 1)}" if steps < 10 else "")
    results = []
    for method in methods:
        modes = stepper_makers(args, method, data, device)
        for mode, seconds, memory, first, settings in measured(modes, args.blocks, warmup, steps, device):
            results.append({"method": method, "mode": mode, **settings, "ms_per_step": 1000 * seconds,
                            "images_per_s": args.batch_size / seconds, "peak_memory_mib": memory,
                            "first_step_s": first, "projected_205_epochs_min": seconds * SPEC_STEPS / 60})
    for plain in (r for r in results if r["mode"] == "baseline"):
        ours = next(r for r in results if r["method"] == plain["method"] and r["mode"] == "fast")
        ours["speedup"] = plain["ms_per_step"] / ours["ms_per_step"]
    report = {"device": name, "torch": torch.__version__, "arch": args.arch, "width": args.width,
              "stem": "the network's own" if ":" in args.arch else args.stem, "image_size": args.image_size,
              "batch_size": args.batch_size, "recipe": args.recipe, "warmup": warmup, "steps": steps,
              "results": results}
    if args.json:
        return print(json.dumps(report))
    ours = ":" not in args.arch  # width and stem are our ResNets' settings
    print(f"{name}, torch {torch.__version__}: {args.arch}{f' width {args.width}, {args.stem} stem' if ours else ''}"
          f", {args.image_size} px, batch {args.batch_size}, {steps} timed step{'s' * (steps > 1)} after {warmup} "
          f"(mixskd: recipe {args.recipe})")
    for r in results:
        print(f"{r['method']:<13}{r['mode']:<9} {r['ms_per_step']:9.1f} ms/step {r['images_per_s']:8.0f} img/s  "
              f"peak {r['peak_memory_mib']:7.0f} MiB  first step {r['first_step_s']:6.1f} s  205 epochs ~ "
              f"{r['projected_205_epochs_min']:.0f} min ({estimate}) | amp {r['amp']}, channels_last "
              f"{r['channels_last']}, compile {r['compile']}"
              + (f" | {r['speedup']:.2f}x the plain way" if "speedup" in r else ""))


def main(argv=None):
    args = parse_args(argv)
    device = runtime.pick_device(args.device)
    cuda = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (20 if cuda else 2)
    steps = args.steps if args.steps is not None else (50 if cuda else 4)
    args.blocks = args.blocks or (5 if args.alternate else 1)
    if steps < 1 or warmup < 0 or args.image_size < 8 or args.workers < 0 or args.blocks < 1 or args.profile < 0:
        sys.exit("error: --steps and --blocks must be at least 1, --warmup, --workers and --profile at least 0, "
                 "--image-size at least 8")
    if args.profile and (args.alternate or args.json):
        sys.exit("error: --profile profiles the step (with --baseline, and the plain way's): drop --alternate and "
                 "--json")
    methods = list(METHODS) if "all" in args.method else list(dict.fromkeys(args.method))
    window = args.window if args.window is not None else (30.0 if cuda else 20.0)
    if args.concurrent or args.ready:
        if args.profile or args.alternate or args.baseline or len(methods) > 1:
            sys.exit("error: --concurrent times one method's step alone: give one --method and drop --profile, "
                     "--alternate and --baseline")
        if min(args.concurrent or [1]) < 1 or window <= 0:
            sys.exit("error: --concurrent takes numbers of processes of at least 1, --window seconds above 0")
    if args.concurrent:
        return print_concurrent(args, methods[0], device, warmup, window)
    data = synthetic_cifar(device, args.image_size)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    if args.ready:  # one process of --concurrent
        return print_window(args, methods[0], data, device, warmup, window, name)
    if args.profile:
        return print_profiles(args, methods, data, device, warmup, name)
    if args.alternate:
        return print_alternated(args, methods, data, device, warmup, steps, name)
    return print_measured(args, methods, data, device, warmup, steps, name)


if __name__ == "__main__":
    run_cli(main)
