"""Library networks: torchvision's and timm's families as stem / stages / post / head, their branches, and
--init-from their weights (docs/networks.md; method.md section 2 for any network)."""
import copy
import re
import sys

import pytest
import torch
import torchvision

import checkpoints
import cli
import errors
from arch import check_arch, network
from conftest import batch
from layouts import library_layout, library_network, model_kwargs, torchvision_layout
from losses import MixSKDObjective, discriminators
from model import MixSKDNet, StagedMixSKDNet
from self_teacher import SelfTeacher

WIDTH, CLASSES, BATCH = 4, 10, 4
slow = pytest.mark.slow  # whole runs and subprocesses
# outside the method's checklist, every test here: `pytest -m "not slow"` (the checklist) leaves the file out
pytestmark = slow


def test_other_networks_are_refused_naming_the_supported_families():
    for arch in ("torchvision:maxvit_t", "torchvision:alexnet", "torchvision:resnet_18", "torchvision:"):
        with pytest.raises(ValueError, match=r"unsupported torchvision model .*ResNet / ResNeXt / Wide-ResNet.*"
                                             r"RegNet.*ConvNeXt.*MobileNetV2 and V3.*EfficientNet.*DenseNet"
                                             r".*ViT.*Swin"):
            check_arch(arch)
    for arch in ("timm:beit_base_patch16_224", "timm:swinv2_tiny_window8_256", "timm:resnet_18", "timm:"):
        with pytest.raises(ValueError, match=r"unsupported timm model .*ResNet / ResNeXt.*ConvNeXt.*EfficientNet.*"
                                             r"MobileNetV3 / V4.*RegNet.*ViT / DeiT.*Swin"):
            check_arch(arch)
    for arch in ("torchvision:vit_b_16", "torchvision:vit_b_32", "torchvision:swin_t", "torchvision:swin_v2_t",
                 "timm:resnet50d", "timm:mobilenetv4_conv_small", "timm:deit_tiny_patch16_224",
                 "timm:vit_tiny_patch16_224.augreg_in21k"):
        check_arch(arch)
    with pytest.raises(ValueError, match="torchvision:NAME or timm:NAME"):
        check_arch("resnet20")


def test_timm_arch_without_timm_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(ValueError, match=r"^timm:NAME needs timm, which is not installed: pip install timm$"):
        check_arch("timm:resnet18")
    with pytest.raises(SystemExit):
        cli.parse_args(["--arch", "timm:resnet18"])
    assert capsys.readouterr().err.splitlines()[-1].endswith("timm:NAME needs timm, which is not installed: "
                                                             "pip install timm (see train.py --help)")


def test_model_kwargs_hold_the_image_size_of_the_transformers_alone():
    assert model_kwargs("torchvision:vit_b_16", 10, 32) == {"num_classes": 10, "image_size": 32}
    assert model_kwargs("torchvision:swin_t", 10, 32) == {"num_classes": 10}  # torchvision's Swin takes any size
    assert model_kwargs("timm:deit_tiny_patch16_224", 10, 32) == {"pretrained": False, "num_classes": 10,
                                                                   "img_size": 32}
    assert model_kwargs("timm:swin_tiny_patch4_window7_224", 10, 64)["img_size"] == 64
    assert model_kwargs("timm:convnext_atto", 10, 32) == {"pretrained": False, "num_classes": 10}


def test_mobilenet_stages_sit_at_strides_4_to_32_with_the_stride_2_stage_in_the_stem():

    layout = torchvision_layout(torchvision.models.mobilenet_v2())
    assert layout.stem == ["features.0", "features.1"]
    assert layout.stages == [[f"features.{i}" for i in r] for r in (range(2, 4), range(4, 7), range(7, 14),
                                                                      range(14, 18))]
    assert layout.post == ["features.18"]


def test_our_branches_start_as_copies_of_a_pretrained_backbone():
    net = MixSKDNet("resnet18", CLASSES, WIDTH)
    net.branches_from_backbone()
    assert torch.equal(net.branches[0].layers[2][1].conv2.weight, net.backbone.layer4[1].conv2.weight)
    assert torch.equal(net.branches[2].fc.bias, net.backbone.fc.bias)
    assert net.branches[0].layers[0][0].conv1.weight.data_ptr() != net.backbone.layer2[0].conv1.weight.data_ptr()


