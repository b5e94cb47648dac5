"""Checkpoints: written atomically, read safely, mapped from other layouts, resumed exactly.

Plumbing for train.py and eval.py, not the method; also what a run logs beside them (metrics.jsonl,
TensorBoard). Every file is read with `torch.load(..., weights_only=True)` (or safetensors) onto the CPU
and every mistake becomes a one-line UserError. Three layouts are understood: this project's (last.pt,
best.pt, deploy.pt, with a `meta` record; a torchvision or timm network is rebuilt from
meta["model_kwargs"]), the released MixSKD scripts' `{'net': state_dict, ...}` (docs/method.md section 11, mapped by
name), and a plain state dict of the backbone alone (torchvision's ResNet for eval.py; any supported library
network's for --init-from, also as .safetensors), without the prefixes of PyTorch's wrappers. A resumed run
gets back every weight, the optimiser, the GradScaler and every random generator (runtime.rng_state), so it
continues bit for bit.
"""
import json
import math
import os
import pickle
import re
import sys

import torch

import runtime
from arch import library, network
from data import DATASETS, shown
from errors import UserError
from layouts import library_network, model_kwargs, timm_checkpoint_filter
from methods import METHODS
from model import ARCHS, Bottleneck, MixSKDNet, ResNet
from self_teacher import SelfTeacher

# ----------------------------------------------------------------------------- writing


def save_atomic(obj, path):
    """Write to a temporary file, flush it to disk, then rename: a crash never leaves a torn file."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def json_safe(obj):
    """obj with every NaN or infinity as None, so that the file is JSON (which has no NaN) and reads as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json_atomic(obj, path):
    with open(f"{path}.tmp", "w") as f:
        json.dump(json_safe(obj), f, indent=2, allow_nan=False)
    os.replace(f"{path}.tmp", path)


def read_metrics(path, before_epoch=None):
    """The per-epoch records of a metrics.jsonl, those of epochs < before_epoch when given."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if before_epoch is None or r["epoch"] < before_epoch]


def restart_metrics(path, start_epoch):
    """metrics.jsonl keeps the records of epochs before start_epoch: on resume, later ones belong to lost work."""
    kept = read_metrics(path, start_epoch)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)


def tensorboard_writer(out, start_epoch):
    """A TensorBoard SummaryWriter into the run folder (`tensorboard --logdir runs` shows each run under its
    folder's name). A resumed run drops what an earlier process logged from start_epoch on, as restart_metrics
    does for metrics.jsonl. The tensorboard package is optional: without it, one line says how to install it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package, an optional dependency: pip install tensorboard "
                        "(or leave --tensorboard out: metrics.jsonl holds the same numbers)") from None
    return SummaryWriter(out, purge_step=start_epoch + 1 if start_epoch else None)


def flat_numbers(record, prefix=""):
    """(name, number) for every number of a nested metrics.jsonl record, the keys joined by "/"."""
    for key, value in record.items():
        if isinstance(value, dict):
            yield from flat_numbers(value, f"{prefix}{key}/")
        else:
            yield prefix + key, value


def write_tensorboard(writer, record):
    """Every number of a metrics.jsonl record as a scalar at step epoch + 1 (epochs done), named by its keys:
    lr, loss/<term>, train_top1, val/<head>/<metric>, test/<head>/<metric>, epoch_time, img_per_s."""
    for name, value in flat_numbers(record):
        if name != "epoch":
            writer.add_scalar(name, value, record["epoch"] + 1)
    writer.flush()  # an epoch's numbers are on disk when the epoch ends, as metrics.jsonl's are


def run_meta(args, s, data, backbone):
    """What every checkpoint of a run records about it: enough to rebuild the network and its inputs (s: the run's
    settings.Settings)."""
    ours = ":" not in s.arch  # width, stem and stem ReLU describe our ResNets alone
    return {"arch": s.arch, "num_classes": data.num_classes, "width": s.width,
            "stem_relu": getattr(backbone, "stem_relu", None), "stem": s.setting if ours else None,
            "method": s.method, "recipe": s.hp.get("recipe"), "dataset": args.dataset,
            # absolute too, so that eval.py finds an .npz from any working directory
            "dataset_path": os.path.abspath(args.dataset) if args.dataset not in DATASETS else None,
            "image_pipeline": data.kind,
            "image_size": data.image_size, "class_names": data.class_names, "seed": s.seed,
            "channels_last": s.channels_last,  # the memory format the run evaluated in: eval.py does the same
            "mean": list(data.mean), "std": list(data.std),
            # a torchvision or timm backbone: what its library builds it from (docs/networks.md)
            "model_kwargs": model_kwargs(s.arch, data.num_classes, data.image_size) if library(s.arch) else None}


