"""Tests of digital_stain.core.nets: shapes, ranges, registration warp, tile-stable instance norm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from digital_stain.core.nets import (
    ColorizationUNet,
    PatchDiscriminator,
    RegistrationNet,
    ResnetGenerator,
    Statistics,
    TileStableInstanceNorm,
    record_statistics,
    warp,
)
from digital_stain.core.nets.norm import number_norm_layers
from digital_stain.core.nets.registration import smoothness_loss


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _norms(net: nn.Module) -> list[TileStableInstanceNorm]:
    return [m for m in net.modules() if isinstance(m, TileStableInstanceNorm)]


def _snapshot(net: nn.Module) -> list:
    """What a call could leave on ``net``: each module's plain attributes, parameter and buffer names and values."""
    return [(name, {k: v for k, v in vars(m).items() if not k.startswith("_")}, list(m._parameters),
             list(m._buffers), [t.detach().clone() for t in (*m._parameters.values(), *m._buffers.values())])
            for name, m in net.named_modules()]


def _same_snapshot(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        x[:4] == y[:4] and len(x[4]) == len(y[4]) and all(torch.equal(s, t) for s, t in zip(x[4], y[4]))
        for x, y in zip(a, b))


class _Pointwise(nn.Module):
    """1x1 convolutions and norm layers; like ResnetGenerator, hands ``statistics``/``record`` to our norms."""

    def __init__(self, norm=TileStableInstanceNorm):
        super().__init__()
        self.layers = nn.ModuleList([nn.Conv2d(3, 6, 1), norm(6), nn.ReLU(), nn.Conv2d(6, 4, 1), norm(4)])
        number_norm_layers(self)

    def forward(self, x, statistics: Statistics | None = None, record: list | None = None):
        for layer in self.layers:
            x = layer(x, statistics, record) if isinstance(layer, TileStableInstanceNorm) else layer(x)
        return x


# ---------------------------------------------------------------- generator


def test_resnet_generator_default_is_paper_size():
    net = ResnetGenerator()
    assert net.config == dict(in_channels=4, out_channels=3, width=64, n_blocks=9, upsample="transpose")
    assert 11.0e6 <= _n_params(net) <= 11.8e6
    with torch.no_grad():
        out = net(torch.rand(1, 4, 12, 16) * 2 - 1)
    assert out.shape == (1, 3, 12, 16)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("size", [(8, 8), (12, 20), (32, 28)])
def test_small_generator_keeps_input_size_and_range(size):
    net = ResnetGenerator(in_channels=4, out_channels=3, width=8, n_blocks=2)
    x = torch.rand(2, 4, *size) * 2 - 1
    out = net(x)
    assert out.shape == (2, 3, *size)
    assert out.min() >= -1.0 and out.max() <= 1.0
    out.mean().backward()  # trainable end to end
    assert all(p.grad is not None for p in net.parameters())


def test_reverse_generator_three_to_three():
    net = ResnetGenerator(in_channels=3, out_channels=3, width=8, n_blocks=1)
    out = net(torch.rand(1, 3, 16, 16))
    assert out.shape == (1, 3, 16, 16)
    # large inputs saturate but never leave [-1, 1]
    big = net(torch.randn(1, 3, 16, 16) * 1e3)
    assert big.min() >= -1.0 and big.max() <= 1.0


def test_generator_norm_layers_hold_only_weight_and_bias():
    net = ResnetGenerator(width=8, n_blocks=1)
    norm_keys = [k for k in net.state_dict() if "frozen" in k]
    assert norm_keys == []
    norms = _norms(net)
    assert norms and all(set(m.state_dict()) == {"weight", "bias"} and list(m.buffers()) == [] for m in norms)
    assert [m.position for m in norms] == list(range(len(norms)))  # numbered in module order when built


# ---------------------------------------------------------------- U-Net


@pytest.mark.parametrize("size", [(16, 24), (32, 16)])
def test_colorization_unet_output_shape_and_range(size):
    net = ColorizationUNet(width=8, depth=3)
    assert net.size_multiple == 8
    x = torch.rand(2, 1, *size) * 2 - 1
    out = net(x)
    assert out.shape == (2, 2, *size)
    assert out.min() >= -1.0 and out.max() <= 1.0
    net.eval()
    with torch.no_grad():
        out_eval = net(x)
    assert out_eval.shape == (2, 2, *size)
    assert out_eval.min() >= -1.0 and out_eval.max() <= 1.0


