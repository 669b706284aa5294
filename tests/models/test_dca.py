"""Dual Cross-Attention: parameter count of the official module, the attention formulas, shapes in
2D and 3D on non-square inputs, gradients, the attention-memory guard and bad-input errors."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from med3dvlm.models.seg.dca import (ChannelCrossAttention, DualCrossAttention, SpatialCrossAttention,
                                 resize_to)

PAPER_CHANNELS = [32, 64, 128, 256]


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_parameter_count_matches_official_module(spatial_dims):
    # Official DCA of the U-Net at width factor 0.5: 110,560 parameters (REFERENCE §7). No
    # parameter depends on the token grid or on the number of spatial axes.
    dca = DualCrossAttention(spatial_dims, PAPER_CHANNELS, token_grid=4)
    assert n_params(dca) == 110_560


def test_parameter_count_grows_per_block():
    # Each extra block adds 2 LayerNorms and 4 per-channel projections per scale and attention.
    one = DualCrossAttention(2, PAPER_CHANNELS, 4, n_blocks=1)
    two = DualCrossAttention(2, PAPER_CHANNELS, 4, n_blocks=2)
    total = sum(PAPER_CHANNELS)
    per_block = 2 * (2 * total) + 2 * (4 * total + 4 * len(PAPER_CHANNELS) * total)
    assert n_params(two) - n_params(one) == per_block == 21_120


def explicit_attention(q, k, v, scale):
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


def affine(module, x):
    return x * module.weight + module.bias


@pytest.mark.parametrize("heads", [1, 2])
def test_channel_attention_is_the_papers_formula(seed, heads):
    own_c, total_c, n = 6, 16, 10
    cca = ChannelCrossAttention(own_c, total_c, heads).double()
    own, joint = torch.randn(3, n, own_c).double(), torch.randn(3, n, total_c).double()
    q, k, v = affine(cca.query, own), affine(cca.key, joint), affine(cca.value, joint)
    expected = torch.empty(3, n, own_c).double()
    qc, kc = own_c // heads, total_c // heads
    for h in range(heads):
        # channels are the tokens: (B, C/h, N) maps, a C_i/h × C_Σ/h attention, 1/sqrt(C_Σ)
        out = explicit_attention(q[..., h * qc:(h + 1) * qc].mT, k[..., h * kc:(h + 1) * kc].mT,
                                 v[..., h * kc:(h + 1) * kc].mT, total_c ** -0.5)
        expected[..., h * qc:(h + 1) * qc] = out.mT
    expected = affine(cca.proj, expected)
    torch.testing.assert_close(cca(own, joint), expected)


@pytest.mark.parametrize("heads", [1, 4])
def test_spatial_attention_is_the_papers_formula(seed, heads):
    own_c, total_c, n = 8, 24, 12
    sca = SpatialCrossAttention(own_c, total_c, heads).double()
    own, joint = torch.randn(2, n, own_c).double(), torch.randn(2, n, total_c).double()
    q, k, v = affine(sca.query, joint), affine(sca.key, joint), affine(sca.value, own)
    expected = torch.empty(2, n, own_c).double()
    qc, vc = total_c // heads, own_c // heads
    for h in range(heads):
        expected[..., h * vc:(h + 1) * vc] = explicit_attention(
            q[..., h * qc:(h + 1) * qc], k[..., h * qc:(h + 1) * qc], v[..., h * vc:(h + 1) * vc], qc ** -0.5)
    expected = affine(sca.proj, expected)
    torch.testing.assert_close(sca(own, joint), expected)


def official_order_forward(dca, skips):
    """The module's pipeline written out step by step, with the official order at the end:
    resize to the skip's size first, then the 1×1 conv."""
    grid = dca.token_grid
    pool = F.adaptive_avg_pool2d if dca.spatial_dims == 2 else F.adaptive_avg_pool3d
    tokens = [affine(p, pool(s, grid).flatten(2).mT) for p, s in zip(dca.token_proj, skips)]
    for block in dca.blocks:
        for norms, attentions in ((block.channel_norm, block.channel_attention),
                                  (block.spatial_norm, block.spatial_attention)):
            normed = [F.layer_norm(t, t.shape[-1:], n.weight, n.bias, 1e-6) for n, t in zip(norms, tokens)]
            joint = torch.cat(normed, -1)
            tokens = [t + a(x, joint) for t, x, a in zip(tokens, normed, attentions)]
    out = []
    for t, s, conv, norm in zip(tokens, skips, dca.out_proj, dca.out_norm):
        t = t.mT.reshape(t.shape[0], -1, *grid)
        out.append(norm(conv(resize_to(t, s.shape[2:])) + s))
    return out