def optimizer_state(opt):
    """opt.state_dict() with each group's lr a float, also where it is a tensor on the GPU (speedups.StepGraph's),
    so that a checkpoint resumes under any --compile and on any device."""
    state = opt.state_dict()  # its groups are copies: the optimizer's own lr tensors stay as they are
    for group in state["param_groups"]:
        if torch.is_tensor(group["lr"]):
            group["lr"] = group["lr"].item()
    return state


def save_training(paths, record, epoch, best, objective, opt, scaler, rng, store=None):
    """last.pt (and best.pt): everything a run needs to continue exactly where it stopped, and in last.pt PS-KD's
    store too. record: the run's meta, its arguments as given and its settings."""
    parts = {name: getattr(objective, attr, None) for name, attr in
             (("model", "net"), ("self_teacher", "self_teacher"), ("discriminators", "discs"))}
    ckpt = {**record, "epoch": epoch, "best": best,
            **{name: module.state_dict() if module is not None else None for name, module in parts.items()},
            "optimizer": optimizer_state(opt), "scaler": scaler.state_dict(), "rng": rng}
    for path in paths:  # PS-KD's store in last.pt alone: resuming needs it, best.pt does not (5.1 GB on ImageNet)
        last = os.path.basename(path) == "last.pt" and store is not None
        save_atomic({**ckpt, "ps_kd_store": store.probs if last else None}, path)


# ----------------------------------------------------------------------------- reading and mapping


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # nn.DataParallel and DistributedDataParallel; torch.compile


def unwrap(state):
    """A state dict without the prefixes PyTorch's wrappers put on every key (also nested: a compiled DDP
    model saves "module._orig_mod.")."""
    while state and (prefix := next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)):
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def read_checkpoint(path):
    """torch.load(weights_only=True) onto the CPU, with one-line errors for missing, truncated or
    foreign files; a plain state dict comes back without the prefixes of PyTorch's wrappers (`unwrap`).
    (On the CPU because RNG states must stay there; weights are copied to the model.)"""
    if str(path).endswith(".safetensors"):
        return unwrap(read_safetensors(path))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder: name a checkpoint file in it (deploy.pt, last.pt or best.pt)") from None
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # a pickle of Python objects, which weights_only refuses to run
            raise UserError(f"{path} is not a plain checkpoint: it holds Python objects (NumPy scalars, say) that "
                            f"torch.load(..., weights_only=True) will not run, so it was not loaded. If you trust "
                            f"the file, keep its tensors: python -c \"import torch; c = torch.load('{path}', "
                            f"weights_only=False); torch.save({{k: v for k, v in c.items() if torch.is_tensor(v) or "
                            f"isinstance(v, dict)}}, 'plain.pt')\"") from None
        raise UserError(f"cannot read checkpoint {path}: truncated, corrupt or not a PyTorch checkpoint") from None
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read checkpoint {path}: truncated, corrupt or not a PyTorch checkpoint "
                        f"({reason})") from None
    plain = isinstance(ckpt, dict) and bool(ckpt) and all(isinstance(v, torch.Tensor) for v in ckpt.values())
    return unwrap(ckpt) if plain else ckpt


def read_safetensors(path):
    """A state dict saved as .safetensors (timm's and the Hugging Face Hub's format), onto the CPU."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise UserError(f"reading {path} needs safetensors: pip install safetensors") from None
    try:
        return load_file(path, device="cpu")
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except Exception as e:
        raise UserError(f"cannot read {path}: truncated, corrupt or not a safetensors file "
                        f"({type(e).__name__})") from None


def load_state(module, state, what):
    """load_state_dict(strict) with a one-line error naming the first missing, unexpected or
    mis-shaped key, the sign of a checkpoint made for another arch, width or class count."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        detail = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected else
                  f"{shapes[0]} is {tuple(state[shapes[0]].shape)}, expected {tuple(own[shapes[0]].shape)}")
        raise UserError(f"{what} does not fit the model ({len(missing)} missing, {len(unexpected)} unexpected, "
                        f"{len(shapes)} mis-shaped keys; {detail}): another arch, width or class count?")
    module.load_state_dict(state)


