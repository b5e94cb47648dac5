"""The MixSKD self-teacher h: aggregates the four heads' feature maps into soft labels.

docs/method.md section 4, Eq. (4): h(F_1..F_4) = Linear(GAP(Conv1x1(concat_channels(F_1..F_4)))), the 1x1 conv
4C -> C without bias, no normalisation or activation. Paper: Yang et al., ECCV 2022, section 3.4.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class SelfTeacher(nn.Module):
    """Self-teacher h, Eq. (4). forward(feats) takes a list of the heads' maps, N x C x H x W.

    The conv is linear and bias-free, so it commutes with global average pooling: we pool first and
    apply the 1x1 conv as a matrix product, H*W times cheaper (16x at 4x4) and the same function.
    The weights keep the conv's shape (C x 4C x 1 x 1), as in the released checkpoints. Used as a matrix, the
    weight gets its gradient in the default strides: under channels_last keep the weight in them (train.build
    does), or DistributedDataParallel warns on each rank that the gradient's strides differ from its bucket's.
    """

    def __init__(self, channels, num_classes, num_heads=4):
        super().__init__()
        self.conv = nn.Conv2d(num_heads * channels, channels, 1, bias=False)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, feats):
        pooled = torch.cat([f.mean((2, 3)) for f in feats], dim=1)
        return self.fc(F.linear(pooled, self.conv.weight.flatten(1)))
