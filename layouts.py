"""Layouts of torchvision's and timm's classifiers for model.StagedMixSKDNet, and the networks that
`--arch torchvision:NAME` and `--arch timm:NAME` name.

docs/method.md section 2, generalised (docs/networks.md). A Layout splits a network's own
forward() into stem, stages, post and head; each family's layout is written from its forward(), so one
layout covers every model of the family. CNNs: four stages at 1/4, 1/8, 1/16 and 1/32 of the input.
Transformers: a ViT's blocks in four consecutive groups of equal size; Swin's four layers.

F_k of a token network (docs/networks.md): a ViT's tokens after its final norm,
N x L x C with the class (and any register or distillation) tokens, as a C x L x 1 map; Swin's patch
grid after its final norm, N x H x W x C, as the C x H x W map it is. Global average pooling over the
map is then the mean over every token, and the self-teacher (Eq. (4)), L_feat (8), L_adv (9) and the
discriminators work unchanged. The head stays the network's own (class token or mean pooling, norm,
classifier), fed the tokens back in the library's own shape.

Imports torch and model; torchvision and timm only inside the functions that use them (timm is
optional: without it, timm:NAME is refused in one line that says how to install it).
"""
import functools
import sys

import torch
import torch.nn.functional as F

from model import Layout, StagedMixSKDNet, probing, run_part

# ----------------------------------------------------------------------------- parts shared by the families


