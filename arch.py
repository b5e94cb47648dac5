"""`--arch`: one of our ResNets, or a torchvision or timm network; the network it names for a method.

Our ResNets (model.py: ResNet, and MixSKDNet with its branches) need torch alone; `torchvision:NAME` and
`timm:NAME` are the library's own networks, with their branches built by model.StagedMixSKDNet from the
family's layout (layouts.py; docs/networks.md). The choice between the two lives here, above both files, so
that neither imports the other's side.
"""
from layouts import check_library_arch, library_network, model_kwargs
from model import ARCHS, MixSKDNet, ResNet


def library(arch):
    """"torchvision" or "timm" for an arch of an outside library ("timm:NAME"), else None (ours)."""
    prefix = arch.partition(":")[0]
    return prefix if ":" in arch and prefix in ("torchvision", "timm") else None


def check_arch(arch):
    """A ValueError naming the choices unless arch is one of ours (ARCHS), or torchvision:NAME or timm:NAME of
    a family that layouts.py supports."""
    if library(arch):
        check_library_arch(arch)
    elif arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}, torchvision:NAME or timm:NAME")


def network(arch, num_classes, width=64, stem_relu=True, stem="cifar", heads=False, image_size=None):
    """The network an arch names: ours (a ResNet, or with heads its MixSKDNet: backbone and three branches),
    or for torchvision:NAME and timm:NAME the library's own network for num_classes (a transformer for
    image_size x image_size inputs), as layouts.library_network builds it (with heads, a StagedMixSKDNet over
    it; width, stem_relu and stem then do not apply)."""
    check_arch(arch)
    if not library(arch):
        return (MixSKDNet if heads else ResNet)(arch, num_classes, width, stem_relu, stem)
    return library_network(arch, model_kwargs(arch, num_classes, image_size), heads)
