"""How a run runs: on which device and processes, from which random state; how it starts and stops.

Plumbing for train.py and bench.py: the run folder checked before a start and cleaned after a failed one, Ctrl-C
answered with the resume command; under torchrun one process group (NCCL on CUDA, gloo on CPU) and gathers across
ranks; every random generator seeded, captured and restored (exact resume); what made a run's numbers (the git
revision, the device). How fast the step runs (`--amp`, `--channels-last`, `--compile`) is speedups.py.
"""
import contextlib
import hashlib
import json
import os
import random
import shlex
import shutil
import sys

import numpy as np
import torch
import torch.distributed as dist

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
