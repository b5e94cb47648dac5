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
"""
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
        if stem == "imagenet":
            imagenet_init(self.branches)

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
