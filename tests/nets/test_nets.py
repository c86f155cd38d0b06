import math

import monai.networks.nets
import pytest
import torch
from torch import nn

from leuko.nets import NETS, ViT3D, build_net, constructor_kwargs, net_class, net_kwargs

# CPU-sized nets (the _tiny variants and resnet3d_50_slim) and the full-size nets that have a _tiny variant
TINY = [name for name in NETS if name.endswith(("_tiny", "_slim"))]
FULL = [name for name in NETS if f"{name}_tiny" in NETS]


def _first_conv(net: nn.Module) -> nn.Conv3d:
    return next(m for m in net.modules() if isinstance(m, nn.Conv3d))


def _on_meta(name: str, **kwargs) -> nn.Module:
    # shapes and parameter counts of the full-size nets without initialising or computing anything
    with torch.device("meta"):
        return build_net(name, **kwargs)


def test_registry_names():
    studies = {"resnet3d_50", "resnet3d_50_tiny", "vit3d", "vit3d_tiny", "fishnet3d", "fishnet3d_tiny"}
    other_stems = {"fishnet3d_pool_tiny", "vit3d_convstem", "vit3d_convstem_tiny"}
    other_sizes = {"resnet3d_50_slim"}
    assert set(NETS) == studies | other_stems | other_sizes


def test_slim_is_resnet50_depth_at_tiny_width():
    def blocks(net):
        return [len(getattr(net.backbone, f"layer{i}")) for i in range(1, 5)]

    slim, tiny = (build_net(n, in_channels=1, num_classes=2) for n in ("resnet3d_50_slim", "resnet3d_50_tiny"))
    assert blocks(slim) == [3, 4, 6, 3] == blocks(_on_meta("resnet3d_50", in_channels=1, num_classes=2))
    assert blocks(tiny) == [1, 1, 1, 1] and slim.num_features == tiny.num_features == 256
    assert _first_conv(slim).weight.shape == _first_conv(tiny).weight.shape == (8, 1, 3, 3, 3)
    assert 0.7e6 < sum(p.numel() for p in slim.parameters()) < 0.75e6  # 0.73 M; tiny 0.23 M


def test_other_stems_keep_the_study_nets_as_they_are():
    fishnet = build_net("fishnet3d_tiny", in_channels=1, num_classes=4)
    assert isinstance(fishnet.stem, nn.Conv3d)  # the paper's full-resolution conv, no pooling
    vit = build_net("vit3d_tiny", in_channels=1, num_classes=4)
    assert vit.global_pool == "token" and isinstance(vit.patch_embed.proj, nn.Conv3d)  # one linear map per patch


@pytest.mark.parametrize("in_channels", [1, 2])
@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_backward(name, in_channels):
    torch.manual_seed(0)
    net = build_net(name, in_channels=in_channels, num_classes=3)
    x = torch.randn(2, in_channels, 32, 32, 32)  # (B, C, D, H, W)
    logits = net(x)
    assert logits.shape == (2, 3)
    features = net.forward_features(x)
    assert features.shape == (2, net.num_features)
    torch.testing.assert_close(net.head(features), logits)  # forward = head(forward_features)
    logits.square().sum().backward()
    grad = _first_conv(net).weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", TINY)
def test_tiny_channels_last_bf16_autocast(name):
    torch.manual_seed(0)
    net = build_net(name, in_channels=2, num_classes=4).to(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 2, 32, 32, 32).to(memory_format=torch.channels_last_3d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(x)
    assert logits.shape == (2, 4)
    assert torch.isfinite(logits).all()
    logits.float().sum().backward()
    assert torch.isfinite(_first_conv(net).weight.grad).all()


@pytest.mark.parametrize("name", TINY)
def test_drop_rate_before_head(name):
    torch.manual_seed(0)
    net = build_net(name, in_channels=1, num_classes=4, drop_rate=0.5)
    x = torch.randn(2, 1, 32, 32, 32)
    net.eval()
    torch.testing.assert_close(net(x), net(x))
    net.train()
    assert not torch.equal(net(x), net(x))


@pytest.mark.parametrize("shape", [(32, 32, 32), (48, 96, 96)])
@pytest.mark.parametrize("name", FULL)
def test_full_shapes(name, shape):
    net = _on_meta(name, in_channels=1, num_classes=4)
    x = torch.empty(1, 1, *shape, device="meta")
    assert net(x).shape == (1, 4)
    assert net.forward_features(x).shape == (1, net.num_features)


@pytest.mark.slow  # 2-4 s each on 2 cores; test_full_shapes runs the same code on the meta device
@pytest.mark.parametrize("name", FULL)
def test_full_forward(name):
    torch.manual_seed(0)
    net = build_net(name, in_channels=1, num_classes=4).eval()
    with torch.no_grad():
        logits = net(torch.randn(1, 1, 32, 32, 32))
    assert logits.shape == (1, 4) and torch.isfinite(logits).all()


def test_resnet3d_50_is_monai_resnet50():
    ours = _on_meta("resnet3d_50", in_channels=2, num_classes=4)
    with torch.device("meta"):
        monai_net = monai.networks.nets.resnet50(
            spatial_dims=3, n_input_channels=2, num_classes=4, pretrained=False, bias_downsample=False
        )
    assert ours.num_features == 2048
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in monai_net.parameters())