def released_to_ours(state):
    """Map a state dict of a released MixSKD network, CIFAR or ImageNet (docs/method.md section 11), onto ours.

    Returns (meta, net_state, teacher_state); meta holds arch, num_classes, width, stem and stem_relu:
    the released CIFAR network has no stem ReLU (docs/method.md section 6, item 5), the released ImageNet network
    (7x7 stem conv) has it (docs/method.md section 9). Any key that does not map raises.
    """
    state = unwrap(state)
    net_state, teacher_state = {}, {}
    for key, value in state.items():
        if key.startswith("backbone."):
            net_state[key] = value
        elif m := re.fullmatch(r"auxiliary_classifier\.block_extractor([123])\.(.+)", key):
            net_state[f"branches.{int(m[1]) - 1}.layers.{m[2]}"] = value
        elif m := re.fullmatch(r"auxiliary_classifier\.fc([123])\.(weight|bias)", key):
            net_state[f"branches.{int(m[1]) - 1}.fc.{m[2]}"] = value
        elif m := re.fullmatch(r"final_aux_classifier\.(conv\.weight|fc\.weight|fc\.bias)", key):
            teacher_state[m[1]] = value
        else:
            raise UserError(f"released checkpoint key {key!r} does not map onto this implementation "
                            f"(docs/method.md section 11)")
    meta = backbone_config(net_state, "backbone.", "released checkpoint")
    return {**meta, "stem_relu": meta["stem"] == "imagenet"}, net_state, teacher_state


def backbone_config(state, prefix, what):
    """arch, num_classes, width and stem of the ResNet whose weights `state` holds under `prefix`."""
    try:
        depths = tuple(1 + max(int(m[1]) for k in state if (m := re.match(rf"{prefix}layer{s}\.(\d+)\.", k)))
                       for s in (1, 2, 3, 4))
        bottleneck = f"{prefix}layer1.0.conv3.weight" in state
        arch = next(a for a, (block, d) in ARCHS.items() if d == depths and (block is Bottleneck) == bottleneck)
        conv1 = state[f"{prefix}conv1.weight"]
        return {"arch": arch, "num_classes": state[f"{prefix}fc.weight"].shape[0], "width": conv1.shape[0],
                "stem": "imagenet" if conv1.shape[-1] == 7 else "cifar"}
    except (ValueError, StopIteration, KeyError):
        raise UserError(f"{what}: cannot recognise a ResNet-18/34/50/101 in its keys") from None


def model_from_checkpoint(ckpt, path):
    """Build the network a checkpoint holds: (model, self_teacher or None, meta). Our last.pt/best.pt:
    the trained network and self-teacher; deploy.pt: the backbone alone; the released script's
    {'net': ...}: mapped by name; a plain torchvision ResNet state dict: the backbone alone."""
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} is not a checkpoint of this project or of the released code")
    if "conv1.weight" in ckpt and "fc.weight" in ckpt:  # torchvision's layout, which ResNet shares
        meta = {**backbone_config(ckpt, "", f"torchvision checkpoint {path}"), "stem_relu": True}
        model = ResNet(meta["arch"], meta["num_classes"], meta["width"], True, meta["stem"])
        load_state(model, ckpt, f"torchvision checkpoint {path}")
        return model, None, meta
    if "net" in ckpt and "meta" not in ckpt:
        meta, net_state, teacher_state = released_to_ours(ckpt["net"])
        model = MixSKDNet(meta["arch"], meta["num_classes"], meta["width"], meta["stem_relu"], meta["stem"])
        load_state(model, net_state, f"released checkpoint {path}")
        teacher = None
        if teacher_state:
            teacher = SelfTeacher(model.feature_channels, meta["num_classes"])
            load_state(teacher, teacher_state, f"released checkpoint {path} (self-teacher)")
        return model, teacher, meta
    if "meta" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this project or of the released code (no 'meta' or 'net'; "
                        f"its first key is {next(iter(ckpt), None)!r})")
    meta = ckpt["meta"]
    deploy = "backbone" in ckpt  # deploy.pt: the backbone alone
    heads = METHODS[meta["method"]].heads and not deploy  # every head of MixSKD, BYOT, DKS
    try:
        if meta.get("model_kwargs") is not None:  # a torchvision or timm network, built as its library builds it
            model = library_network(meta["arch"], meta["model_kwargs"], heads)
        else:
            model = network(meta["arch"], meta["num_classes"], meta["width"], meta["stem_relu"],
                            meta.get("stem", "cifar"), heads)
    except ValueError as e:  # an arch this installation cannot build: timm missing, say
        raise UserError(f"{path}: {e}") from None
    load_state(model, ckpt["backbone" if deploy else "model"], f"{'deploy ' * deploy}checkpoint {path}")
    teacher = None
    if ckpt.get("self_teacher") is not None:
        teacher = SelfTeacher(model.feature_channels, meta["num_classes"], len(model.branches) + 1)
        load_state(teacher, ckpt["self_teacher"], f"checkpoint {path} (self-teacher)")
    return model, teacher, meta