def test_a_factory_that_returns_one_model_is_refused_and_the_model_kept():
    """Branches replace their early stages with Identity, so each needs a network of its own."""

    mine = torchvision.models.resnet18(num_classes=CLASSES)
    with pytest.raises(ValueError, match=r"make_backbone must build a new network on each call.*copy.deepcopy"):
        StagedMixSKDNet(lambda: mine, library_layout)
    assert isinstance(mine.conv1, torch.nn.Conv2d) and not isinstance(mine.layer3, torch.nn.Identity)
    assert len(StagedMixSKDNet(lambda: copy.deepcopy(mine), library_layout).branches) == 3


TORCHVISION_SMALLEST = ["resnet18", "regnet_x_400mf", "regnet_y_400mf", "convnext_tiny", "mobilenet_v2",
                        "mobilenet_v3_small", "efficientnet_b0", "efficientnet_v2_s", "densenet121"]


def trains_and_deploys_as_itself(net, rebuild):
    """A MixSKD network over a library's model: four heads with feature maps of one shape, fresh branches, two
    optimiser steps on one fixed batch lower the loss in both recipes; the backbone saved as deploy.pt loads
    strictly into rebuild() (the library's own class) with the same logits; once the branches copy the
    backbone, every head's logits are the library model's own forward."""
    import io

    x, y = batch(n=4)
    perm, lam = torch.tensor([2, 0, 3, 1]), 0.6
    x_mix = lam * x + (1 - lam) * x[perm]
    feats, logits = net(torch.cat([x, x_mix]))
    assert len(feats) == 4 and len({tuple(f.shape) for f in feats}) == 1 and feats[0].shape[1] == net.feature_channels
    assert [tuple(z.shape) for z in logits] == [(8, CLASSES)] * 4
    backbone = dict(net.backbone.named_parameters())  # fresh branches: every random weight is their own
    random_weights = [(n, p) for n, p in net.branches[2].net.named_parameters()
                      if p.dim() >= 2 and p.numel() > 1 and p.std() > 0]
    assert random_weights and not any(torch.equal(p, backbone[n]) for n, p in random_weights)
    for recipe in ("paper", "official"):
        model = copy.deepcopy(net)
        channels = model.feature_channels
        objective = MixSKDObjective(model, SelfTeacher(channels, CLASSES), discriminators(channels), recipe)
        # Adam: one step size for every family, whose initial gradient norms span 1e2 to 3e4 at this size
        opt = torch.optim.Adam([p for p in objective.parameters() if p.requires_grad], lr=1e-5)
        totals = []
        for _ in range(2):
            torch.manual_seed(0)  # the same dropout and stochastic-depth draws each step: one fixed objective
            total, _, _ = objective(torch.cat([x, x_mix]), y, lam, perm)
            opt.zero_grad()
            total.backward()
            opt.step()
            totals.append(total.item())
        assert totals[-1] < totals[0], (recipe, totals)
    buffer = io.BytesIO()
    torch.save({"backbone": net.backbone.state_dict()}, buffer)
    deployed = rebuild()
    deployed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)["backbone"], strict=True)
    net.eval()
    with torch.no_grad():
        own = deployed.eval()(x)
        torch.testing.assert_close(own, net(x)[1][-1], rtol=0, atol=1e-6)
        net.branches_from_backbone()
        for head in net(x)[1]:
            torch.testing.assert_close(head, own, rtol=0, atol=1e-6)


@slow  # each builds four networks of the family
@pytest.mark.parametrize("name", TORCHVISION_SMALLEST)
def test_torchvision_family_trains_and_deploys_as_itself(name):

    torch.manual_seed(0)
    net = network(f"torchvision:{name}", CLASSES, heads=True)
    assert isinstance(net.backbone, type(torchvision.models.get_model(name)))
    trains_and_deploys_as_itself(net, lambda: torchvision.models.get_model(name, num_classes=CLASSES))