def test_parameter_counts_ordered():
    def n_params(name):
        return sum(p.numel() for p in _on_meta(name, in_channels=1, num_classes=4).parameters())

    full = {name: n_params(name) for name in FULL}
    for name in FULL:
        assert n_params(f"{name}_tiny") * 20 < full[name]
    assert full["fishnet3d"] < full["vit3d"] < full["resnet3d_50"]
    assert 2e6 < full["fishnet3d"] < 10e6  # "a few M"


def test_unknown_net_lists_known_names():
    with pytest.raises(ValueError, match="resnet") as excinfo:
        build_net("resnet3d_51", in_channels=1, num_classes=4)
    for name in NETS:
        assert name in str(excinfo.value)


def test_unknown_kwarg_names_net_and_valid_kwargs():
    with pytest.raises(TypeError, match="dropout") as excinfo:
        build_net("fishnet3d_tiny", in_channels=1, num_classes=4, dropout=0.1)
    message = str(excinfo.value)
    assert "fishnet3d_tiny" in message and "drop_rate" in message
    assert "drop_path_rate" in net_kwargs("vit3d")


def test_bad_channels_raise():
    with pytest.raises(ValueError, match="in_channels"):
        build_net("vit3d_tiny", in_channels=0, num_classes=4)


def test_vit3d_other_input_size_interpolates_pos_embed():
    torch.manual_seed(0)
    net = build_net("vit3d_tiny", in_channels=1, num_classes=4)  # img_size 32^3, patch 8^3
    assert net.grid == (4, 4, 4)
    x = torch.randn(2, 1, 16, 48, 40)  # grid (2, 6, 5)
    logits = net(x)
    assert logits.shape == (2, 4)
    logits.sum().backward()
    assert net.pos_embed.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("patch_size", "strides"),
    [
        ((8, 8, 8), [(2, 2, 2)] * 3),
        ((8, 16, 16), [(2, 2, 2)] * 3 + [(1, 2, 2)]),
        ((4, 8, 8), [(2, 2, 2)] * 2 + [(1, 2, 2)]),
    ],
)
def test_vit3d_conv_stem_halves_until_the_patch_grid(patch_size, strides):
    img_size = tuple(2 * p for p in patch_size)
    net = build_net("vit3d_convstem_tiny", in_channels=2, num_classes=4, img_size=img_size, patch_size=patch_size)
    convs = [m for m in net.patch_embed.proj if isinstance(m, nn.Conv3d)]
    assert [c.stride for c in convs[:-1]] == strides
    assert convs[-1].kernel_size == (1, 1, 1) and convs[-1].out_channels == net.num_features
    assert net.grid == (2, 2, 2)
    tokens, grid = net.patch_embed(torch.randn(1, 2, *img_size))
    assert tokens.shape == (1, 8, net.num_features) and grid == (2, 2, 2)


def test_vit3d_convstem_pools_the_patch_tokens():
    torch.manual_seed(0)
    net = build_net("vit3d_convstem_tiny", in_channels=1, num_classes=4).eval()
    seen = {}
    net.blocks.register_forward_hook(lambda module, args, out: seen.update(tokens=out))
    features = net.forward_features(torch.randn(2, 1, 32, 32, 32))
    assert seen["tokens"].shape == (2, 1 + 64, net.num_features)  # cls token + 4^3 patch tokens
    torch.testing.assert_close(features, net.norm(seen["tokens"][:, 1:].mean(dim=1)))  # the cls token is left out


def test_vit3d_stem_and_pool_errors():
    with pytest.raises(ValueError, match="powers of two"):
        build_net("vit3d_convstem_tiny", in_channels=1, num_classes=4, img_size=(24, 24, 24), patch_size=(6, 6, 6))
    with pytest.raises(ValueError, match="stem='linear'"):
        build_net("vit3d_tiny", in_channels=1, num_classes=4, stem="linear")
    with pytest.raises(ValueError, match="global_pool='max'"):
        build_net("vit3d_tiny", in_channels=1, num_classes=4, global_pool="max")


