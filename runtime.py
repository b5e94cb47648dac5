"""How the training step runs: on which device and processes, from which random state, how fast.

Plumbing for train.py and bench.py, not the method. Under torchrun (WORLD_SIZE, RANK, LOCAL_RANK set)
every process joins one process group (NCCL on CUDA, one GPU per process; gloo on CPU), the objective
is wrapped once in DistributedDataParallel, and small values are gathered from every rank. Every random
generator a step draws from is seeded, captured and restored here, so a resumed run continues exactly.
`--amp`, `--channels-last` and `--compile` resolve `auto` to what pays on the device; the README's
Performance section has the measurements behind each choice.
"""
import contextlib
import hashlib
import os
import random
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from data import UserError
from losses import TERMS

# ----------------------------------------------------------------------------- processes


def world_size():
    return int(os.environ.get("WORLD_SIZE", 1))


def setup_distributed(args):
    """(rank, world size, device). Under torchrun join the process group: NCCL on CUDA, one GPU per
    process; gloo on CPU."""
    world = world_size()
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


@contextlib.contextmanager
def processes(args):
    """(rank, world size, device) for the length of a run; the process group is left at its end."""
    try:
        yield setup_distributed(args)
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


def parameter_digest(*modules):
    """sha256 of every parameter's bytes: equal on all ranks exactly when the replicas agree."""
    h = hashlib.sha256()
    for module in modules:
        for p in module.parameters() if module is not None else ():
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


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


def speed_settings(args, device):
    """Resolve the `auto` speed flags for a device (args.compile is set to the resolved mode):
    returns dtype, memory_format, autocast (a context), scaler (GradScaler, active for fp16 only)
    and cudagraphs (whether each step must be marked for CUDA graph replay)."""
    if args.compile == "auto":  # CUDA graphs with DDP's gradient hooks are unverified here: plain compile there
        args.compile = "off" if device.type != "cuda" else "default" if world_size() > 1 else "reduce-overhead"
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and device.type == "cuda")
    dtype = autocast_dtype(args.amp, device)
    return SimpleNamespace(
        dtype=dtype,
        memory_format=torch.channels_last if channels_last else torch.contiguous_format,
        autocast=torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        cudagraphs=args.compile in ("reduce-overhead", "max-autotune"),
    )


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


def wrap(objective, args, device, world):
    """The objective as the step calls it: under DistributedDataParallel with several processes (one
    wrapper, so every trained gradient is averaged, the self-teacher's and the discriminators' too),
    then compiled when --compile asks (forward and losses as one graph)."""
    if world > 1:
        # a loss weight of 0 leaves parameters without gradient (the discriminators under --w-adv 0)
        unused = any(getattr(args, f"w_{t}") == 0 for t in TERMS)
        objective = DistributedDataParallel(objective, device_ids=[device] if device.type == "cuda" else None,
                                            find_unused_parameters=unused)
    if args.compile == "off":
        return objective
    # where a frame cannot be compiled (no Triton, no C++ compiler, an unsupported op), run it eager
    # with a warning instead of stopping the run
    torch._dynamo.config.suppress_errors = True
    return torch.compile(objective, mode=None if args.compile == "default" else args.compile)
