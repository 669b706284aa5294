"""What DCA adds to a U-Net, counted (bench.models.counts.dca_cost)."""
from bench.models.counts import dca_cost


def test_dca_cost_at_224_reproduces_the_paper_figure():
    cost = dca_cost((224, 224))
    assert cost["added_params"] == 110_560
    # Token grid 28x28 (N = 784) over skips C = [32, 64, 128, 256], C_sum = 480; multiply-adds:
    n, c, total = 784, [32, 64, 128, 256], 480
    spatial = sum(n * n * total + n * n * ci for ci in c)       # QK^T and AV per scale
    channel = sum(2 * ci * total * n for ci in c)               # C_i x C_sum map and AV
    out_conv = sum(n * ci * ci for ci in c)                     # 1x1 conv on the token grid
    macs = spatial + channel + out_conv
    assert cost["added_flops"] == 2 * macs                      # FlopCounterMode: 2 per MAC
    assert 1.85e9 < macs < 2.1e9                                # the paper's "+2 GFLOPs" are MACs
