"""How a run runs: on which device and processes, from which random state, how fast; how it starts and stops.

Plumbing for train.py and bench.py: the run folder checked before a start and cleaned after a failed one, Ctrl-C
answered with the resume command; under torchrun one process group (NCCL on CUDA, gloo on CPU), one
DistributedDataParallel wrapper and gathers across ranks; every random generator seeded, captured and restored
(exact resume); `--amp`, `--channels-last`, `--compile` resolved from `auto` (measured: docs/performance.md) and
what the step needs of them (autocast, GradScaler, memory format).
"""
import contextlib
import hashlib
import importlib.util
import json
import os
import random
import shlex
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from errors import UserError

# ----------------------------------------------------------------------------- processes


def world_size():
    return int(os.environ.get("WORLD_SIZE", 1))


def rank():
    """This process's rank under torchrun (0 without it), before the process group exists."""
    return int(os.environ.get("RANK", 0))


def pick_device(name=None):
    """--device as a torch.device (default: cuda when available), with one line where it cannot be used."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"--device {name}: not a device PyTorch knows; use cuda, cuda:N or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: PyTorch sees no CUDA GPU on this machine (torch.cuda.is_available() "
                        f"is False): use --device cpu, or install a CUDA build of PyTorch")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"--device {name}: this project runs on cuda or cpu")
    return device


def setup_distributed(args):
    """(rank, world size, device). Under torchrun join the process group: NCCL on CUDA, one GPU per
    process; gloo on CPU."""
    world = world_size()
    cuda = pick_device(args.device).type == "cuda"
    if world == 1:
        return 0, 1, pick_device(args.device)
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


@contextlib.contextmanager
def processes(args):
    """(rank, world size, device) for the length of a run; the process group is left at its end. After a run
    that ended normally every rank waits for the others first: under gloo, a rank that left the group while
    rank 0 still wrote its files sometimes aborted at exit ("terminate called without an active exception")."""
    try:
        yield setup_distributed(args)
        if dist.is_initialized():
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def all_ranks(value, world):
    """[value of rank 0, value of rank 1, ...] on every rank."""
    if world == 1:
        return [value]
    values = [None] * world
    dist.all_gather_object(values, value)
    return values


def sum_over_ranks(tensor, world):
    """The sum of a device tensor over all ranks, on every rank (so all ranks decide alike)."""
    if world > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def merge_store(store, world, rows=65_536):
    """At the end of an epoch under torchrun, every rank gets the rows the other ranks wrote into a PS-KD store
    (baselines.PredictionStore): each row was written by one rank alone (disjoint shards), so the sum of the
    ranks' written rows, zero elsewhere, is that rank's row exactly. In chunks of `rows`, to bound the memory."""
    if world > 1:
        for start in range(0, store.probs.shape[0], rows):
            probs, written = store.probs[start:start + rows], store.written[start:start + rows]
            mine, writers = torch.where(written[:, None], probs, 0.0), written.int()
            dist.all_reduce(mine)
            dist.all_reduce(writers)
            probs.copy_(torch.where(writers[:, None] > 0, mine, probs))
    store.written.zero_()


def non_finite_tensors(objective):
    """The names of the weights and BatchNorm statistics that are not finite (one device sync when all are)."""
    tensors = [(name, t) for name, t in [*objective.named_parameters(), *objective.named_buffers()]
               if t.is_floating_point()]
    if torch.stack([torch.isfinite(t).all() for _, t in tensors]).all():
        return []
    return [name for name, t in tensors if not torch.isfinite(t).all()]


def provenance(device):
    """What made a run's numbers: the code's git revision (None outside a git checkout; "dirty" when files
    differ from it), the device's name, torch's version."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    git = lambda *a: subprocess.run(["git", "-C", here, *a], capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        revision, dirty = git("rev-parse", "HEAD") or None, bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        revision, dirty = None, False
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else f"{cpu_name()}, {torch.get_num_threads()} threads"
    return {"git_revision": revision, "git_dirty": dirty, "device_name": name, "torch": torch.__version__}


