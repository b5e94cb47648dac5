"""ResNets and the MixSKD network: backbone plus three auxiliary branches.

SPEC sections 2 (CIFAR) and 9 (ImageNet stem). Paper: Yang et al., "MixSKD: Self-Knowledge
Distillation from Mixup for Image Recognition", ECCV 2022. ResNet: He et al. 2016, with the 3x3
stride-1 CIFAR stem or torchvision's ImageNet stem.

`ResNet` is the deployed network and stands on its own. `MixSKDNet` wraps it and adds branch k
(k = 1, 2, 3): fresh copies of stages k+1..4 on top of stage k, with their own classifier. Every
head returns its final feature map F_k (C x 4 x 4 on 32x32 CIFAR input, C x 7 x 7 on 224x224
ImageNet input) and its logits z_k. The model knows nothing about mixup: the training step mixes,
the model only forwards.

Module names follow torchvision (conv1, bn1, layer1..4, fc, downsample.0/1), so backbone weights
move between this file and torchvision-style code by name.

`StagedMixSKDNet` does the same for any network described by a `Layout` (stem, stages, post, head):
`torchvision_layout` describes the torchvision families ResNet/ResNeXt/Wide-ResNet, RegNet, ConvNeXt,
MobileNetV2/V3, EfficientNet V1/V2 and DenseNet, and `network("torchvision:NAME", ...)` builds them.
torchvision is imported only inside those functions: the rest of this file needs torch alone.
"""
import contextlib
import functools
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = projection(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """1x1, 3x3, 1x1 with the stride on the 3x3 conv, as torchvision."""
    expansion = 4

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = projection(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


def projection(in_planes, out_planes, stride):
    """1x1 conv + BN shortcut where the shape changes, else None (identity)."""
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


ARCHS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}
STRIDES = (1, 2, 2, 2)


def stage_plan(arch, width):
    """(block, [(in_planes, planes, num_blocks, stride) for stages 1..4]) of an arch."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    block, depths = ARCHS[arch]
    plan, in_planes = [], width
    for i, (depth, stride) in enumerate(zip(depths, STRIDES)):
        planes = width * 2**i
        plan.append((in_planes, planes, depth, stride))
        in_planes = planes * block.expansion
    return block, plan


def make_stage(block, in_planes, planes, num_blocks, stride):
    blocks = [block(in_planes, planes, stride)]
    blocks += [block(planes * block.expansion, planes) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def classify(fc, feat):
    """Global average pool, then the linear classifier."""
    return fc(feat.mean((2, 3)))


STEMS = ("cifar", "imagenet")


def imagenet_init(module):
    """The released ImageNet model's initialisation, also torchvision's ResNet's (SPEC section 9): every
    conv kaiming-normal with fan_out, every BatchNorm weight 1 and bias 0; linear layers keep PyTorch's
    default. The CIFAR networks keep PyTorch's default everywhere (SPEC section 7)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNet(nn.Module):
    """ResNet (SPEC sections 2 and 9): the backbone, head 4, and the network deployed at test time.

    width: channels of the first stage (64 in the SPEC; smaller for tests and CPU runs).
    stem_relu: ReLU after the stem BN. The released MixSKD CIFAR ResNet omits it (SPEC section 6,
    item 5), so recipe `official` on CIFAR builds with stem_relu=False.
    stem: "cifar", a 3x3 stride-1 conv (F_k is C x 4 x 4 at 32x32), or "imagenet", torchvision's 7x7
    stride-2 conv and 3x3 stride-2 max-pool (C x 7 x 7 at 224x224), with torchvision's module names,
    shapes and initialisation (`imagenet_init`).
    """

    def __init__(self, arch="resnet18", num_classes=100, width=64, stem_relu=True, stem="cifar"):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
        block, plan = stage_plan(arch, width)
        self.stem_relu = stem_relu
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
            self.maxpool = None
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1, self.layer2, self.layer3, self.layer4 = (make_stage(block, *p) for p in plan)
        self.feature_channels = plan[-1][1] * block.expansion
        self.fc = nn.Linear(self.feature_channels, num_classes)
        if stem == "imagenet":
            imagenet_init(self)

    @property
    def stages(self):
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def stem(self, x):
        out = self.bn1(self.conv1(x))
        out = F.relu(out) if self.stem_relu else out
        return self.maxpool(out) if self.maxpool is not None else out

    def forward(self, x):
        out = self.stem(x)
        for stage in self.stages:
            out = stage(out)
        return classify(self.fc, out)


class Branch(nn.Module):
    """Auxiliary branch k (SPEC section 2): fresh copies of stages k+1..4 and its own classifier."""

    def __init__(self, arch, num_classes, width, k):
        super().__init__()
        block, plan = stage_plan(arch, width)
        self.layers = nn.Sequential(*(make_stage(block, *p) for p in plan[k:]))
        self.fc = nn.Linear(plan[-1][1] * block.expansion, num_classes)

    def forward(self, x):
        feat = self.layers(x)
        return feat, classify(self.fc, feat)


class MixSKDNet(nn.Module):
    """Backbone plus branches b1, b2, b3. forward(x) -> (feats, logits), lists over heads 1..4.

    feats[k] is F_{k+1}(x) and logits[k] is z_{k+1}(x); the backbone is last (head 4).
    """

    def __init__(self, arch="resnet18", num_classes=100, width=64, stem_relu=True, stem="cifar"):
        super().__init__()
        self.backbone = ResNet(arch, num_classes, width, stem_relu, stem)
        self.branches = nn.ModuleList(Branch(arch, num_classes, width, k) for k in (1, 2, 3))
        self.feature_channels = self.backbone.feature_channels
        if stem == "imagenet":
            imagenet_init(self.branches)

    def branches_from_backbone(self):
        """Copy the backbone's later stages and classifier into every branch (after loading pretrained
        weights into the backbone alone)."""
        for k, branch in enumerate(self.branches, start=1):
            for j, layers in enumerate(branch.layers):
                layers.load_state_dict(self.backbone.stages[k + j].state_dict())
            branch.fc.load_state_dict(self.backbone.fc.state_dict())

    def forward(self, x):
        feats, logits = [], []
        out = self.backbone.stem(x)
        for k, stage in enumerate(self.backbone.stages):
            out = stage(out)
            if k < len(self.branches):
                feat, logit = self.branches[k](out)
                feats.append(feat)
                logits.append(logit)
        feats.append(out)
        logits.append(classify(self.backbone.fc, out))
        return feats, logits


# ----------------------------------------------------------------------------- any staged backbone


class Layout(NamedTuple):
    """How a backbone computes its logits, in order: stem, K >= 2 stages, `post` (what the network applies
    after its last stage before pooling: DenseNet's final norm and ReLU, MobileNet's last 1x1 conv) and
    head (pooling and classifier). Each part is a list of submodule paths ("layer1", "features.3") or of
    plain functions (torch.flatten), so a layout holds no modules of its own and survives module swaps
    such as SyncBatchNorm conversion."""
    stem: list
    stages: list
    post: list
    head: list


def run_part(net, part, x):
    """Apply the items of one part of a Layout, in order, to x."""
    for item in part:
        x = net.get_submodule(item)(x) if isinstance(item, str) else item(x)
    return x


class LayoutBranch(nn.Module):
    """Auxiliary branch k of a StagedMixSKDNet: a fresh network of the backbone's kind, of which stages
    k+1..K, post and head run on the output of the backbone's stage k. Its stem and stages 1..k are
    replaced by nn.Identity, so it holds no parameter it never uses; its keys are the network's own."""

    def __init__(self, net, layout, k):
        super().__init__()
        for path in layout.stem + [item for stage in layout.stages[:k] for item in stage]:
            if isinstance(path, str):
                net.set_submodule(path, nn.Identity())
        self.net, self.layout, self.k = net, layout, k

    def forward(self, x):
        for stage in self.layout.stages[self.k:]:
            x = run_part(self.net, stage, x)
        feat = run_part(self.net, self.layout.post, x)
        return feat, run_part(self.net, self.layout.head, feat)


class StagedMixSKDNet(nn.Module):
    """MixSKD over any staged backbone (SPEC section 2, generalised). forward(x) -> (feats, logits) as
    MixSKDNet's, backbone last. Branch k, after stage k (k = 1..K-1), re-runs stages k+1..K, the post part
    and a head of the network's own kind, with weights of its own: each comes from a call of
    make_backbone(), so a factory that builds fresh networks gives fresh branches and one that loads
    pretrained weights gives branches that start as copies of the pretrained later stages. Every head's
    final feature map then has the backbone's shape, so the self-teacher, L_feat, L_adv and the
    discriminators work unchanged. `self.backbone` is the network make_backbone() returned, untouched:
    it is what you deploy.

        net = StagedMixSKDNet(lambda: torchvision.models.mobilenet_v3_small(num_classes=10))
    """

    def __init__(self, make_backbone, layout_of=None):
        super().__init__()
        layout_of = layout_of or torchvision_layout
        self.backbone = make_backbone()
        self.layout = layout_of(self.backbone)
        if len(self.layout.stages) < 2:
            raise ValueError("a MixSKD network needs at least two stages: one branch after the first")
        nets = [make_backbone() for _ in self.layout.stages[1:]]
        if len({id(net) for net in [self.backbone, *nets]}) <= len(nets):  # branches would rebuild the backbone
            raise ValueError("make_backbone must build a new network on each call: for a model you already "
                             "have, pass lambda: copy.deepcopy(model)")
        self.branches = nn.ModuleList(LayoutBranch(net, self.layout, k) for k, net in enumerate(nets, 1))
        with probing(self.backbone) as device:
            self.feature_channels = run_part(self.backbone, self.layout.post,
                                        self.trunk(torch.zeros(1, 3, 64, 64, device=device))).shape[1]

    def trunk(self, x):
        for stage in [self.layout.stem] + self.layout.stages:
            x = run_part(self.backbone, stage, x)
        return x

    def forward(self, x):
        feats, logits = [], []
        out = run_part(self.backbone, self.layout.stem, x)
        for k, stage in enumerate(self.layout.stages):
            out = run_part(self.backbone, stage, out)
            if k < len(self.branches):
                feat, logit = self.branches[k](out)
                feats.append(feat)
                logits.append(logit)
        out = run_part(self.backbone, self.layout.post, out)
        feats.append(out)
        logits.append(run_part(self.backbone, self.layout.head, out))
        return feats, logits

    def branches_from_backbone(self):
        """Copy the backbone's later stages, post part and head into every branch (after loading
        pretrained weights into the backbone alone)."""
        state = self.backbone.state_dict()
        for branch in self.branches:
            own = branch.net.state_dict()
            branch.net.load_state_dict({k: v for k, v in state.items() if k in own})


@contextlib.contextmanager
def probing(net):
    """Eval mode and no gradient for a forward that only measures shapes: BatchNorm statistics stay as
    they are. Yields the device of the network's parameters."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            yield next(net.parameters()).device
    finally:
        net.train(was_training)


def stride_layout(net, name, post, head):
    """The Layout of a network whose trunk is one Sequential, net.<name>: its modules are grouped by the
    resolution they output, measured on a 64 x 64 input: below 1/4 the stem, then stages at 1/4, 1/8,
    1/16 and 1/32 of the input; its last `post` modules are the post part.

    Four stages at strides 4..32 put the branches where the paper puts them on ResNet-50 (after the
    stages at 1/4, 1/8 and 1/16). Networks with a fifth, stride-2 stage (MobileNet, EfficientNet) fold
    it into the stem: a branch there would re-run nearly the whole network at high resolution.
    """
    children = list(net.get_submodule(name).named_children())
    body, tail = children[:len(children) - post], children[len(children) - post:]
    strides = []
    with probing(net) as device:
        x = torch.zeros(1, 3, 64, 64, device=device)
        for _, module in body:
            x = module(x)
            strides.append(64 // x.shape[-1])
    paths = [f"{name}.{child}" for child, _ in body]
    stages = [[p for p, s in zip(paths, strides) if s == 2 ** k] for k in (2, 3, 4, 5)]
    if not all(stages) or any(s > 32 for s in strides):
        raise ValueError(f"{type(net).__name__}: cannot find stages at strides 4, 8, 16 and 32 in {name}")
    return Layout([p for p, s in zip(paths, strides) if s < 4], stages, [f"{name}.{child}" for child, _ in tail],
                  head)


def flatten(x):
    return torch.flatten(x, 1)


def global_pool(x):
    return F.adaptive_avg_pool2d(x, 1)


TORCHVISION_FAMILIES = {  # family: the prefixes of its torchvision model names
    "ResNet / ResNeXt / Wide-ResNet": ("resnet", "resnext", "wide_resnet"),
    "RegNet X and Y": ("regnet_x_", "regnet_y_"),
    "ConvNeXt": ("convnext_",),
    "MobileNetV2 and V3": ("mobilenet_v2", "mobilenet_v3_"),
    "EfficientNet V1 and V2": ("efficientnet_b", "efficientnet_v2_"),
    "DenseNet": ("densenet",),
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
    raise ValueError(f"no layout for {type(net).__name__}: {supported_families()}")


def supported_families():
    return "supported torchvision families are " + "; ".join(
        f"{family} ({', '.join(p + '*' for p in prefixes)})" for family, prefixes in TORCHVISION_FAMILIES.items())


def check_arch(arch):
    """A ValueError naming the choices unless arch is one of ours (ARCHS) or torchvision:NAME of a
    supported family."""
    if arch.startswith("torchvision:"):
        import torchvision.models as tvm

        name = arch.removeprefix("torchvision:")
        if name not in tvm.list_models(module=tvm) or not name.startswith(sum(TORCHVISION_FAMILIES.values(), ())):
            raise ValueError(f"unsupported torchvision model {name!r}: {supported_families()}")
    elif arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)} or torchvision:NAME")


def network(arch, num_classes, width=64, stem_relu=True, stem="cifar", mixskd=False):
    """The network an arch names: ours (a ResNet, or with mixskd its MixSKDNet), or for torchvision:NAME
    torchvision.models.get_model(NAME, num_classes=...) as torchvision builds and initialises it (with
    mixskd, a StagedMixSKDNet over it; width, stem_relu and stem then do not apply)."""
    check_arch(arch)
    if not arch.startswith("torchvision:"):
        return (MixSKDNet if mixskd else ResNet)(arch, num_classes, width, stem_relu, stem)
    import torchvision.models as tvm

    make = functools.partial(tvm.get_model, arch.removeprefix("torchvision:"), num_classes=num_classes)
    return StagedMixSKDNet(make) if mixskd else make()