def test_colorization_unet_accepts_its_min_size_and_tiler_pads_to_it():
    """The U-Net needs >= 2 px at its bottleneck; it says so in ``min_size`` and the tiler pads to it."""
    import numpy as np

    from digital_stain.stain.tiling import tiled_apply

    net = ColorizationUNet(width=4, depth=3).eval()
    assert net.min_size == 2 * net.size_multiple
    with torch.no_grad():
        assert net(torch.rand(1, 1, net.min_size, net.min_size) * 2 - 1).shape == (1, 2, net.min_size, net.min_size)
    tiny = np.random.default_rng(0).random((1, 8, 20), dtype=np.float32)
    out = tiled_apply(net, tiny, out_channels=2, tile=8, multiple=net.size_multiple, min_size=net.min_size)
    assert out.shape == (2, 8, 20)


# ---------------------------------------------------------------- discriminator


def _patch_side(side: int, n_layers: int) -> int:
    for i in range(n_layers + 1):
        stride = 2 if i < n_layers else 1
        side = (side + 2 - 4) // stride + 1
    return (side + 2 - 4) + 1


@pytest.mark.parametrize("size, expected", [((64, 64), (6, 6)), ((70, 70), (6, 6)), ((32, 48), (2, 4))])
def test_patch_discriminator_output_shape(size, expected):
    assert (_patch_side(size[0], 3), _patch_side(size[1], 3)) == expected
    net = PatchDiscriminator(in_channels=3, width=8, n_layers=3)
    out = net(torch.rand(2, 3, *size))
    assert out.shape == (2, 1, *expected)


def test_patch_discriminator_other_depth_and_channels():
    net = PatchDiscriminator(in_channels=4, width=4, n_layers=2)
    out = net(torch.rand(1, 4, 40, 40))
    assert out.shape == (1, 1, _patch_side(40, 2), _patch_side(40, 2))


# ---------------------------------------------------------------- registration


def test_registration_net_is_identity_at_init():
    net = RegistrationNet(width=8, depth=3)
    moving, fixed = torch.rand(2, 3, 24, 32), torch.rand(2, 3, 24, 32)
    field = net(moving, fixed)
    assert field.shape == (2, 2, 24, 32)
    assert torch.count_nonzero(field) == 0
    torch.testing.assert_close(warp(moving, field), moving, atol=1e-5, rtol=0)


def test_registration_net_gets_gradients_through_warp():
    net = RegistrationNet(width=8, depth=2)
    moving, fixed = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    loss = (warp(moving, net(moving, fixed)) - fixed).abs().mean()
    loss.backward()
    assert net.flow.weight.grad is not None and net.flow.weight.grad.abs().sum() > 0


def test_warp_with_zero_field_is_identity():
    image = torch.rand(2, 3, 11, 13, dtype=torch.float64)
    torch.testing.assert_close(warp(image, torch.zeros(2, 2, 11, 13, dtype=torch.float64)), image, atol=1e-10, rtol=0)


def test_warp_constant_x_displacement_shifts_by_three_pixels():
    image = torch.rand(1, 2, 10, 16, dtype=torch.float64)
    field = torch.zeros(1, 2, 10, 16, dtype=torch.float64)
    field[:, 0] = 3.0
    out = warp(image, field)
    # out(x) = image(x + 3): content moves 3 px left; the right border repeats the edge column
    torch.testing.assert_close(out[..., :-3], image[..., 3:], atol=1e-10, rtol=0)
    torch.testing.assert_close(out[..., -3:], image[..., -1:].expand(-1, -1, -1, 3), atol=1e-10, rtol=0)


def test_warp_constant_y_displacement_shifts_rows_not_columns():
    image = torch.rand(1, 1, 12, 9, dtype=torch.float64)
    field = torch.zeros(1, 2, 12, 9, dtype=torch.float64)
    field[:, 1] = -2.0
    out = warp(image, field)
    torch.testing.assert_close(out[:, :, 2:], image[:, :, :-2], atol=1e-10, rtol=0)


