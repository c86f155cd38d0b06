import math

import monai.networks.nets
import pytest
import torch
from torch import nn

from leuko.nets import NETS, ViT3D, build_net, constructor_kwargs, net_class, net_kwargs

TINY = [name for name in NETS if name.endswith("_tiny")]
FULL = [name for name in NETS if not name.endswith("_tiny")]


def _first_conv(net: nn.Module) -> nn.Conv3d:
    return next(m for m in net.modules() if isinstance(m, nn.Conv3d))


def _on_meta(name: str, **kwargs) -> nn.Module:
    # shapes and parameter counts of the full-size nets without initialising or computing anything
    with torch.device("meta"):
        return build_net(name, **kwargs)


def test_registry_names():
    assert set(NETS) == {"resnet3d_50", "resnet3d_50_tiny", "vit3d", "vit3d_tiny", "fishnet3d", "fishnet3d_tiny"}


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