def make_skips(channels, sizes, batch=2, dtype=torch.float64):
    return [torch.randn(batch, c, *size, dtype=dtype) for c, size in zip(channels, sizes)]


@pytest.mark.parametrize("spatial_dims, sizes, grid", [
    # non-square, not powers of two, strides that are not integers (45/7, 31/5)
    (2, [(45, 31), (23, 16), (12, 8), (7, 5)], (6, 4)),
    # anisotropic CT-like grid, as in (4, 8, 8)
    (3, [(13, 34, 30), (7, 17, 15), (4, 9, 8)], (4, 8, 8)),
])
def test_output_shapes_and_values_match_the_step_by_step_pipeline(seed, spatial_dims, sizes, grid):
    channels = [8, 16, 24, 32][:len(sizes)]
    dca = DualCrossAttention(spatial_dims, channels, grid).double().eval()
    for m in dca.out_norm:  # non-trivial running statistics, so eval-mode BN is not the identity
        m[0].running_mean.uniform_(-1, 1)
        m[0].running_var.uniform_(0.5, 2)
    skips = make_skips(channels, sizes)
    out = dca(skips)
    assert [tuple(o.shape) for o in out] == [tuple(s.shape) for s in skips]
    expected = official_order_forward(dca, skips)
    for o, e in zip(out, expected):
        torch.testing.assert_close(o, e)
    assert all((o >= 0).all() for o in out)  # ends in ReLU
    assert any((o > 0).float().mean() > 0.2 for o in out)


def test_token_grid_none_pools_to_the_coarsest_skip(seed):
    sizes = [(40, 50), (20, 26), (10, 13)]
    skips = make_skips([8, 8, 16], sizes, dtype=torch.float32)
    auto = DualCrossAttention(2, [8, 8, 16], token_grid=None).eval()
    fixed = DualCrossAttention(2, [8, 8, 16], token_grid=(10, 13)).eval()
    fixed.load_state_dict(auto.state_dict())
    for a, f in zip(auto(skips), fixed(skips)):
        torch.testing.assert_close(a, f)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_gradients_reach_every_parameter_and_every_skip(seed, spatial_dims):
    channels = [8, 16, 32]
    sizes = [(18, 14), (9, 7), (5, 4)] if spatial_dims == 2 else [(8, 12, 10), (4, 6, 5), (2, 3, 3)]
    dca = DualCrossAttention(spatial_dims, channels, (2, 3) if spatial_dims == 2 else (2, 3, 3), n_blocks=2)
    skips = [s.requires_grad_() for s in make_skips(channels, sizes, dtype=torch.float32)]
    loss = sum((o * torch.randn_like(o)).sum() for o in dca(skips))
    loss.backward()
    for name, p in dca.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for s in skips:
        assert s.grad.abs().sum() > 0


def test_attention_memory_guard_states_the_figure():
    # 3D grid of 16x32x32 = 16384 tokens: 1 * 4 * 4 * 16384^2 * 4 bytes = 16 GiB per sample.
    with pytest.raises(ValueError, match=r"N = 16384 tokens.*17,179,869,184 bytes \(16\.00 GiB\) per sample"
                                         r".*max_attention_bytes = 1,073,741,824"):
        DualCrossAttention(3, PAPER_CHANNELS, (16, 32, 32))
    # the default limit (1 GiB) admits the paper's 2D grid, 28x28
    dca = DualCrossAttention(2, PAPER_CHANNELS, 28)
    assert dca.attention_bytes((28, 28)) == 1 * 4 * 4 * 784**2 * 4
    # the limit is an argument; None switches the check off
    with pytest.raises(ValueError, match="max_attention_bytes"):
        DualCrossAttention(2, PAPER_CHANNELS, 28, max_attention_bytes=10**6)
    DualCrossAttention(3, PAPER_CHANNELS, (16, 32, 32), max_attention_bytes=None)


