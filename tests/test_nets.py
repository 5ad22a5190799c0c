"""Networks: shapes on odd sizes, the SRDiff conditioning path, zero-initialised output, sizes."""
import pytest
import torch

from samsr import config
from samsr.nets import RRDBNet, UNet
from samsr.nets.unet import group_count


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _conv_params(cin: int, cout: int, k: int = 3) -> int:
    return cin * cout * k * k + cout


def _rrdb_params(nf: int, nb: int, gc: int, scale: int) -> int:
    """RRDBNet size written out from the ESRGAN layout, independent of the module code."""
    dense = sum(_conv_params(nf + i * gc, gc) for i in range(4)) + _conv_params(nf + 4 * gc, nf)
    ups = {1: 0, 2: 1, 4: 2, 8: 3}[scale]
    return (_conv_params(3, nf) + nb * 3 * dense + _conv_params(nf, nf)          # first, trunk, trunk_conv
            + ups * _conv_params(nf, nf) + _conv_params(nf, nf) + _conv_params(nf, 3))  # up, HR, last


def test_rrdb_shapes_and_feature_channels_on_odd_size():
    torch.manual_seed(0)
    net = RRDBNet(num_feat=16, num_block=3, grow=8, scale=4)
    y = torch.rand(1, 3, 37, 53) * 2 - 1
    with torch.no_grad():
        sr, feats = net.forward_with_features(y)
        assert torch.equal(net.features(y), feats)
        assert torch.equal(net(y), sr)
    assert sr.shape == (1, 3, 148, 212)
    assert sr.min() >= -1 and sr.max() <= 1
    assert net.cond_channels == 16  # 16 * ((3 + 1) // 3)
    assert feats.shape == (1, net.cond_channels, 37, 53)


@pytest.mark.parametrize("nf,nb,expected", [(64, 17, 384), (16, 3, 16), (8, 5, 16), (8, 8, 24)])
def test_rrdb_cond_channels_match_every_third_map(nf, nb, expected):
    # maps 0..nb (nb block outputs + fused trunk); indices 2, 5, 8, ... are used
    assert len(range(2, nb + 1, 3)) * nf == expected
    assert RRDBNet(nf, nb, grow=4).cond_channels == expected
    if nb <= 8:
        assert RRDBNet(nf, nb, grow=4).features(torch.zeros(1, 3, 5, 7)).shape == (1, expected, 5, 7)


def test_rrdb_rejects_bad_scale_and_too_few_blocks():
    with pytest.raises(ValueError, match="power of two"):
        RRDBNet(8, 3, 4, scale=3)
    with pytest.raises(ValueError, match="num_block=1"):
        RRDBNet(8, 1, 4)


@pytest.mark.parametrize("ch,groups", [(16, 8), (24, 8), (48, 8), (12, 6), (6, 6), (3, 3), (10, 5)])
def test_group_count_divides(ch, groups):
    assert group_count(ch) == groups


def test_unet_odd_size_without_cond():
    torch.manual_seed(0)
    net = UNet(in_ch=6, out_ch=3, base=16, mults=(1, 2, 3), blocks_per_level=1)
    out = net(torch.randn(2, 6, 37, 53), torch.tensor([0.0, 7.5]))
    assert out.shape == (2, 3, 37, 53)
    assert torch.isfinite(out).all()


def test_unet_cond_path_changes_output_and_size_is_padded():
    torch.manual_seed(0)
    net = UNet(in_ch=3, out_ch=3, base=16, mults=(1, 2, 2, 4), blocks_per_level=1, cond_ch=8, scale=4)
    x, t = torch.randn(1, 3, 36, 52), torch.tensor([10])  # 36x52 is not a multiple of 8: padded inside
    c1 = torch.randn(1, 8, 9, 13)
    out1 = net(x, t, c1)
    assert out1.shape == (1, 3, 36, 52)
    assert (out1 - net(x, t, c1 + 1.0)).abs().max() > 1e-3
    assert torch.equal(out1, net(x, t, c1))


def test_unet_time_changes_output():
    torch.manual_seed(0)
    net = UNet(3, 3, base=16, mults=(1, 2), blocks_per_level=1)
    x = torch.randn(1, 3, 16, 16)
    assert (net(x, torch.tensor([1])) - net(x, torch.tensor([90]))).abs().max() > 1e-4


def test_unet_cond_errors_name_the_shape():
    net = UNet(3, 3, base=16, mults=(1, 2), blocks_per_level=1, cond_ch=8, scale=4)
    with pytest.raises(ValueError, match="expected"):
        net(torch.randn(1, 3, 32, 32), torch.tensor([1]), torch.randn(1, 8, 7, 8))
    with pytest.raises(ValueError, match="pass cond"):
        net(torch.randn(1, 3, 32, 32), torch.tensor([1]))
    with pytest.raises(ValueError, match="cond_ch=0"):
        UNet(3, 3, base=16, mults=(1,))(torch.randn(1, 3, 8, 8), torch.tensor([1]), torch.randn(1, 8, 2, 2))


def test_zero_init_out_is_exactly_zero_at_init():
    torch.manual_seed(0)
    net = UNet(6, 3, base=16, mults=(1, 2), blocks_per_level=1, zero_init_out=True)
    out = net(torch.randn(2, 6, 37, 53), torch.tensor([3.0, 15.0]))
    assert out.shape == (2, 3, 37, 53)
    assert torch.count_nonzero(out) == 0


def test_tiny_preset_sizes():
    """Parameter counts of the tiny and paper presets (RRDB checked against the layout written out)."""
    tiny, paper = config.load("samdiffsr-tiny"), config.load("samdiffsr")
    r = tiny.rrdb
    rrdb = RRDBNet(r.num_feat, r.num_block, r.grow, tiny.data.scale)
    assert _count(rrdb) == _rrdb_params(16, 3, 8, 4) == 145_379
    u = tiny.unet
    denoiser = UNet(3, 3, u.base, u.mults, u.blocks_per_level, cond_ch=rrdb.cond_channels, scale=4)
    assert _count(denoiser) == 141_155
    # the SAMSR tiny UNet (6 input channels, no cond)
    assert _count(UNet(6, 3, u.base, u.mults, u.blocks_per_level, zero_init_out=True)) == 125_187
    assert _rrdb_params(paper.rrdb.num_feat, paper.rrdb.num_block, paper.rrdb.grow, 4) == 12_381_443