def test_warp_integer_shift_moves_a_pixel_by_that_shift():
    image = torch.zeros(1, 1, 12, 16, dtype=torch.float64)
    image[0, 0, 7, 9] = 1.0
    field = torch.zeros(1, 2, 12, 16, dtype=torch.float64)
    field[:, 0], field[:, 1] = 4.0, -3.0  # out(y, x) = image(y - 3, x + 4)
    out = warp(image, field)
    assert out[0, 0, 10, 5] == 1.0 and out.sum() == 1.0  # the bright pixel moved 4 px left and 3 px down


def test_smoothness_loss_is_zero_for_a_constant_field_with_a_finite_gradient():
    field = torch.full((2, 2, 8, 9), 3.5, requires_grad=True)
    loss = smoothness_loss(field)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(field.grad).all()


def test_smoothness_loss_is_positive_for_a_varying_field():
    assert smoothness_loss(torch.randn(1, 2, 8, 8)).item() > 0.1


def test_smoothness_loss_matches_a_hand_computation():
    # eq. 6: 1/(W H) sum_ij ||(grad_h phi)_ij||_2 + ||(grad_v phi)_ij||_2, forward differences, zero past the edge
    field = torch.tensor([[[0.0, 1.0, 3.0], [0.0, 1.0, 3.0]],  # x: grad_h 1, 2 per row; grad_v 0
                          [[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]]])[None]  # y: grad_h 0; grad_v 2 per column
    # horizontal norms 1 + 2 + 1 + 2 = 6, vertical 2 + 2 + 2 = 6, over H W = 6 pixels: 2
    torch.testing.assert_close(smoothness_loss(field, eps=0.0), torch.tensor(2.0))
    torch.testing.assert_close(smoothness_loss(field), torch.tensor(2.0), atol=2e-3, rtol=0)  # sqrt(eps) per norm
    diagonal = torch.tensor([[[0.0, 3.0]], [[0.0, 4.0]]])[None]  # one step of (3, 4): its 2-norm is 5, over 2 pixels
    torch.testing.assert_close(smoothness_loss(diagonal, eps=0.0), torch.tensor(2.5))
    batch = torch.cat([field, torch.zeros_like(field)])  # a batch averages the images' losses
    torch.testing.assert_close(smoothness_loss(batch, eps=0.0), torch.tensor(1.0))


def test_warp_half_pixel_is_bilinear():
    image = torch.arange(16.0, dtype=torch.float64).view(1, 1, 1, 16).expand(1, 1, 4, 16).contiguous()
    field = torch.zeros(1, 2, 4, 16, dtype=torch.float64)
    field[:, 0] = 0.5
    out = warp(image, field)
    torch.testing.assert_close(out[..., :-1], image[..., :-1] + 0.5, atol=1e-10, rtol=0)


# ---------------------------------------------------------------- instance norm


def test_tile_stable_norm_in_instance_mode_equals_torch_instance_norm():
    channels = 5
    ours = TileStableInstanceNorm(channels)
    ref = nn.InstanceNorm2d(channels, affine=True)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(channels))
        ref.bias.copy_(torch.randn(channels))
    ours.load_state_dict(ref.state_dict())  # same state dict layout
    assert set(ours.state_dict()) == {"weight", "bias"}
    assert ours.position == 0  # a layer on its own reads statistics[0]
    x = torch.randn(3, channels, 9, 7) * 4 + 2
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the fused multiply-add of inference computes the same
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_tile_stable_norm_gradients_match_torch_instance_norm():
    ours = TileStableInstanceNorm(3)
    ref = nn.InstanceNorm2d(3, affine=True)
    x1 = torch.randn(2, 3, 6, 6, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    (ours(x1) ** 2).sum().backward()
    (ref(x2) ** 2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-4)


def test_tile_stable_norm_keeps_input_dtype():
    norm = TileStableInstanceNorm(2)
    statistics = record_statistics(norm, torch.randn(1, 2, 4, 4))
    for dtype in (torch.float64, torch.bfloat16):
        x = torch.randn(1, 2, 4, 4).to(dtype)
        assert norm(x).dtype == dtype  # textbook form (grad enabled)
        assert norm(x, statistics).dtype == dtype  # given statistics
        assert norm(x, record=[]).dtype == dtype  # recording
        with torch.no_grad():
            assert norm(x).dtype == dtype  # fused multiply-add (no grad)


def test_norm_layers_are_numbered_and_recorded_one_entry_each_and_wrong_statistics_refused():
    net = ResnetGenerator(width=4, n_blocks=1)
    norms = _norms(net)
    for m in norms:
        m.position = 0  # undone by numbering again
    count = number_norm_layers(net)
    assert count == len(norms) > 0
    assert [m.position for m in norms] == list(range(count))
    statistics = record_statistics(net, torch.rand(2, 4, 8, 8) * 2 - 1)
    assert isinstance(statistics, tuple) and len(statistics) == count
    assert [(mean.shape, var.shape) for mean, var in statistics] == [(m.weight.shape, m.weight.shape) for m in norms]
    assert all(mean.dtype == var.dtype == torch.float32 and not mean.requires_grad and (var >= 0).all()
               for mean, var in statistics)
    x = torch.rand(1, 4, 8, 8) * 2 - 1
    with torch.no_grad(), pytest.raises(IndexError):  # statistics of a network with fewer norm layers
        net(x, statistics[:-1])
    other = record_statistics(ResnetGenerator(width=8, n_blocks=1), torch.rand(1, 4, 8, 8))
    with torch.no_grad(), pytest.raises(RuntimeError):  # statistics of a wider network
        net(x, other)


def _expected_frozen(x_full, crop, norm):
    var, mean = torch.var_mean(x_full, dim=(2, 3), keepdim=True, unbiased=False)
    y = (crop - mean) / torch.sqrt(var + norm.eps)
    return y * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)