@pytest.mark.parametrize("n_blocks", [1, 2])
def test_attention_bytes_is_what_autograd_keeps_of_the_n_by_n_maps(seed, n_blocks):
    # N = 7 * 5 = 35 matches no other axis here (C_sum / heads = 30), so every saved tensor
    # ending in (35, 35) is a spatial attention map.
    dca = DualCrossAttention(2, [8, 16, 32, 64], (7, 5), n_blocks=n_blocks)
    skips = [torch.randn(3, c, 56 // 2**i, 40 // 2**i, requires_grad=True) for i, c in enumerate([8, 16, 32, 64])]
    saved = {}

    def pack(t):
        if t.dim() >= 2 and t.shape[-2:] == (35, 35):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with sdpa_kernel(SDPBackend.MATH), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dca(skips)
    assert len(saved) == n_blocks * 4
    assert sum(saved.values()) == 3 * dca.attention_bytes((7, 5))  # batch of 3


def test_attention_memory_guard_applies_to_an_automatic_grid():
    dca = DualCrossAttention(2, [4, 4], token_grid=None, max_attention_bytes=1 * 2 * 4 * (15 * 15)**2 * 4)
    dca([torch.randn(1, 4, 30, 30), torch.randn(1, 4, 15, 15)])  # N = 15 * 15 fits exactly
    with pytest.raises(ValueError, match="N = 256 tokens"):
        dca([torch.randn(1, 4, 32, 32), torch.randn(1, 4, 16, 16)])


@pytest.mark.parametrize("skips, match", [
    (lambda: [torch.randn(1, 8, 16, 16), torch.randn(1, 16, 8, 8)],
     r"expected 3 skips \(len\(in_channels\)\); got 2"),
    (lambda: [torch.randn(1, 8, 16, 16), torch.randn(1, 12, 8, 8), torch.randn(1, 32, 4, 4)],
     r"skips\[1\] must have in_channels\[1\] = 16 channels; got 12"),
    (lambda: [torch.randn(1, 8, 16, 16), torch.randn(1, 16, 8, 8), torch.randn(1, 32, 3, 4)],
     r"token_grid \(4, 4\) must be no larger than every skip; skips\[2\] has spatial size \(3, 4\)"),
    (lambda: [torch.randn(1, 8, 16, 16), torch.randn(1, 16, 8, 8), torch.randn(1, 32, 4, 4, 4)],
     r"skips\[2\] must have shape \(B, C, H, W\)"),
    (lambda: [torch.randn(2, 8, 16, 16), torch.randn(1, 16, 8, 8), torch.randn(1, 32, 4, 4)],
     r"batch size; skips\[0\] has 2, skips\[1\] has 1"),
    (lambda: torch.randn(1, 8, 16, 16), r"skips must be a list or tuple of 3 tensors"),
])
def test_bad_skips_are_named(skips, match):
    dca = DualCrossAttention(2, [8, 16, 32], token_grid=4)
    with pytest.raises((ValueError, TypeError), match=match):
        dca(skips())


@pytest.mark.parametrize("kwargs, match", [
    (dict(spatial_dims=1), r"spatial_dims must be 2 or 3; got 1"),
    (dict(token_grid=(4, 4, 4)), r"token_grid must be a positive int or 2 positive ints .* got \(4, 4, 4\)"),
    (dict(token_grid=0), r"token_grid must be a positive int"),
    (dict(in_channels=[8, 6]), r"spatial_heads=4 must divide .* \[6, 14\] are not divisible"),
    (dict(channel_heads=3), r"channel_heads=3 must divide"),
    (dict(in_channels=[]), r"in_channels must list"),
    (dict(n_blocks=0), r"n_blocks must be a positive int; got 0"),
])
def test_bad_constructor_arguments_are_named(kwargs, match):
    args = {**dict(spatial_dims=2, in_channels=[8, 16], token_grid=4), **kwargs}
    with pytest.raises(ValueError, match=match):
        DualCrossAttention(**args)


def test_resize_to_gives_the_exact_size_and_commutes_with_a_1x1_conv(seed):
    # The module convolves on the token grid and then resizes; the official code resizes first.
    conv = torch.nn.Conv3d(6, 6, 1).double()
    t = torch.randn(2, 6, 3, 5, 4, dtype=torch.float64)
    assert resize_to(t, (7, 13, 9)).shape[2:] == (7, 13, 9)
    torch.testing.assert_close(resize_to(conv(t), (7, 13, 9)), conv(resize_to(t, (7, 13, 9))))
    assert math.isclose(float(resize_to(torch.ones(1, 1, 2, 3), (5, 7)).mean()), 1.0)
    # corners aligned, as the official module's nn.Upsample(align_corners=True)
    up = resize_to(t, (7, 13, 9))
    torch.testing.assert_close(up[..., ::3, ::3, ::8], t[..., :, :, ::3])
