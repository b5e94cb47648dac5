"""ResNets and the MixSKD network: backbone plus three auxiliary branches.

docs/method.md sections 2 (CIFAR) and 9 (ImageNet stem). Paper: Yang et al., "MixSKD: Self-Knowledge
Distillation from Mixup for Image Recognition", ECCV 2022. ResNet: He et al. 2016, with the 3x3
stride-1 CIFAR stem or torchvision's ImageNet stem.

`ResNet` is the deployed network and stands on its own. `MixSKDNet` wraps it and adds branch k
(k = 1, 2, 3): fresh copies of stages k+1..4 on top of stage k, with their own classifier. Every
head returns its final feature map F_k (C x 4 x 4 on 32x32 CIFAR input, C x 7 x 7 on 224x224
ImageNet input) and its logits z_k. The model knows nothing about mixup: the training step mixes,
the model only forwards.

Module names follow torchvision (conv1, bn1, layer1..4, fc, downsample.0/1), so backbone weights
move between this file and torchvision-style code by name.

`StagedMixSKDNet` does the same for any network described by a `Layout` (stem, stages, post, head).
layouts.py holds the layouts of torchvision's and timm's families, CNNs and vision transformers; arch.py
chooses between our ResNets and those networks. This file needs torch alone.
"""
import contextlib
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
    """The released ImageNet model's initialisation, also torchvision's ResNet's (docs/method.md section 9): every
    conv kaiming-normal with fan_out, every BatchNorm weight 1 and bias 0; linear layers keep PyTorch's
    default. The CIFAR networks keep PyTorch's default everywhere (docs/method.md section 7)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNet(nn.Module):
    """ResNet (docs/method.md sections 2 and 9): the backbone, head 4, and the network deployed at test time.

    width: channels of the first stage (64 in the paper; smaller for tests and CPU runs).
    stem_relu: ReLU after the stem BN. The released MixSKD CIFAR ResNet omits it (docs/method.md section 6,
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
    """Auxiliary branch k (docs/method.md section 2): fresh copies of stages k+1..4 and its own classifier."""

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
    after its last stage before pooling: DenseNet's final norm and ReLU, a ViT's final norm) and head
    (pooling and classifier). Each part is a list of items, applied in order to the running tensor:
    - a path: a submodule ("layer1", "features.3") or a method ("forward_head", "_pos_embed") of the network;
    - a plain function of the tensor (torch.flatten);
    - a pair (function, path) for a step the network writes inline: function(submodule at path, x)
      (torchvision's ViT prepends its class token, net.class_token, in forward itself).
    A layout holds no modules of its own, so it survives module swaps such as SyncBatchNorm conversion.
    image_size: the side of the probe image that measures the network; a network built for one input size
    (a ViT) gives that size."""
    stem: list
    stages: list
    post: list
    head: list
    image_size: int = 64


def resolve(net, path):
    """The submodule of net at path, or the method its last name calls on its parent ("forward_head")."""
    parent, _, name = path.rpartition(".")
    return getattr(net.get_submodule(parent), name)


def run_part(net, part, x):
    """Apply the items of one part of a Layout, in order, to x."""
    for item in part:
        if isinstance(item, str):
            x = resolve(net, item)(x)
        elif isinstance(item, tuple):
            function, path = item
            x = function(net.get_submodule(path), x)
        else:
            x = item(x)
    return x


class LayoutBranch(nn.Module):
    """Auxiliary branch k of a StagedMixSKDNet: a fresh network of the backbone's kind, of which stages
    k+1..K, post and head run on the output of the backbone's stage k. In its stem and stages 1..k, every
    submodule is replaced by nn.Identity, and every method or (function, path) pair takes with it the
    parameters its module holds itself (a ViT's class token and position embedding). So the branch holds
    no parameter it never uses (DistributedDataParallel needs a gradient for each); its keys are the
    network's own."""

    def __init__(self, net, layout, k):
        super().__init__()
        for item in layout.stem + [item for stage in layout.stages[:k] for item in stage]:
            if isinstance(item, str) and isinstance(resolve(net, item), nn.Module):
                net.set_submodule(item, nn.Identity())
            elif not callable(item):
                owner = net.get_submodule(item.rpartition(".")[0] if isinstance(item, str) else item[1])
                for name, _ in list(owner.named_parameters(recurse=False)):
                    owner.register_parameter(name, None)
        self.net, self.layout, self.k = net, layout, k

    def forward(self, x):
        for stage in self.layout.stages[self.k:]:
            x = run_part(self.net, stage, x)
        feat = run_part(self.net, self.layout.post, x)
        return feat, run_part(self.net, self.layout.head, feat)


class StagedMixSKDNet(nn.Module):
    """MixSKD over any staged backbone (docs/method.md section 2, generalised). forward(x) -> (feats, logits) as
    MixSKDNet's, backbone last. Branch k, after stage k (k = 1..K-1), re-runs stages k+1..K, the post part
    and a head of the network's own kind, with weights of its own: each comes from a call of
    make_backbone(), so a factory that builds fresh networks gives fresh branches and one that loads
    pretrained weights gives branches that start as copies of the pretrained later stages. Every head's
    final feature map then has the backbone's shape, so the self-teacher, L_feat, L_adv and the
    discriminators work unchanged. `self.backbone` is the network make_backbone() returned, untouched:
    it is what you deploy. layout_of(net) -> Layout: layouts.library_layout knows the torchvision and timm
    families (layouts.py beside this file), or write your own.

        net = StagedMixSKDNet(lambda: torchvision.models.mobilenet_v3_small(num_classes=10), library_layout)
    """

    def __init__(self, make_backbone, layout_of):
        super().__init__()
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
            probe = torch.zeros(1, 3, self.layout.image_size, self.layout.image_size, device=device)
            self.feature_channels = run_part(self.backbone, self.layout.post, self.trunk(probe)).shape[1]

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