def cpu_name():
    """The CPU's model name (Linux: /proc/cpuinfo), else "CPU"."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "CPU")
    except OSError:
        return "CPU"


def parameter_digest(*modules):
    """sha256 of every parameter's bytes: equal on all ranks exactly when the replicas agree."""
    h = hashlib.sha256()
    for module in modules:
        for p in module.parameters() if module is not None else ():
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- a run's start and stop


def check_run_folder(args, resume=None):
    """A new run needs a folder without last.pt, --resume one with it. Returns a message when there is
    nothing to do: --resume of a run that finished at the same --epochs (resume: cli.resume_arguments' record of
    the run's last.pt, whose epochs a resume without --epochs continues to)."""
    last, summary = os.path.join(args.out, "last.pt"), os.path.join(args.out, "summary.json")
    if os.path.exists(last) and not args.resume:
        raise UserError(f"{args.out} already holds a run (last.pt): pass --resume to continue it, or another --out")
    if args.extend and not args.resume:
        raise UserError("--extend continues a run: pass it together with --resume")
    if args.resume and os.path.exists(summary):
        with open(summary) as f:
            done = json.load(f)
        # summary.json counts epochs from 1; one written before it did (no best_epoch_chosen_on) from 0
        epochs = (done.get("settings") or done["args"])["epochs"]
        final = done["final_epoch"] + ("best_epoch_chosen_on" not in done)
        with open(os.path.join(args.out, "metrics.jsonl")) as f:  # an --extend under way has logged beyond
            logged = max(json.loads(line)["epoch"] for line in f)
        asked = getattr(args, "epochs", None) or (resume or {}).get("epochs", epochs)
        if epochs == asked == final == logged + 1:
            return (f"{args.out} is complete ({epochs} of {epochs} epochs): nothing to do, no file changed; to "
                    f"train it longer, pass a larger --epochs together with --extend")
    return None


@contextlib.contextmanager
def cleanup_failed_start(out, rank):
    """A run that fails or is interrupted before its first checkpoint undoes what it wrote: removes the folder
    when it made it, else puts metrics.jsonl and args.json back as they were. A folder holding last.pt is not
    touched."""
    made, files = not os.path.exists(out), [os.path.join(out, name) for name in ("metrics.jsonl", "args.json")]
    kept = {}
    for path in files:  # setup rewrites them: a failed start puts them back
        if os.path.exists(path):
            with open(path, "rb") as f:
                kept[path] = f.read()
    try:
        yield
    except BaseException:
        if rank == 0 and not os.path.exists(os.path.join(out, "last.pt")):
            if made:
                shutil.rmtree(out, ignore_errors=True)
            for path in [] if made else files:
                if path in kept:
                    with open(path, "wb") as f:
                        f.write(kept[path])
                elif os.path.exists(path):
                    os.remove(path)
        raise


def interrupted(args, argv):
    """Ctrl-C: rank 0 prints one line, what last.pt holds and the exact command that resumes the run;
    returns 130, the exit status of a program stopped by SIGINT."""
    if rank() != 0:
        return 130
    last = os.path.join(args.out, "last.pt")
    line = "interrupted before the first epoch ended: nothing was saved"
    if os.path.exists(last):
        try:
            ckpt = torch.load(last, map_location="cpu", weights_only=True)
            done, epochs = ckpt["epoch"] + 1, (ckpt.get("settings") or ckpt["args"])["epochs"]
        except Exception:
            done, epochs = "?", "?"
        world = world_size()  # the script as it was given (sys.argv[0]): the line works where the run started
        launcher = ["torchrun", "--standalone", f"--nproc_per_node={world}"] if world > 1 else [sys.executable]
        command = shlex.join([*launcher, sys.argv[0], *(a for a in argv if a != "--resume"), "--resume"])
        line = f"interrupted after {done} of {epochs} epochs: {last} holds them; resume with: {command}"
    # on a terminal the live progress line has no newline yet: start on a line of our own
    print(("\n" if sys.stdout.isatty() else "") + line, file=sys.stderr, flush=True)
    return 130


def check_writable(out, rank=0):
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{rank}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to output folder {out} ({e.strerror}): choose another --out") from None


# ----------------------------------------------------------------------------- random generators


