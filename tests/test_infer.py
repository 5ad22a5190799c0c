"""Tiled inference (DESIGN.md infer.py): boxes, window, shared noise fields, tiled == whole image."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samsr import config
from samsr.config import InferConfig
from samsr.diffusion.samdiffsr import SamDiffSR
from samsr.infer import (NoiseField, blend_window, effective_tile, super_resolve_image, tile_boxes,
                         tiled_super_resolve)


def test_tile_boxes_fixed_layout():
    # 10x7 image, tile 4, overlap 1 -> stride 3: rows start 0, 3, 6; columns 0, 3 (3 + 4 = 7)
    assert tile_boxes(10, 7, 4, 1) == [(0, 0, 4, 4), (0, 3, 4, 7), (3, 0, 7, 4), (3, 3, 7, 7),
                                       (6, 0, 10, 4), (6, 3, 10, 7)]
    # 11 rows: starts 0, 3, 6 then the last one shifted inward to 7
    assert [b[0] for b in tile_boxes(11, 4, 4, 1)] == [0, 3, 6, 7]


@pytest.mark.parametrize("h,w,tile,overlap", [(10, 7, 4, 1), (37, 53, 16, 4), (5, 40, 8, 2), (17, 17, 16, 15)])
def test_tile_boxes_cover_every_pixel_with_equal_tiles(h, w, tile, overlap):
    boxes = tile_boxes(h, w, tile, overlap)
    covered = torch.zeros(h, w, dtype=torch.int64)
    sizes = {(y1 - y0, x1 - x0) for y0, x0, y1, x1 in boxes}
    assert sizes == {(min(tile, h), min(tile, w))}
    for y0, x0, y1, x1 in boxes:
        assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1


@pytest.mark.parametrize("tile", [0, 64])
def test_tile_boxes_single_pass(tile):
    assert tile_boxes(37, 53, tile, 8) == [(0, 0, 37, 53)]


def test_tile_boxes_rejects_overlap_not_below_tile():
    with pytest.raises(ValueError, match="overlap=8"):
        tile_boxes(40, 40, 8, 8)


class TileRecorder:
    """A fake SRMethod (×2, nearest) that records the shape of every batch of LR tiles it is given."""
    scale = 2

    def __init__(self):
        self.calls = []

    def super_resolve(self, lr, *, noise_fn=None, **kwargs):
        self.calls.append(tuple(lr.shape))
        return F.interpolate(lr, scale_factor=self.scale, mode="nearest")


def test_tile_zero_is_auto_one_pass_for_small_and_tiles_for_large_images():
    cfg = InferConfig()
    assert (cfg.tile, cfg.auto_tile, effective_tile(cfg)) == (0, 256, 256)
    small, large = TileRecorder(), TileRecorder()
    super_resolve_image(small, torch.zeros(1, 3, 256, 100), cfg)
    assert small.calls == [(1, 3, 256, 100)]                   # fits in auto_tile: the whole image at once
    lr = torch.rand(1, 3, 300, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = super_resolve_image(large, lr, cfg)
    assert large.calls == [(2, 3, 256, 40)]                    # 300 rows > 256: two tiles (rows 0-256, 44-300)
    assert torch.allclose(out, F.interpolate(lr, scale_factor=2, mode="nearest"), atol=1e-6)
    never, explicit = TileRecorder(), TileRecorder()
    super_resolve_image(never, lr, InferConfig(auto_tile=0))   # auto_tile=0: always one pass
    super_resolve_image(explicit, lr, InferConfig(tile=100, overlap=4, tile_batch=2))   # an explicit tile wins
    assert never.calls == [(1, 3, 300, 40)] and explicit.calls == [(2, 3, 100, 40), (2, 3, 100, 40)]
    with pytest.raises(ValueError, match="auto_tile=-1"):
        effective_tile(InferConfig(auto_tile=-1))


def test_blend_window_ramps_and_is_positive():
    win = blend_window(6, 10, 4)
    assert win.shape == (6, 10)
    assert win.min() > 0 and win.max() == 0.625  # rows never reach the plateau: 6 < 2 * overlap
    # linear ramp (i + 0.5) / overlap from each edge, product of rows and columns
    row = torch.tensor([0.125, 0.375, 0.625, 0.625, 0.375, 0.125])
    col = torch.tensor([0.125, 0.375, 0.625, 0.875, 1.0, 1.0, 0.875, 0.625, 0.375, 0.125])
    assert torch.allclose(win, row[:, None] * col[None, :])
    assert blend_window(10, 10, 4).max() == 1
    assert torch.equal(blend_window(3, 4, 0), torch.ones(3, 4))


def test_noise_field_crop_is_a_slice_of_the_full_field():
    field = NoiseField(seed=11, shape=(1, 3, 150, 90))  # 150 rows span three 64-row bands
    full = field.full(7)
    assert full.shape == (1, 3, 150, 90)
    assert abs(full.mean().item()) < 0.05 and abs(full.std().item() - 1) < 0.05
    boxes = [(0, 0, 40, 40), (50, 30, 90, 70), (110, 50, 150, 90)]
    crops = field.crop(7, boxes)
    assert crops.shape == (3, 3, 40, 40)
    for k, (y0, x0, y1, x1) in enumerate(boxes):
        assert torch.equal(crops[k], full[0, :, y0:y1, x0:x1])
    assert torch.equal(NoiseField(11, (1, 3, 150, 90)).full(7), full)  # a pure function of (seed, step)
    assert not torch.equal(field.full(6), full)
    assert not torch.equal(NoiseField(12, (1, 3, 150, 90)).full(7), full)
    with pytest.raises(ValueError, match="outside"):
        field.crop(7, [(0, 0, 151, 10)])


def _conv_sr(scale=4, layers=3):
    """Bicubic x4 + a random 3x3 conv stack: receptive radius 2 LR px (bicubic) + `layers` HR px."""
    torch.manual_seed(0)
    convs = torch.nn.Sequential(*[torch.nn.Conv2d(3, 3, 3, padding=1) for _ in range(layers)])

    def sr(lr):
        up = F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False)
        return up + 0.5 * torch.tanh(convs(up))

    return sr


def test_tiled_equals_whole_image_away_from_seams():
    scale, tile, overlap, layers = 4, 24, 8, 3
    h, w = 40, 56  # 2 x 3 tiles of 24 px at stride 16
    sr = _conv_sr(scale, layers)
    lr = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        whole = sr(lr)
        tiled = tiled_super_resolve(lambda tiles, boxes_hr: sr(tiles), lr, scale, tile, overlap, tile_batch=4)
    H, W = h * scale, w * scale
    assert tiled.shape == whole.shape == (1, 3, H, W)
    # mask, inside each tile, a band of the receptive radius along its inner edges
    # (bicubic reaches 2 LR px = 2 * scale HR px, plus one HR px per 3x3 conv)
    radius = 2 * scale + layers
    seam = torch.zeros(H, W, dtype=torch.bool)
    for y0, x0, y1, x1 in tile_boxes(h, w, tile, overlap):
        Y0, X0, Y1, X1 = y0 * scale, x0 * scale, y1 * scale, x1 * scale
        if Y0 > 0:
            seam[Y0:Y0 + radius, X0:X1] = True
        if Y1 < H:
            seam[Y1 - radius:Y1, X0:X1] = True
        if X0 > 0:
            seam[Y0:Y1, X0:X0 + radius] = True
        if X1 < W:
            seam[Y0:Y1, X1 - radius:X1] = True
    keep = ~seam
    assert keep.float().mean() > 0.5
    # the kept pixels include blended ones: the middle of the first overlaps (LR rows/columns 16..24)
    assert keep[20 * scale, 20 * scale]
    diff = (tiled - whole).abs()[0].amax(0)
    assert diff[keep].max() < 1e-4
    assert diff.max() > 1e-3  # the seams do differ: the mask is not hiding a trivially equal output


class PointwiseFake:
    """A fake SRMethod whose output at a pixel depends only on that pixel's LR, noise and cover."""
    scale = 4

    def super_resolve(self, lr, *, generator=None, noise_fn=None, cover=None, cover_max=None, soft=None):
        up = F.interpolate(lr, scale_factor=self.scale, mode="nearest")
        out = 0.5 * up + 0.1 * noise_fn(100) - 0.05 * noise_fn(1) * noise_fn(2)
        # per-image statistic: must be the whole image's, the same for every tile
        stat = cover.amax((1, 2, 3)) if cover_max is None else cover_max
        return out + 0.01 * cover / stat.reshape(-1, 1, 1, 1) + 0.02 * soft


