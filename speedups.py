"""How fast a step runs: `--amp`, `--channels-last` and `--compile` resolved from `auto` (measured:
docs/performance.md), what the step needs of them (autocast, GradScaler, CUDA graph marks), the whole step as one
CUDA graph (`--compile step-graph`, StepGraph) and the method's forward as the step calls it (wrap: under
DistributedDataParallel with several processes, compiled).
"""
import importlib.util
import os
import shutil
import sys
from types import SimpleNamespace

import torch
from torch.nn.parallel import DistributedDataParallel

from errors import UserError
from runtime import rank

CPU_COMPILE_STEPS = 3_000  # a CPU run this long repays its compilation (measured: docs/performance.md)


def resolve_speed(amp, channels_last, compile, device, world=1, run_steps=0, narrow=False):
    """The `auto` speed flags resolved for a device: {"amp": bf16|fp16|off, "channels_last": bool, "compile": mode
    or "off"}. channels_last: on CUDA, and on a CPU for an eager step under bf16 autocast, or in fp32 where the CPU
    has no native bf16 kernels, unless `narrow` (the network has a convolution that channels_last gets wrong in
    fp32 on a CPU: channels_last_hazard, this project's ResNets below width 16). --compile auto compiles
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
    # channels_last on a CPU pays in an eager bf16 step (11-28% at widths 16-64), not in a compiled one (2%, noise),
    # nor in fp32 on a CPU with native bf16 (-12% to +7%), but in fp32 on one without (9-24%): docs/performance.md
    auto = device.type == "cuda" or (compile == "off" and (
        dtype == torch.bfloat16 or (dtype is None and not cpu_has_native_bf16() and not narrow)))
    return {"amp": {torch.bfloat16: "bf16", torch.float16: "fp16", None: "off"}[dtype],
            "channels_last": channels_last == "on" or (channels_last == "auto" and auto), "compile": compile}


# oneDNN's fp32 kernel for a 1x1 convolution of stride > 1 gets its weight gradient wrong in channels_last when the
# convolution has fewer input channels than the kernel's channel block (8 with AVX2, 16 with AVX-512): on a 2-core
# AMD EPYC with AVX2 and no AVX-512 (torch 2.14.1) 1 to 7 channels gave weight gradients 6-120% off, or hung or
# crashed, while 8 to 256 channels, stride 1 and bf16 matched the default format (docs/performance.md; oneDNN
# issue 6035, "1x1 convolution backward_weights writes past the rtus workspace (nhwc, IC < ic_block)").
ONEDNN_1X1_BLOCK = 16


def channels_last_hazard(net):
    """(name, input channels) of net's first 1x1 convolution of stride > 1 with fewer than ONEDNN_1X1_BLOCK input
    channels (per group), whose weight gradient oneDNN's fp32 CPU kernel gets wrong in channels_last; None where
    net has none."""
    for name, m in net.named_modules():
        if (isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1)
                and m.in_channels // m.groups < ONEDNN_1X1_BLOCK):
            return name, m.in_channels // m.groups
    return None


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
                               "lr with speedups.set_lr")
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


def cpu_has_native_bf16():
    """Whether oneDNN reports native bf16 kernels on this CPU (AVX512-BF16 or AMX)."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def autocast_dtype(choice, device):
    """auto: bf16 on CUDA (fp16 where the GPU lacks bf16); on a CPU, bf16 only where oneDNN reports
    native bf16 kernels (AVX512-BF16 or AMX), else fp32, since emulated bf16 is slower than fp32."""
    if choice == "off":
        return None
    if choice == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else None
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