def test_frozen_statistics_normalise_a_crop_with_whole_image_statistics():
    norm = TileStableInstanceNorm(3)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.5, 0.5, -1.0]))
        norm.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    image = torch.randn(1, 3, 32, 40) * torch.tensor([1.0, 3.0, 0.2]).view(1, 3, 1, 1) + 5
    image[..., :8, :8] += 10  # a crop's own statistics differ strongly from the image's
    crop = image[..., :16, :16]
    before = _snapshot(norm)
    statistics = record_statistics(norm, image)
    assert len(statistics) == 1
    assert _same_snapshot(_snapshot(norm), before)  # nothing kept on the module
    frozen = norm(crop, statistics)
    expected = _expected_frozen(image, crop, norm)
    torch.testing.assert_close(frozen, expected, atol=1e-4, rtol=1e-4)
    # statistics are not shared between calls: one without them is plain instance norm, the crop's own statistics
    after = norm(crop)
    assert not torch.allclose(after, expected, atol=1e-2)
    torch.testing.assert_close(after, _expected_frozen(crop, crop, norm), atol=1e-4, rtol=1e-4)


def test_frozen_statistics_tiles_of_pointwise_net_match_whole_image():
    # with 1x1 convolutions, a crop through the net with the whole image's statistics equals the crop of its output
    net = _Pointwise()
    assert [m.position for m in _norms(net)] == [0, 1]
    image = torch.randn(1, 3, 24, 24) + torch.linspace(-3, 3, 24).view(1, 1, 1, 24)
    with torch.no_grad():
        whole = net(image)
        own = net(image[..., :12, :12])  # the crop by its own statistics
        statistics = record_statistics(net, image)
        tiles = [net(image[..., :12, :12], statistics), net(image[..., 12:, 5:20], statistics)]
        again = net(image[..., :12, :12])
    torch.testing.assert_close(tiles[0], whole[..., :12, :12], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tiles[1], whole[..., 12:, 5:20], atol=1e-4, rtol=1e-4)
    # a call without statistics after calls with them is plain instance norm again
    assert not torch.allclose(own, whole[..., :12, :12], atol=1e-2)
    torch.testing.assert_close(again, own, atol=0, rtol=0)
    # the layers called by hand, statistics indexed by position: the same
    with torch.no_grad():
        x = image[..., 12:, 5:20]
        conv1, norm1, relu, conv2, norm2 = net.layers
        by_hand = norm2(conv2(relu(norm1(conv1(x), statistics))), statistics)
    torch.testing.assert_close(by_hand, tiles[1], atol=0, rtol=0)