def test_super_resolve_image_shares_the_noise_field_across_tiles():
    lr = torch.rand(1, 3, 21, 30, generator=torch.Generator().manual_seed(2)) * 2 - 1
    cover = torch.randint(1, 4, (1, 1, 84, 120), generator=torch.Generator().manual_seed(3)).float()
    cover[..., :10, :10] = 6.0  # the image's maximum sits in one corner tile
    soft = torch.rand(1, 1, 84, 120, generator=torch.Generator().manual_seed(4))
    method = PointwiseFake()
    field = NoiseField(5, (1, 3, 84, 120))
    whole = method.super_resolve(lr, noise_fn=field.full, cover=cover, soft=soft)
    cfg = InferConfig(tile=8, overlap=3, tile_batch=2, seed=5)
    stats = {"cover_max": cover.amax().reshape(1)}
    tiled = super_resolve_image(method, lr, cfg, cover=cover, maps={"soft": soft}, stats=stats)
    assert tiled.shape == (1, 3, 84, 120)
    assert torch.allclose(tiled, whole, atol=1e-5)
    other_seed = super_resolve_image(method, lr, cfg, cover=cover, seed=6, maps={"soft": soft}, stats=stats)
    assert (other_seed - whole).abs().max() > 1e-2
    # without the whole-image statistic each tile would use its own maximum
    per_tile = super_resolve_image(method, lr, cfg, cover=cover, maps={"soft": soft})
    assert (per_tile - whole).abs().max() > 1e-4