def test_vit3d_img_size_and_patch_errors():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_net("vit3d_tiny", in_channels=1, num_classes=4, img_size=(30, 32, 32))
    net = build_net("vit3d_tiny", in_channels=1, num_classes=4)
    with pytest.raises(ValueError, match=r"crop or pad"):
        net(torch.randn(1, 1, 30, 32, 32))


def test_fishnet3d_residual_transfer_concatenation():
    net = build_net("fishnet3d_tiny", in_channels=1, num_classes=4)  # widths (4, 8, 16, 32)
    up_channels = net.up[-1].refine[-1].body[-1].out_channels  # last upsampling step, level 1
    transfer_channels = net.down1[0].conv.out_channels  # first downsampling step, level 1
    assert net.down2[0].conv.in_channels == up_channels + transfer_channels == 16

    seen = {}

    def record_input(module, args, out):
        seen["in"] = args[0].shape

    net.down2[0].register_forward_hook(record_input)
    net(torch.randn(2, 1, 33, 32, 31))  # odd sizes: upsampling must land on the transfer's size
    assert seen["in"] == (2, 16, 16, 16, 15)


def test_fishnet3d_pool_stem_runs_the_net_from_half_resolution():
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen[name] = tuple(args[0].shape)

        return hook

    paper = build_net("fishnet3d_tiny", in_channels=1, num_classes=4)  # widths (4, 8, 16, 32)
    pooled = build_net("fishnet3d_pool_tiny", in_channels=1, num_classes=4)  # widths (8, 16, 32, 64)
    paper.down1[0].register_forward_hook(record("paper"))
    pooled.down1[0].register_forward_hook(record("pool"))
    pooled.bridge.register_forward_hook(record("pool bridge"))
    x = torch.randn(2, 1, 32, 32, 32)
    paper(x), pooled(x)
    assert seen["paper"] == (2, 4, 32, 32, 32)
    assert seen["pool"] == (2, 8, 16, 16, 16)  # conv -> BN -> leaky ReLU -> 2x max pool
    assert seen["pool bridge"] == (2, 64, 2, 2, 2)  # the 2^3 grid of fishnet3d on 32^3 cells
    assert pooled(torch.randn(2, 1, 33, 32, 31)).shape == (2, 4)  # odd sides line up as with the conv stem


def test_fishnet3d_unknown_stem_names_the_choices():
    with pytest.raises(ValueError, match="stem='s2d'.*'conv'.*'pool'"):
        build_net("fishnet3d_tiny", in_channels=1, num_classes=4, stem="s2d")


def test_fishnet3d_needs_two_downsampling_steps():
    with pytest.raises(ValueError, match="widths"):
        build_net("fishnet3d", in_channels=1, num_classes=4, widths=(8, 16))


def test_features_are_penultimate():
    for name in TINY:
        net = build_net(name, in_channels=1, num_classes=5)
        assert net.head.in_features == net.num_features and net.head.out_features == 5
        assert math.prod(net.head.weight.shape) == 5 * net.num_features


@pytest.mark.parametrize("name", list(NETS))
def test_no_weight_decay_names_real_parameters(name):
    net = _on_meta(name, in_channels=1, num_classes=4)
    skip = net.no_weight_decay()
    assert isinstance(skip, set)
    assert skip <= {n for n, _ in net.named_parameters()}, f"{name}: no_weight_decay names no parameter"
    # what the name-free rule (biases, norm weights) would miss: only the net knows these
    if isinstance(net, ViT3D):
        assert skip == {"pos_embed", "cls_token"}
    else:
        assert skip == set()


@pytest.mark.parametrize("name", list(NETS))
def test_input_shape_reaches_only_the_nets_that_take_it(name):
    kwargs = constructor_kwargs(name, {"drop_rate": 0.1}, [16, 32, 32])
    if net_class(name) is ViT3D:
        assert kwargs == {"img_size": (16, 32, 32), "drop_rate": 0.1}
    else:
        assert kwargs == {"drop_rate": 0.1}  # convolutions take any shape
    assert constructor_kwargs(name, {"drop_rate": 0.1}, None) == {"drop_rate": 0.1}


def test_vit3d_takes_img_size_from_the_input_shape_unless_given():
    assert build_net("vit3d_tiny", in_channels=1, num_classes=4, input_shape=(16, 32, 32)).grid == (2, 4, 4)
    given = build_net("vit3d_tiny", in_channels=1, num_classes=4, input_shape=(16, 32, 32), img_size=(32, 32, 32))
    assert given.grid == (4, 4, 4)
    fishnet = build_net("fishnet3d_tiny", in_channels=1, num_classes=4, input_shape=(16, 32, 32))
    assert fishnet(torch.randn(1, 1, 16, 32, 32)).shape == (1, 4)