def recorded_dataset(path, meta):
    """The dataset a checkpoint was trained on: as typed, else (moved since) as the absolute path recorded."""
    dataset = meta.get("dataset")
    if dataset is None:
        raise UserError(f"{path} does not record its dataset: pass --dataset cifar10, cifar100, PATH.npz or FOLDER")
    if dataset not in DATASETS and not os.path.exists(dataset):  # an .npz or a folder, moved since
        dataset = meta.get("dataset_path") or dataset
        if not os.path.exists(dataset):
            where = "--dataset PATH.npz to evaluate on the file" if dataset.endswith(".npz") else \
                "--dataset FOLDER to evaluate on the folder (with train/ and val/)"
            raise UserError(f"{path} was trained on {meta['dataset']}, which is not found from here (nor at "
                            f"{dataset}): pass {where} where it is now")
    return dataset


def check_classes(path, meta, data, dataset):
    """Refuse data whose classes are not the run's (more of them, or other names); say in one line when the
    classes cannot be checked because the run or the data names none."""
    if data.num_classes > meta["num_classes"]:
        raise UserError(f"{path} has {meta['num_classes']} classes but {dataset} has {data.num_classes}")
    trained, named = meta.get("class_names"), data.class_names
    if trained and named and list(trained) != list(named):
        first = next((i for i, (a, b) in enumerate(zip(trained, named)) if a != b), min(len(trained), len(named)))
        raise UserError(f"{path} was trained on other classes than {dataset} holds (class {first}: "
                        f"{trained[first] if first < len(trained) else None!r} in training, "
                        f"{named[first] if first < len(named) else None!r} here): its numbers would mean nothing")
    if not (trained and named):
        unnamed = (f"{dataset} names no classes" if trained else
                   f"the run recorded no class names ({meta.get('dataset')}")
        print(f"note: the classes could not be checked: {unnamed}{')' * (not trained)}; label k here is taken to "
              f"be class k of the run's {meta['num_classes']}"
              + (f" ({shown(trained)}, from {meta.get('dataset')})" if trained else ""), file=sys.stderr)


# ----------------------------------------------------------------------------- starting from a checkpoint