def seed_all(seed):
    """Seed every generator a run draws from: torch (CPU and CUDA), NumPy (lam, CutMix boxes), Python."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def rng_state(device):
    """Every generator a step draws from, as tensors and plain values (loadable with weights_only)."""
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


# ----------------------------------------------------------------------------- speed


CPU_COMPILE_STEPS = 3_000  # a CPU run this long repays its compilation (measured: docs/performance.md)


def resolve_speed(amp, channels_last, compile, device, world=1, run_steps=0):
    """The `auto` speed flags resolved for a device: {"amp": bf16|fp16|off, "channels_last": bool, "compile": mode
    or "off"}. channels_last: on CUDA, and on a CPU for an eager step under bf16 autocast. --compile auto compiles
    on CUDA (CUDA graphs, but plain compilation under torchrun, where CUDA graphs with DDP's gradient hooks are
    unverified), and on a CPU a run of at least CPU_COMPILE_STEPS steps: on 2 cores
    compiling took 85-95 s and saved 16% of a width-16 step (340 -> 287 ms) and 12% at width 64 (3,048 -> 2,689
    ms), so it repays itself after about 1,600 and 270 steps. Where compilation cannot run (no C++ compiler on a
    CPU, no Triton on CUDA), one line says so and the run is eager."""
    if compile == "auto":
        if device.type == "cuda":
            compile = "default" if world > 1 else "reduce-overhead"
        else:
            compile = "default" if run_steps >= CPU_COMPILE_STEPS else "off"
    if compile == STEP_GRAPH and (why := step_graph_refused(device, world, amp)):
        raise UserError(f"--compile {STEP_GRAPH} captures the whole step in one CUDA graph and {why}")
    if compile != "off" and (missing := compiler_missing(device)):
        if rank() == 0:
            print(f"note: --compile {compile} needs {missing}, which this machine lacks: the run is eager",
                  file=sys.stderr)
        compile = "off"
    dtype = autocast_dtype(amp, device)
    if compile == STEP_GRAPH and dtype == torch.float16:  # --amp auto on a GPU without bf16
        raise UserError(f"--compile {STEP_GRAPH} captures the whole step in one CUDA graph and "
                        f"{step_graph_refused(device, world, 'fp16')} (--amp auto chose fp16: this GPU lacks bf16)")
    # channels_last on a CPU pays in an eager bf16 step (11-28% at widths 16-64), not in a compiled one (2%, noise)
    # nor in fp32 (-12% to +7%): docs/performance.md
    auto = device.type == "cuda" or (compile == "off" and dtype == torch.bfloat16)
    return {"amp": {torch.bfloat16: "bf16", torch.float16: "fp16", None: "off"}[dtype],
            "channels_last": channels_last == "on" or (channels_last == "auto" and auto), "compile": compile}


def speed(s, device):
    """What the step needs of the speed settings s (settings.Settings, or anything with amp, channels_last and
    compile resolved): autocast (a context), scaler (a GradScaler, active for fp16 only) and cudagraphs (whether
    each step must be marked for CUDA graph replay); the memory format is the method's (train.build)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[s.amp]
    return SimpleNamespace(
        autocast=torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        cudagraphs=s.compile in ("reduce-overhead", "max-autotune"),
        step_graph=StepGraph() if s.compile == STEP_GRAPH else None,
    )


STEP_GRAPH = "step-graph"  # --compile: default compilation, and the whole step replayed as one CUDA graph


def step_graph_refused(device, world, amp):
    """Why --compile step-graph cannot run here (None where it can): it needs CUDA, one process (DDP's
    gradient hooks are not captured) and no fp16 (GradScaler's step waits on the host for its inf check)."""
    if device.type != "cuda":
        return "needs CUDA: on a CPU use --compile default or off"
    if world > 1:
        return "runs in one process: under torchrun use --compile default"
    if amp == "fp16":
        return "needs --amp bf16 or off: fp16's GradScaler waits on the host every step"
    return None