def test_frozen_statistics_pooled_over_a_batch_of_crops():
    norm = TileStableInstanceNorm(2)
    image = torch.randn(1, 2, 16, 16) * 2 + 1
    crops = torch.cat([image[..., :8, :], image[..., 8:, :]], dim=0)  # cover the image exactly
    ((mean, var),) = record_statistics(norm, crops)
    assert mean.shape == var.shape == (2,) and mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(mean, image.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var, image.var(dim=(0, 2, 3), unbiased=False), atol=1e-4, rtol=1e-4)
    # the crops normalised with the pooled statistics are the image normalised by its own, whether recording or given
    with torch.no_grad():
        whole = norm(image)
        for out in (norm(crops, ((mean, var),)), norm(crops, record=[])):
            torch.testing.assert_close(torch.cat([out[0], out[1]], dim=-2)[None], whole, atol=1e-5, rtol=1e-5)


def test_frozen_statistics_generator_output_of_whole_image_is_unchanged():
    net = ResnetGenerator(width=4, n_blocks=1).eval()
    image = torch.rand(1, 4, 16, 16) * 2 - 1
    record = []
    with torch.no_grad():
        plain = net(image)
        statistics = record_statistics(net, image)
        frozen = net(image, statistics)
        recording = net(image, record=record)
    torch.testing.assert_close(frozen, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recording, plain, atol=1e-5, rtol=1e-5)
    assert len(record) == len(statistics) == len(_norms(net))
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(record, statistics))


def test_recording_and_using_statistics_store_nothing_on_the_network():
    net = ResnetGenerator(width=4, n_blocks=1)
    x = torch.rand(2, 4, 8, 8) * 2 - 1
    before = _snapshot(net)
    with torch.no_grad():
        plain = net(x)
    statistics = record_statistics(net, torch.rand(1, 4, 12, 12) * 2 - 1)
    other = record_statistics(net, torch.rand(3, 4, 16, 8) * 3)
    assert _same_snapshot(_snapshot(net), before)  # state dict, buffers and attributes as they were
    with torch.no_grad():
        first = net(x, statistics)
        net(x, other)  # another image's statistics in between do not leak into the next call
        torch.testing.assert_close(net(x, statistics), first, atol=0, rtol=0)
        torch.testing.assert_close(net(x), plain, atol=0, rtol=0)  # without statistics: plain instance norm
    assert not torch.allclose(first, plain, atol=1e-3)
    assert _same_snapshot(_snapshot(net), before)


def test_failed_recording_leaves_the_network_as_it_was():
    net = ResnetGenerator(width=4, n_blocks=1)
    x = torch.rand(1, 4, 8, 8) * 2 - 1
    before = _snapshot(net)
    with torch.no_grad():
        plain = net(x)
    with pytest.raises(RuntimeError):
        record_statistics(net, torch.rand(1, 2, 8, 8))  # wrong channel count
    assert torch.is_grad_enabled()
    assert _same_snapshot(_snapshot(net), before)
    with torch.no_grad():
        torch.testing.assert_close(net(x), plain, atol=0, rtol=0)


def test_recorded_statistics_on_net_without_our_norm_are_empty_and_a_no_op():
    net = _Pointwise(norm=nn.BatchNorm2d).eval()  # e.g. a batch-norm network in eval mode
    assert _norms(net) == [] and number_norm_layers(net) == 0
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        before = net(x)
        statistics = record_statistics(net, x)
        assert statistics == ()
        inside = net(x, statistics)
    torch.testing.assert_close(inside, before)


def test_resize_convolution_upsampling_leaves_no_checkerboard_and_old_configs_build_transposed():
    from digital_stain.quality.metrics import checkerboard

    image = torch.rand(1, 4, 128, 128) * 2 - 1
    grids = {}
    for mode in ("transpose", "nearest", "bilinear"):
        torch.manual_seed(0)
        net = ResnetGenerator(4, 3, 8, 2, upsample=mode).eval()
        assert _n_params(net) == _n_params(ResnetGenerator(4, 3, 8, 2))  # only where the upsampling is made differs
        with torch.no_grad():
            out = ((net(image)[0].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy()
        grids[mode] = checkerboard(out)[2]
    # even untrained, a stride-2 transposed convolution paints a 2-pixel grid; a resize then a convolution does not
    assert grids["transpose"] > 10 * grids["nearest"] and grids["transpose"] > 10 * grids["bilinear"]
    old = dict(in_channels=4, out_channels=3, width=8, n_blocks=2)  # a model file from before the option
    assert ResnetGenerator(**old).config["upsample"] == "transpose"
    with pytest.raises(ValueError, match="unknown upsampling 'cubic'"):
        ResnetGenerator(upsample="cubic")