def torchvision_transformer(kind):
    """torchvision's ViT, Swin and Swin V2 classes narrowed for a test (get_model fixes vit_b_16's sizes)."""
    from torchvision.models import swin_transformer as swin
    from torchvision.models import vision_transformer as vit

    swin_v2 = {"block": swin.SwinTransformerBlockV2, "downsample_layer": swin.PatchMergingV2}
    return {"vit": lambda: vit.VisionTransformer(32, 8, num_layers=6, num_heads=2, hidden_dim=16, mlp_dim=32,
                                                 num_classes=CLASSES),
            "swin": lambda: swin.SwinTransformer([4, 4], 8, [2] * 4, [1] * 4, [2, 2], num_classes=CLASSES),
            "swin_v2": lambda: swin.SwinTransformer([4, 4], 8, [2] * 4, [1] * 4, [2, 2], num_classes=CLASSES,
                                                    **swin_v2)}[kind]


@pytest.mark.parametrize("kind", ["vit", "swin", "swin_v2"])
def test_torchvision_transformers_train_and_deploy_as_themselves(kind):
    torch.manual_seed(0)
    make = torchvision_transformer(kind)
    trains_and_deploys_as_itself(StagedMixSKDNet(make, library_layout), make)


TIMM_SMALLEST = {  # the smallest model of each family, narrower still through timm's own keyword arguments
    "resnet10t": {"channels": (8, 16, 32, 64), "stem_width": 8},  # a deep stem
    "convnext_atto": {"dims": (8, 16, 32, 64)},
    "regnetx_002": {"w0": 8, "wa": 8.0, "wm": 2.0, "depth": 6, "group_size": 4, "stem_width": 8},
    "vit_tiny_patch16_224": {"embed_dim": 16, "depth": 4, "num_heads": 2},
    "deit_tiny_distilled_patch16_224": {"embed_dim": 16, "depth": 6, "num_heads": 2},  # stages of 2, 2, 1, 1 blocks
    "swin_tiny_patch4_window7_224": {"embed_dim": 8, "depths": (2, 2, 2, 2), "num_heads": (1,) * 4, "window_size": 2},
}
TIMM_BLOCKS = {  # EfficientNet and MobileNetV3/V4 fix their widths in their model functions: their classes, narrowed
    "efficientnet.EfficientNet": [["ds_r1_k3_s1_e1_c8"], ["ir_r1_k3_s2_e2_c8"], ["ir_r1_k3_s2_e2_c16_se0.25"],
                                  ["ir_r1_k3_s2_e2_c16"], ["ir_r1_k3_s1_e2_c24"], ["ir_r1_k3_s2_e2_c32"]],
    "mobilenetv3.MobileNetV3": [["er_r1_k3_s2_e2_c8"], ["uir_r1_a3_k5_s2_e2_c16"],  # MobileNetV4's blocks
                                ["uir_r1_a3_k3_s2_e2_c16", "uir_r1_a0_k3_s1_e2_c24"], ["uir_r1_a5_k5_s2_e2_c32"],
                                ["cn_r1_k1_s1_c64"]],
}


def timm_small(name, size=32, heads=True):
    """A TIMM_SMALLEST network as --arch timm:NAME builds it for size x size images, and its model_kwargs."""
    kwargs = {**model_kwargs(f"timm:{name}", CLASSES, size), **TIMM_SMALLEST[name]}
    return library_network(f"timm:{name}", kwargs, heads), kwargs


@pytest.mark.parametrize("name", list(TIMM_SMALLEST))
def test_timm_family_trains_and_deploys_as_itself(name):
    import timm

    torch.manual_seed(0)
    net, kwargs = timm_small(name)
    assert type(net.backbone).__module__.startswith("timm.models.")
    trains_and_deploys_as_itself(net, lambda: timm.create_model(name, **kwargs))