class StepGraph:
    """The step after its inputs, as one CUDA graph: forward, losses, backward, the clip and SGD, replayed every
    step after the first `warmup` (which run eagerly on a side stream, as torch.cuda.graph's documentation asks,
    and compile, pick cuDNN's kernels and make SGD's momentum buffers), so that no Python and no launch sits
    between its kernels. Each call copies the step's inputs into the graph's own tensors and returns the graph's
    outputs, which the next replay overwrites. What changes between steps must be on the device: the inputs (lam
    and perm are tensors), and the lr, which the first call turns into a float32 tensor of each group (set_lr
    fills it; fused SGD then steps with float32(lr) where a float lr is used as a double, a difference of an ulp).

        step = StepGraph()
        total, terms, logits = step(update, inputs, opt)   # update(*inputs): what the graph runs

    (train.update is that function.) Source: "Whole-network capture", CUDA semantics, PyTorch documentation."""

    def __init__(self, warmup=3):
        self.warmup, self.calls, self.graph = warmup, 0, None

    def __call__(self, update, inputs, opt):
        self.calls += 1
        # a float lr would be frozen into the graph: a tensor from the first step on, so that eager and replayed
        # steps (and a resumed run's) read the same float32
        if self.calls == 1:
            for group in opt.param_groups:
                if not torch.is_tensor(group["lr"]):
                    group["lr"] = torch.tensor(group["lr"], device=inputs[0].device)
            self.lr = [group["lr"] for group in opt.param_groups]
        if any(group["lr"] is not lr for group, lr in zip(opt.param_groups, self.lr)):
            raise RuntimeError("an optimiser group's lr tensor was replaced, and the graph reads the old one: set the "
                               "lr with runtime.set_lr")
        if self.graph is None and self.calls <= self.warmup:
            return self.eager(update, inputs)
        if self.graph is None:
            self.inputs = [value.clone() for value in inputs]
            self.graph, self.outputs = self.capture(update, self.inputs)
        for static, value in zip(self.inputs, inputs):
            static.copy_(value)
        self.graph.replay()
        return self.outputs

    @staticmethod
    def eager(update, inputs):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outputs = update(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        return outputs

    @staticmethod
    def capture(update, inputs):
        """(graph, outputs): update(*inputs) recorded once, its outputs the tensors each replay writes; nothing
        runs until the first replay."""
        graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread (image folders) may call CUDA during the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = update(*inputs)
        return graph, outputs


def set_lr(opt, lr):
    """Every group's lr to `lr`: filled into the group's tensor where it has one (StepGraph's), else assigned."""
    for group in opt.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def compiler_missing(device):
    """What torch.compile needs on this device and this machine lacks: Triton for CUDA, a C++ compiler (the one
    inductor calls: $CXX, else g++) for a CPU; None when nothing is missing."""
    if device.type == "cuda":
        return None if importlib.util.find_spec("triton") else "Triton (pip install triton)"
    cxx = os.environ.get("CXX", "g++")
    return None if shutil.which(cxx) else f"a C++ compiler ({cxx})"


def autocast_dtype(choice, device):
    """auto: bf16 on CUDA (fp16 where the GPU lacks bf16); on a CPU, bf16 only where oneDNN reports
    native bf16 kernels (AVX512-BF16 or AMX), else fp32, since emulated bf16 is slower than fp32."""
    if choice == "off":
        return None
    if choice == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    if choice == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs CUDA; on CPU use --amp bf16 or off")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def wrap(method, compile, device, world, sync_bn=False):
    """Set the method's `forward` to what the step calls: its objective under DistributedDataParallel with several
    processes (one wrapper, so every trained gradient is averaged, the self-teacher's and the discriminators'
    too), then compiled when `compile` (a torch.compile mode, or "off") asks (forward and losses as one graph).
    sync_bn makes its BatchNorm layers SyncBatchNorm first (statistics over all GPUs)."""
    objective = method.objective
    if sync_bn and world > 1:
        objective.net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(objective.net)
    if world > 1:
        objective = DistributedDataParallel(objective, device_ids=[device] if device.type == "cuda" else None,
                                            find_unused_parameters=method.unused_parameters)
    if compile != "off":
        # where a frame cannot be compiled (no Triton, no C++ compiler, an unsupported op), run it eager
        # with a warning instead of stopping the run
        torch._dynamo.config.suppress_errors = True
        objective = torch.compile(objective, mode=None if compile in ("default", STEP_GRAPH) else compile)
    method.forward = objective
    return method