def stride_layout(net, name, post, head, stem=()):
    """The Layout of a network whose trunk is one Sequential, net.<name>, run after the paths `stem`: its
    modules are grouped by the resolution they output, measured on a 64 x 64 input: below 1/4 the stem,
    then stages at 1/4, 1/8, 1/16 and 1/32 of the input; its last `post` modules are the post part.

    Four stages at strides 4..32 put the branches where the paper puts them on ResNet-50 (after the
    stages at 1/4, 1/8 and 1/16). Networks with a fifth, stride-2 stage (MobileNet, EfficientNet) fold
    it into the stem: a branch there would re-run nearly the whole network at high resolution.
    """
    children = list(net.get_submodule(name).named_children())
    body, tail = children[:len(children) - post], children[len(children) - post:]
    strides = []
    with probing(net) as device:
        x = run_part(net, list(stem), torch.zeros(1, 3, 64, 64, device=device))
        for _, module in body:
            x = module(x)
            strides.append(64 // x.shape[-1])
    paths = [f"{name}.{child}" for child, _ in body]
    stages = [[p for p, s in zip(paths, strides) if s == 2 ** k] for k in (2, 3, 4, 5)]
    if not all(stages) or any(s > 32 for s in strides):
        raise ValueError(f"{type(net).__name__}: cannot find stages at strides 4, 8, 16 and 32 in {name}")
    return Layout(list(stem) + [p for p, s in zip(paths, strides) if s < 4], stages,
                  [f"{name}.{child}" for child, _ in tail], head)


def equal_groups(paths, groups=4):
    """paths in `groups` consecutive groups of equal size; where the count does not divide, the first
    groups are one longer (a ViT's 12 blocks: 3, 3, 3, 3; 18 blocks: 5, 5, 4, 4)."""
    size, extra = divmod(len(paths), groups)
    if size == 0:
        raise ValueError(f"{len(paths)} blocks cannot make {groups} stages")
    ends = [sum(size + (g < extra) for g in range(k + 1)) for k in range(groups)]
    return [paths[start:end] for start, end in zip([0] + ends, ends)]


def flatten(x):
    return torch.flatten(x, 1)


def global_pool(x):
    return F.adaptive_avg_pool2d(x, 1)


def tokens_to_map(x):
    """A ViT's tokens N x L x C as its feature map F_k, N x C x L x 1."""
    return x.transpose(1, 2).unsqueeze(-1)


def map_to_tokens(x):
    """A map N x C x H x W (a C x L x 1 token map, or a patch grid) as the token sequence N x HW x C."""
    return x.flatten(2).transpose(1, 2)


def nhwc_to_nchw(x):
    """Swin's patch grid N x H x W x C as its feature map F_k, N x C x H x W."""
    return x.permute(0, 3, 1, 2)


def nchw_to_nhwc(x):
    return x.permute(0, 2, 3, 1)


def first_token(x):
    """torchvision's ViT classifies its class token, the first."""
    return x[:, 0]


def prepend_class_token(vit, x):
    """torchvision's ViT.forward: its class token before the patch tokens."""
    return torch.cat([vit.class_token.expand(x.shape[0], -1, -1), x], dim=1)


def add_position_embedding(encoder, x):
    """torchvision's ViT Encoder.forward: the learned position embedding."""
    return x + encoder.pos_embedding


# ----------------------------------------------------------------------------- torchvision


TORCHVISION_FAMILIES = {  # family: the prefixes of its torchvision model names
    "ResNet / ResNeXt / Wide-ResNet": ("resnet", "resnext", "wide_resnet"),
    "RegNet X and Y": ("regnet_x_", "regnet_y_"),
    "ConvNeXt": ("convnext_",),
    "MobileNetV2 and V3": ("mobilenet_v2", "mobilenet_v3_"),
    "EfficientNet V1 and V2": ("efficientnet_b", "efficientnet_v2_"),
    "DenseNet": ("densenet",),
    "ViT": ("vit_",),
    "Swin V1 and V2": ("swin_",),
}


def torchvision_layout(net):
    """The Layout of a torchvision classification network of a supported family (TORCHVISION_FAMILIES),
    written from each family's own forward(). Imports torchvision only when called."""
    import torchvision.models as tvm

    if isinstance(net, tvm.ResNet):
        return Layout(["conv1", "bn1", "relu", "maxpool"], [["layer1"], ["layer2"], ["layer3"], ["layer4"]], [],
                      ["avgpool", flatten, "fc"])
    if isinstance(net, tvm.RegNet):
        return Layout(["stem"], [[f"trunk_output.block{k}"] for k in (1, 2, 3, 4)], [], ["avgpool", flatten, "fc"])
    if isinstance(net, tvm.ConvNeXt):
        return stride_layout(net, "features", 0, ["avgpool", "classifier"])
    if isinstance(net, tvm.MobileNetV2):
        return stride_layout(net, "features", 1, [global_pool, flatten, "classifier"])
    if isinstance(net, (tvm.MobileNetV3, tvm.EfficientNet)):
        return stride_layout(net, "features", 1, ["avgpool", flatten, "classifier"])
    if isinstance(net, tvm.DenseNet):
        layout = stride_layout(net, "features", 1, [global_pool, flatten, "classifier"])
        return layout._replace(post=layout.post + [F.relu])
    if isinstance(net, tvm.VisionTransformer):  # _process_input is conv_proj, then the patches as tokens
        blocks = [f"encoder.layers.{name}" for name, _ in net.encoder.layers.named_children()]
        return Layout(["conv_proj", map_to_tokens, (prepend_class_token, ""), (add_position_embedding, "encoder"),
                       "encoder.dropout"], equal_groups(blocks), ["encoder.ln", tokens_to_map],
                      [map_to_tokens, first_token, "heads"], net.image_size)
    if isinstance(net, tvm.SwinTransformer):  # features: patch embedding, then each stage after its patch merging
        stages = [["features.1"]] + [[f"features.{i}", f"features.{i + 1}"] for i in (2, 4, 6)]
        return Layout(["features.0"], stages, ["norm", "permute"], ["avgpool", "flatten", "head"])
    raise ValueError(f"no layout for {type(net).__name__}: {supported_families('torchvision')}")


# ----------------------------------------------------------------------------- timm


TIMM_FAMILIES = {  # family: the timm modules that define its models (timm.list_models(module=...))
    "ResNet / ResNeXt": ("resnet",),
    "ConvNeXt": ("convnext",),
    "EfficientNet": ("efficientnet",),
    "MobileNetV3 / V4": ("mobilenetv3",),
    "RegNet": ("regnet",),
    "ViT / DeiT": ("vision_transformer", "deit"),
    "Swin": ("swin_transformer",),
}
TIMM_SIZED = ("vision_transformer", "deit", "swin_transformer")  # built for one input size: timm's img_size


def import_timm():
    try:
        import timm
    except ImportError:
        raise ValueError("timm:NAME needs timm, which is not installed: pip install timm") from None
    return timm


def timm_layout(net):
    """The Layout of a timm classification network of a supported family (TIMM_FAMILIES), written from each
    family's forward_features(); the head is the network's own forward_head. Imports timm only when called."""
    from timm.models import convnext, efficientnet, mobilenetv3, regnet, resnet, swin_transformer, vision_transformer

    head = ["forward_head"]
    if isinstance(net, resnet.ResNet):
        return Layout(["conv1", "bn1", "act1", "maxpool"], [["layer1"], ["layer2"], ["layer3"], ["layer4"]], [], head)
    if isinstance(net, convnext.ConvNeXt):
        return Layout(["stem"], [[f"stages.{k}"] for k in range(4)], ["norm_pre"], head)
    if isinstance(net, efficientnet.EfficientNet):
        return stride_layout(net, "blocks", 0, head, stem=["conv_stem", "bn1"])._replace(post=["conv_head", "bn2"])
    if isinstance(net, mobilenetv3.MobileNetV3):  # its conv_head runs after the pooling, in forward_head
        return stride_layout(net, "blocks", 0, head, stem=["conv_stem", "bn1"])
    if isinstance(net, regnet.RegNet):
        return Layout(["stem"], [["s1"], ["s2"], ["s3"], ["s4"]], ["final_conv"], head)
    if isinstance(net, vision_transformer.VisionTransformer):  # DeiT's too
        blocks = [f"blocks.{name}" for name, _ in net.blocks.named_children()]
        return Layout(["patch_embed", "_pos_embed", "patch_drop", "norm_pre"], equal_groups(blocks),
                      ["norm", tokens_to_map], [map_to_tokens, "forward_head"], net.patch_embed.img_size[0])
    if isinstance(net, swin_transformer.SwinTransformer):
        return Layout(["patch_embed"], [[f"layers.{k}"] for k in range(4)], ["norm", nhwc_to_nchw],
                      [nchw_to_nhwc, "forward_head"], net.patch_embed.img_size[0])
    raise ValueError(f"no layout for {type(net).__name__}: {supported_families('timm')}")


def timm_module(name):
    """The timm module that defines model `name` (a pretrained tag, "NAME.TAG", is ignored), or None."""
    return next((module for modules in TIMM_FAMILIES.values() for module in modules
                 if import_timm().models.is_model_in_modules(name.partition(".")[0], [module])), None)


def timm_checkpoint_filter(state, net):
    """A timm state dict as timm itself adapts one to net before loading it: the checkpoint_filter_fn of
    net's module, where it has one (a ViT's position embedding resampled to net's image size, a Swin's
    relative position tables to its window, older key names); other families' state dicts as they are."""
    filter_fn = getattr(sys.modules[type(net).__module__], "checkpoint_filter_fn", None)
    return filter_fn(state, net) if filter_fn is not None else state


# ----------------------------------------------------------------------------- --arch torchvision:NAME, timm:NAME


def supported_families(library):
    families = TORCHVISION_FAMILIES if library == "torchvision" else TIMM_FAMILIES
    what = "names" if library == "torchvision" else "timm modules"
    return f"supported {library} families are " + "; ".join(
        f"{family} ({what} {', '.join(p + '*' * (library == 'torchvision') for p in prefixes)})"
        for family, prefixes in families.items())


def check_library_arch(arch):
    """A ValueError naming the supported families unless arch is torchvision:NAME or timm:NAME of one."""
    library, _, name = arch.partition(":")
    if library == "torchvision":
        import torchvision.models as tvm

        if name not in tvm.list_models(module=tvm) or not name.startswith(sum(TORCHVISION_FAMILIES.values(), ())):
            raise ValueError(f"unsupported torchvision model {name!r}: {supported_families('torchvision')}")
    elif not name or timm_module(name) is None:
        raise ValueError(f"unsupported timm model {name!r}: {supported_families('timm')}")


def library_layout(net):
    """The Layout of a torchvision or timm network of a supported family."""
    if type(net).__module__.startswith("timm."):
        return timm_layout(net)
    if type(net).__module__.startswith("torchvision."):
        return torchvision_layout(net)
    raise ValueError(f"no layout for {type(net).__name__}: pass StagedMixSKDNet a layout_of, or use a network of "
                     f"the {supported_families('torchvision')}, or of the {supported_families('timm')}")


def model_kwargs(arch, num_classes, image_size=None):
    """Every keyword argument library_network builds arch's network with (deploy.pt keeps them as
    meta["model_kwargs"]): num_classes; for a transformer built for one input size, image_size (torchvision's
    ViT `image_size`, timm's ViT, DeiT and Swin `img_size`); for timm, pretrained=False (nothing is
    downloaded)."""
    library, _, name = arch.partition(":")
    if library == "torchvision":
        sized = name.startswith("vit_") and image_size is not None
        return {"num_classes": num_classes, **({"image_size": image_size} if sized else {})}
    sized = timm_module(name) in TIMM_SIZED and image_size is not None
    return {"pretrained": False, "num_classes": num_classes, **({"img_size": image_size} if sized else {})}


def library_network(arch, kwargs, heads=False):
    """torchvision.models.get_model(NAME, **kwargs) or timm.create_model(NAME, **kwargs), as the library
    builds and initialises it; with heads, a StagedMixSKDNet over it, every branch from its own call."""
    library, _, name = arch.partition(":")
    if library == "torchvision":
        import torchvision.models as tvm

        make = functools.partial(tvm.get_model, name, **kwargs)
    else:
        make = functools.partial(import_timm().create_model, name, **kwargs)
    return StagedMixSKDNet(make, library_layout) if heads else make()