@pytest.mark.parametrize("family", list(TIMM_BLOCKS))
def test_timm_blocks_families_train_and_deploy_as_themselves(family):
    import importlib

    from timm.models._efficientnet_builder import decode_arch_def

    module, cls = family.split(".")
    cls = getattr(importlib.import_module(f"timm.models.{module}"), cls)
    torch.manual_seed(0)

    def make():
        return cls(decode_arch_def(TIMM_BLOCKS[family]), num_classes=CLASSES, num_features=64, stem_size=8)

    trains_and_deploys_as_itself(StagedMixSKDNet(make, library_layout), make)


@slow  # four networks each
def test_timm_smallest_efficientnet_and_mobilenets_are_split_at_strides_4_to_32():
    """tinynet_e, mobilenetv3_small_050 and mobilenetv4_conv_small as --arch timm:NAME builds them: the stride-2
    stage joins the stem, and with the branches copying the backbone every head is the model's own forward."""
    x = batch(n=2)[0]
    for name, stem in (("tinynet_e", ["conv_stem", "bn1", "blocks.0"]), ("mobilenetv3_small_050", ["conv_stem", "bn1"]),
                       ("mobilenetv4_conv_small", ["conv_stem", "bn1"])):
        net = network(f"timm:{name}", CLASSES, heads=True, image_size=32).eval()
        assert net.layout.stem == stem and len(net.layout.stages) == 4
        net.branches_from_backbone()
        with torch.no_grad():
            own = net.backbone(x)
            for head in net(x)[1]:
                torch.testing.assert_close(head, own, rtol=0, atol=1e-6)


def test_f_k_of_a_vit_is_every_token_as_a_c_x_l_x_1_map_and_of_swin_its_patch_grid():
    """docs/networks.md, "F_k of a vision transformer": a ViT's tokens after its final norm, class and distillation
    tokens included, as N x C x L x 1 (global average pooling: the mean token); Swin's N x C x H x W grid after its
    norm."""
    x = torch.randn(2, 3, 64, 64)
    deit = timm_small("deit_tiny_distilled_patch16_224", 64)[0].eval()
    tokens = deit.backbone.forward_features(x)
    assert tokens.shape == (2, 2 + 4 * 4, 16)  # class and distillation token, 4 x 4 patches
    feats = deit(x)[0]
    assert [tuple(f.shape) for f in feats] == [(2, 16, 18, 1)] * 4
    torch.testing.assert_close(feats[-1], tokens.transpose(1, 2).unsqueeze(-1), rtol=0, atol=0)
    torch.testing.assert_close(feats[-1].mean((2, 3)), tokens.mean(1))
    vit = StagedMixSKDNet(torchvision_transformer("vit"), library_layout).eval()
    captured = []
    vit.backbone.encoder.ln.register_forward_hook(lambda module, args, out: captured.append(out))
    torch.testing.assert_close(vit(x[..., :32, :32])[0][-1], captured[0].transpose(1, 2).unsqueeze(-1))
    assert captured[0].shape == (2, 1 + 4 * 4, 16)
    swin = timm_small("swin_tiny_patch4_window7_224", 64)[0].eval()
    grid = swin.backbone.forward_features(x)
    assert grid.shape == (2, 2, 2, 64)  # N x H x W x C, 64 / 32 = 2
    torch.testing.assert_close(swin(x)[0][-1], grid.permute(0, 3, 1, 2), rtol=0, atol=0)


def test_transformer_branches_hold_no_parameter_they_never_use():
    """The stem's tokens and position embeddings are gone from the branches (DistributedDataParallel
    needs a gradient for every parameter), and every parameter left gets one."""
    vit = StagedMixSKDNet(torchvision_transformer("vit"), library_layout)
    for net in (timm_small("deit_tiny_distilled_patch16_224")[0], vit):
        keys = {k for branch in net.branches for k in branch.state_dict()}
        assert not keys & {f"net.{k}" for k in ("cls_token", "dist_token", "pos_embed", "class_token",
                                                 "encoder.pos_embedding", "patch_embed.proj.weight",
                                                 "conv_proj.weight")}
        feats, logits = net(batch(n=2)[0])
        sum(z.sum() for z in logits).backward()
        assert [n for n, p in net.named_parameters() if p.grad is None] == []