def init_from(path, model, teacher):
    """Copy a checkpoint's weights into model (and the self-teacher): ours, the released script's, or a
    plain state dict of the backbone (torchvision's or timm's, a torch file or .safetensors; a timm one goes
    through timm's own checkpoint filter first). From a backbone alone (deploy.pt, a state dict)
    the branches start as copies of its later stages (docs/networks.md); one trained
    for another class count loads all but its classifier, which stays fresh (fine-tuning)."""
    ckpt = read_checkpoint(path)
    plain = isinstance(ckpt, dict) and bool(ckpt) and all(isinstance(v, torch.Tensor) for v in ckpt.values())
    if plain:  # torchvision's published DenseNet files keep old names ("norm.1"), which its own loader renames
        ckpt = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.", r"\1\2.", k): v for k, v in ckpt.items()}
    source, source_teacher, meta = (None, None, {}) if plain else model_from_checkpoint(ckpt, path)
    own_relu = getattr(getattr(model, "backbone", model), "stem_relu", None)
    if None not in (meta.get("stem_relu"), own_relu) and meta["stem_relu"] != own_relu:
        raise UserError(f"--init-from {path}: its network has {'a' if meta['stem_relu'] else 'no'} stem ReLU, this "
                        f"run's has {'one' if own_relu else 'none'}, so the weights would compute another function: "
                        f"use --recipe {'paper' if meta['stem_relu'] else 'official'} "
                        f"(docs/method.md section 6, item 5)")
    whole = source is not None and hasattr(source, "branches")
    if whole and not hasattr(model, "branches"):
        source, whole = source.backbone, False
    state = dict(ckpt if plain else source.state_dict())
    target = model.backbone if hasattr(model, "branches") and not whole else model
    if plain and type(target).__module__.startswith("timm."):  # e.g. a ViT's position embedding resized
        state = timm_checkpoint_filter(state, target)
    own = target.state_dict()
    classifier = list(own)[-2:]  # the last layer's weight and bias, in torchvision's networks and ours
    fresh = not whole and any(k in state and len(state[k]) != len(own[k]) for k in classifier)
    load_state(target, {**state, **{k: own[k] for k in classifier}} if fresh else state, f"--init-from {path}")
    if fresh:  # said once the rest has loaded
        print(f"note: --init-from {path} has {len(state[classifier[-1]])} classes, this run {len(own[classifier[-1]])}:"
              f" the classifier ({', '.join(classifier)}) starts fresh, every other weight is loaded")
    if target is not model:
        model.branches_from_backbone()
    if teacher is not None and source_teacher is not None:
        load_state(teacher, source_teacher.state_dict(), f"--init-from {path} (self-teacher)")


def resume(path, epochs, meta, objective, opt, scaler, device, rank, store=None):
    """Load last.pt into everything (the objective's network, self-teacher and discriminators, PS-KD's store too)
    for a run of `epochs`; returns (first epoch to run, best-so-far record)."""
    ckpt = read_checkpoint(path)
    if "meta" not in ckpt or "optimizer" not in ckpt:
        raise UserError(f"{path} is not a training checkpoint of this project: --resume needs a last.pt")
    # cli.resume_arguments has given this run every training argument of the saved one; the data could
    # still differ (an .npz of the same name with other classes)
    if ckpt["meta"]["num_classes"] != meta["num_classes"]:
        raise UserError(f"{path} was trained on {ckpt['meta']['num_classes']} classes, {meta['dataset']} has "
                        f"{meta['num_classes']}: resume on the dataset it was trained on, or start a new run")
    done = ckpt["epoch"] + 1
    if epochs < done:
        raise UserError(f"{path} already holds epoch {done}: --epochs {epochs} leaves nothing to train")
    if store is not None:  # checked before anything is loaded: a refused resume changes nothing
        saved = ckpt.get("ps_kd_store")
        if saved is None or saved.shape != store.probs.shape:
            held = "no PS-KD store" if saved is None else f"a PS-KD store of {tuple(saved.shape)}"
            raise UserError(f"{path} holds {held}, this run needs one row per training image and class, "
                            f"{tuple(store.probs.shape)}: resume it on the data it was trained on, or start a new run")
        store.probs.copy_(saved)
    load_state(objective.net, ckpt["model"], f"checkpoint {path}")
    for module, key in ((getattr(objective, "self_teacher", None), "self_teacher"),
                        (getattr(objective, "discs", None), "discriminators")):
        if module is not None:
            load_state(module, ckpt[key], f"checkpoint {path} ({key})")
    opt.load_state_dict(ckpt["optimizer"])
    if scaler.is_enabled() and not ckpt["scaler"]:  # saved in bf16 or fp32, resumed where autocast picks fp16
        if rank == 0:
            print(f"note: {path} was trained without fp16 loss scaling; its fp16 GradScaler starts fresh")
    else:
        scaler.load_state_dict(ckpt["scaler"])
    states = ckpt["rng"]  # one per rank; a run resumed on more ranks gives the extra ones rank 0's
    runtime.set_rng_state(states[rank] if rank < len(states) else states[0], device)
    return ckpt["epoch"] + 1, ckpt["best"]