def test_samdiffsr_tiny_tiled_and_whole():
    torch.manual_seed(0)
    model = SamDiffSR.from_config(config.load("samdiffsr-tiny", ["samdiffsr.timesteps=20"])).eval()
    lr = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(4)) * 2 - 1
    field = NoiseField(9, (1, 3, 48, 48))
    whole = model.super_resolve(lr, noise_fn=field.full)
    one_pass = super_resolve_image(model, lr, InferConfig(tile=0, seed=9))
    assert torch.equal(one_pass, whole)  # tile=0: the same call, the same noise
    tiled = super_resolve_image(model, lr, InferConfig(tile=8, overlap=4, tile_batch=4, seed=9))
    assert tiled.shape == (1, 3, 48, 48)
    assert tiled.min() >= -1 and tiled.max() <= 1
    # Not equal: each step's UNet sees a neighbourhood, so over the trajectory the receptive field
    # covers the tile. With the shared field, tiles still stay far closer to the whole-image sample
    # than another seed's sample is.
    other_seed = model.super_resolve(lr, noise_fn=NoiseField(10, (1, 3, 48, 48)).full)
    tiled_gap, seed_gap = (tiled - whole).abs().mean(), (other_seed - whole).abs().mean()
    assert tiled_gap < 0.2 * seed_gap, (tiled_gap, seed_gap)


def test_upscale_array_runs_sam_once_for_the_student_and_returns_uint8():
    from pipelines.local.photos import bundled_photo
    from samsr import config, images
    from samsr.diffusion.samsr import ResShiftTeacher, SamsrStudent
    from samsr.infer import upscale_array
    from samsr.structure.segmenters import SuperpixelSegmenter

    torch.manual_seed(0)
    teacher = ResShiftTeacher.from_config(config.load("samsr-teacher-tiny"))
    student = SamsrStudent.from_teacher(teacher, config.load("samsr-student-tiny"))
    lr = bundled_photo("coffee")[:20, :24]
    calls = []

    class Counting(SuperpixelSegmenter):
        def segment(self, image):
            calls.append(image.shape)
            return super().segment(image)

    infer = config.InferConfig(tile=8, overlap=2, tile_batch=4)
    sr = upscale_array(student, lr, infer, segmenter=Counting(n_segments=8), seed=0)
    assert calls == [(80, 96, 3)]                            # one SAM pass over the whole y↑, not per tile
    assert sr.dtype == np.uint8 and sr.shape == (80, 96, 3)
    whole = images.to_uint8(images.upscale(images.to_tensor(lr)[None], 4))[0]
    assert float(np.abs(sr.astype(int) - whole.astype(int)).mean()) < 1.0   # untrained: bicubic, tiles blended
    with pytest.raises(ValueError, match="segmenter"):
        upscale_array(student, lr, infer)
    assert upscale_array(teacher, lr, config.InferConfig(), seed=0).shape == (80, 96, 3)   # no SAM needed