@slow
def test_init_from_a_torchvision_state_dict_fills_backbone_and_branches(tmp_path, capsys):
    """A 1,000-class torchvision state dict into a 10-class MixSKD network: every weight but the
    classifier's, which stays fresh (said in one line); the branches start as copies of the backbone."""

    torch.manual_seed(1)
    pretrained = torchvision.models.regnet_y_400mf(num_classes=1000)
    torch.save(pretrained.state_dict(), tmp_path / "regnet.pth")
    net = network("torchvision:regnet_y_400mf", CLASSES, heads=True)
    fresh_fc = net.backbone.fc.weight.clone()
    checkpoints.init_from(str(tmp_path / "regnet.pth"), net, None)
    assert "has 1000 classes, this run 10: the classifier (fc.weight, fc.bias) starts fresh" in capsys.readouterr().out
    assert torch.equal(net.backbone.fc.weight, fresh_fc)
    for n, p in pretrained.state_dict().items():
        assert n.startswith("fc.") or torch.equal(net.backbone.state_dict()[n], p)
    branch = net.branches[0].net.state_dict()
    assert torch.equal(branch["trunk_output.block4.block4-0.proj.0.weight"],
                       pretrained.state_dict()["trunk_output.block4.block4-0.proj.0.weight"])
    assert "stem.0.weight" not in branch and "trunk_output.block1.block1-0.proj.0.weight" not in branch


@slow
def test_init_from_reads_torchvisions_densenet_files_and_refuses_another_family_quietly(tmp_path, capsys):
    """torchvision's published DenseNet weights use old key names ("norm.1"); a 1,000-class file of another
    network is refused without first announcing that its classifier stays fresh."""

    torch.manual_seed(2)
    source = torchvision.models.densenet121(num_classes=CLASSES).state_dict()
    legacy = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in source.items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    torch.save(legacy, tmp_path / "densenet121.pth")
    net = network("torchvision:densenet121", CLASSES)
    checkpoints.init_from(str(tmp_path / "densenet121.pth"), net, None)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in source.items())
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(errors.UserError, match="missing"):
        checkpoints.init_from(str(tmp_path / "resnet18.pth"), network("torchvision:resnet34", CLASSES), None)
    assert "note" not in capsys.readouterr().out


@slow
def test_init_from_a_timm_vit_state_dict_resamples_its_position_embedding(tmp_path, capsys):
    """A 1,000-class timm ViT for 224 x 224, saved as .safetensors or as a torch file, into a 10-class MixSKD ViT
    for 32 x 32: timm's own filter resamples the position embedding to 1 + 2 x 2 tokens, the classifier stays
    fresh, every other weight loads; the branches copy the blocks they re-run. A corrupt file: one line."""
    import timm
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(3)
    small = TIMM_SMALLEST["vit_tiny_patch16_224"]
    pretrained = timm.create_model("vit_tiny_patch16_224", num_classes=1000, **small)
    save_file(pretrained.state_dict(), tmp_path / "vit.safetensors")
    torch.save(pretrained.state_dict(), tmp_path / "vit.pth")
    for name in ("vit.safetensors", "vit.pth"):
        net = timm_small("vit_tiny_patch16_224")[0]
        checkpoints.init_from(str(tmp_path / name), net, None)
        assert "the classifier (head.weight, head.bias) starts fresh" in capsys.readouterr().out
        assert net.backbone.pos_embed.shape == (1, 5, 16)
        resampled = resample_abs_pos_embed(pretrained.pos_embed, (2, 2), num_prefix_tokens=1)
        torch.testing.assert_close(net.backbone.pos_embed, resampled)
        for n, p in pretrained.state_dict().items():
            assert n.startswith(("head.", "pos_embed")) or torch.equal(net.backbone.state_dict()[n], p), n
        assert torch.equal(net.branches[0].net.blocks[3].mlp.fc1.weight, pretrained.blocks[3].mlp.fc1.weight)
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(errors.UserError, match=r"^cannot read .*broken.safetensors: truncated, corrupt or not a "
                                             r"safetensors file"):
        checkpoints.init_from(str(tmp_path / "broken.safetensors"), net, None)


