"""samsr.images: decoding of bad and odd inputs, bicubic down/up, crops that keep map geometry."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from samsr import images
from samsr.images import ImageError


def encode(img: Image.Image | np.ndarray, fmt: str, **kw) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (8-bit RGB) and whose pixel data is one tiny IDAT."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


ASTRONAUT = skimage.data.astronaut()      # (512,512,3) uint8
COFFEE = skimage.data.coffee()            # (400,600,3) uint8


# ---------------------------------------------------------------- bad inputs

def _bad_inputs() -> dict[str, tuple[bytes, str]]:
    jpg = encode(ASTRONAUT[:128, :160], "JPEG", quality=90)
    png = encode(COFFEE[:96, :128], "PNG")
    return {
        "empty": (b"", "empty"),
        "truncated_jpeg": (jpg[: len(jpg) // 2], "truncated"),
        "truncated_png": (png[: len(png) * 2 // 3], "truncated"),
        "text_renamed_png": (b"this is a text file, renamed to photo.png\n" * 5, "corrupt"),
        "png_bad_crc": (png[:40] + bytes([png[40] ^ 0xFF]) + png[41:], "corrupt"),
        "bomb_pil_limit": (png_header_only(100_000, 100_000), "too_large"),      # 1e10 px
        "bomb_our_limit": (png_header_only(12_000, 12_000), "too_large"),        # 1.44e8 > 1.2e8
        "too_small": (encode(COFFEE[:28, :200], "PNG"), "too_small"),            # LR 7 px high
        "ico": (encode(COFFEE[:32, :32], "ICO"), "unsupported"),
    }


@pytest.mark.parametrize("case", sorted(_bad_inputs()))
def test_bad_inputs_raise_with_reason(case):
    data, reason = _bad_inputs()[case]
    with pytest.raises(ImageError) as info:
        images.decode_image(data, name=f"{case}.png")
    assert info.value.reason == reason
    assert str(info.value).startswith(reason) and f"{case}.png" in str(info.value)


def test_too_large_message_names_size_and_limit():
    with pytest.raises(ImageError, match=r"12000x12000 = 144000000 px, over the limit of 120000000"):
        images.decode_image(png_header_only(12_000, 12_000))
    # 9500² = 90.25M px is over PIL's warning level (89.5M) but under ours: the size check passes and
    # the (pixel-less) file then fails as truncated, not as too_large
    with pytest.raises(ImageError) as info:
        images.decode_image(png_header_only(9_500, 9_500))
    assert info.value.reason == "truncated"
    ok = images.decode_image(encode(COFFEE[:64, :64], "PNG"), max_pixels=64 * 64)
    assert ok.shape == (64, 64, 3)
    with pytest.raises(ImageError) as info:
        images.decode_image(encode(COFFEE[:64, :64], "PNG"), max_pixels=64 * 64 - 1)
    assert info.value.reason == "too_large"


def test_image_size_reads_the_header_alone():
    assert images.image_size(encode(COFFEE[:30, :50], "PNG")) == (50, 30)
    assert images.image_size(encode(COFFEE[:30, :50], "JPEG")) == (50, 30)
    # the header claims 12000x12000 and there are no pixels: the size is known without a decode
    assert images.image_size(png_header_only(12_000, 12_000), name="big.png") == (12_000, 12_000)
    cases = [(b"", "empty"), (b"not an image" * 10, "corrupt"), (png_header_only(100_000, 100_000), "too_large"),
             (encode(COFFEE[:32, :32], "ICO"), "unsupported")]
    for data, reason in cases:
        with pytest.raises(ImageError) as info:
            images.image_size(data, name="x.png")
        assert info.value.reason == reason and "x.png" in str(info.value)


def test_too_small_depends_on_scale_and_min_side():
    data = encode(COFFEE[:32, :40], "PNG")
    assert images.decode_image(data, scale=4, min_lr_side=8).shape == (32, 40, 3)   # LR 8x10
    with pytest.raises(ImageError, match="is 40x32; its x4 LR would be 10x8, under the minimum side of 9 px"):
        images.decode_image(data, scale=4, min_lr_side=9)


# ---------------------------------------------------------------- odd but valid inputs

def test_rgb_png_roundtrip_exact_and_odd_size():
    img = ASTRONAUT[:37, :53]
    out = images.decode_image(encode(img, "PNG"), scale=4)
    assert out.dtype == np.uint8 and out.shape == (37, 53, 3)
    np.testing.assert_array_equal(out, img)
    assert images.crop_to_multiple(out, 4).shape == (36, 52, 3)
    np.testing.assert_array_equal(images.crop_to_multiple(out, 4), img[:36, :52])


def test_grayscale_and_bilevel_become_gray_rgb():
    gray = skimage.data.camera()[:64, :48]
    out = images.decode_image(encode(gray, "PNG"))
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=2))
    mask = gray > np.median(gray)
    bits = Image.fromarray(mask).convert("1")
    out = images.decode_image(encode(bits, "PNG"))
    assert set(np.unique(out)) == {0, 255}
    np.testing.assert_array_equal(out[..., 1] == 255, mask)


def test_16bit_gray_png_is_scaled_not_clipped():
    a = np.zeros((40, 40), np.uint16)
    a[:, :10], a[:, 10:20], a[:, 20:30], a[:, 30:] = 65535, 30000, 257, 128
    out = images.decode_image(encode(Image.fromarray(a), "PNG"))
    # 65535 -> 255, 30000*255/65535 = 116.73 -> 117, 257 -> 1, 128 -> 0.498 -> 0
    np.testing.assert_array_equal(out[0, [0, 10, 20, 30]], [[255] * 3, [117] * 3, [1] * 3, [0] * 3])


def test_rgba_is_composited_over_white():
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[:, :8, 3], rgba[:, 8:16, 3], rgba[:, 16:, 3] = 255, 128, 0
    out = images.decode_image(encode(rgba, "PNG"))
    np.testing.assert_array_equal(out[0, 0], [200, 100, 50])
    # c·a/255 + 255·(1 − a/255) at a = 128: 227.39, 177.20, 152.10
    np.testing.assert_array_equal(out[0, 8], [227, 177, 152])
    np.testing.assert_array_equal(out[0, 20], [255, 255, 255])
    la = Image.merge("LA", [Image.fromarray(np.ascontiguousarray(rgba[..., 0])),
                            Image.fromarray(np.ascontiguousarray(rgba[..., 3]))])
    out = images.decode_image(encode(la, "PNG"))
    np.testing.assert_array_equal(out[0, [0, 8, 20]], [[200] * 3, [227] * 3, [255] * 3])


def test_palette_with_and_without_transparency():
    idx = np.zeros((32, 32), np.uint8)
    idx[:, 16:] = 1
    pal = Image.frombytes("P", (32, 32), idx.tobytes())
    pal.putpalette([10, 20, 30, 240, 120, 0] + [0] * 762)
    out = images.decode_image(encode(pal, "PNG"))
    np.testing.assert_array_equal(out[0, [0, 20]], [[10, 20, 30], [240, 120, 0]])
    out = images.decode_image(encode(pal, "PNG", transparency=1))
    np.testing.assert_array_equal(out[0, [0, 20]], [[10, 20, 30], [255, 255, 255]])
    gif = images.decode_image(encode(pal, "GIF"))
    np.testing.assert_array_equal(gif[0, [0, 20]], [[10, 20, 30], [240, 120, 0]])


def test_cmyk_jpeg_decodes_to_rgb():
    rgb = COFFEE[100:164, 200:296]
    data = encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = images.decode_image(data)
    assert out.shape == rgb.shape
    err = np.abs(out.astype(int) - rgb.astype(int)).mean()
    assert err < 4.0, err          # JPEG loss only


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_is_applied(fmt, orientation):
    img = np.full((40, 64, 3), 128, np.uint8)        # stored H=40, W=64
    img[:8, :8] = (255, 0, 0)                        # red block at the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = images.decode_image(encode(img, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {})))
    assert out.shape == (64, 40, 3)
    # 6 = rotate 90° clockwise for display: stored top-left -> top-right; 8 = counter-clockwise -> bottom-left
    corner = out[2, -3] if orientation == 6 else out[-3, 2]
    assert corner[0] > 200 and corner[1] < 60 and corner[2] < 60, corner
    assert np.abs(out[32, 20].astype(int) - 128).max() < 6


# ---------------------------------------------------------------- tensors and bicubic

def test_to_tensor_to_uint8_exact_roundtrip():
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    t = images.to_tensor(ramp)
    assert t.shape == (3, 16, 16) and t.dtype == torch.float32
    assert t.min().item() == -1.0 and t.max().item() == 1.0
    assert abs(t[0, 8, 0].item() - (128 / 127.5 - 1)) < 1e-7
    np.testing.assert_array_equal(images.to_uint8(t), ramp)
    np.testing.assert_array_equal(images.to_uint8(torch.stack([t, -t]))[1], 255 - ramp)
    np.testing.assert_array_equal(images.to_uint8(torch.full((3, 2, 2), 7.0)), np.full((2, 2, 3), 255, np.uint8))


def test_down_up_shapes_and_constant():
    x = torch.full((2, 3, 32, 48), 0.3)
    y = images.downscale(x, 4)
    assert y.shape == (2, 3, 8, 12)
    assert torch.allclose(y, torch.full_like(y, 0.3), atol=1e-6)
    up = images.upscale(y, 4)
    assert up.shape == (2, 3, 32, 48)
    assert torch.allclose(up, torch.full_like(up, 0.3), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    z = images.upscale(torch.rand(1, 3, 8, 8, generator=g) * 2 - 1, 4)
    assert z.min() >= -1 and z.max() <= 1            # clamped despite bicubic overshoot
    with pytest.raises(ValueError, match="not a multiple of scale 4"):
        images.downscale(torch.zeros(1, 3, 30, 32), 4)


def test_downscale_reproduces_a_linear_ramp():
    # bicubic weights are symmetric and sum to 1, so a ramp f(col) = a + b·col is reproduced at the
    # LR pixel centres, col = 4(k + 0.5) − 0.5 = 4k + 1.5, away from the border
    cols = torch.arange(64, dtype=torch.float32)
    x = (-0.9 + 0.02 * cols).expand(1, 3, 16, 64)
    y = images.downscale(x, 4)
    expected = -0.9 + 0.02 * (4 * torch.arange(16) + 1.5)
    torch.testing.assert_close(y[0, 0, 2, 2:14], expected[2:14], atol=1e-5, rtol=0)


def test_make_lr_matches_pil_bicubic():
    hr = ASTRONAUT[100:356, 150:406]                     # 256x256 crop of a real photo
    lr = images.make_lr(hr, 4)
    assert lr.shape == (64, 64, 3) and lr.dtype == np.uint8
    pil = np.asarray(Image.fromarray(hr).resize((64, 64), Image.BICUBIC, reducing_gap=None))
    diff = np.abs(lr.astype(int) - pil.astype(int))
    assert diff.mean() < 0.5 and diff.max() <= 3, (diff.mean(), diff.max())


# ---------------------------------------------------------------- crops

def _coords(h: int, w: int) -> np.ndarray:
    """Map whose value is the HR pixel's flat index: a function of HR coordinates."""
    return np.arange(h * w, dtype=np.int64).reshape(h, w)


def _setup():
    hr = images.crop_to_multiple(COFFEE[:203, :301], 4)      # (200,300,3)
    return hr, images.make_lr(hr, 4), {"coord": _coords(*hr.shape[:2]),
                                       "cover": (_coords(*hr.shape[:2]) % 251).astype(np.uint8)[..., None]}


def _check_crop(hr, lr, maps, hr_c, lr_c, maps_c, size, scale):
    h, w = hr.shape[:2]
    rows, cols = np.divmod(maps_c["coord"], w)
    # every cropped pixel is the HR pixel the map says it came from, and the map is its HR coordinate
    np.testing.assert_array_equal(hr_c, hr[rows, cols])
    np.testing.assert_array_equal(maps_c["cover"][..., 0], maps["cover"][rows, cols, 0])
    # the window is a size x size block whose corner lies on the LR grid
    assert hr_c.shape == (size, size, 3) and lr_c.shape == (size // scale, size // scale, 3)
    assert rows.max() - rows.min() == size - 1 and cols.max() - cols.min() == size - 1
    assert rows.min() % scale == 0 and cols.min() % scale == 0
    # the LR crop is the LR of the HR crop (same flips), up to border effects of the bicubic kernel
    ref = images.make_lr(hr_c, scale)
    assert np.abs(lr_c[2:-2, 2:-2].astype(int) - ref[2:-2, 2:-2].astype(int)).max() <= 1


def test_aligned_crop_keeps_maps_on_the_hr_geometry():
    hr, lr, maps = _setup()
    seen = set()
    for seed in range(24):
        hr_c, lr_c, maps_c = images.aligned_crop(hr, lr, maps, 64, 4, np.random.default_rng(seed))
        _check_crop(hr, lr, maps, hr_c, lr_c, maps_c, 64, 4)
        r, c = np.divmod(maps_c["coord"], hr.shape[1])
        seen.add((bool(r[0, 0] > r[-1, -1]), bool(c[0, 0] > c[-1, -1]), bool(r[0, 1] != r[0, 0])))
    assert len(seen) == 8                              # all dihedral choices occur


def test_aligned_crop_is_deterministic_and_flips_optional():
    hr, lr, maps = _setup()
    a = images.aligned_crop(hr, lr, maps, 64, 4, np.random.default_rng(7))
    b = images.aligned_crop(hr, lr, maps, 64, 4, np.random.default_rng(7))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[2]["coord"], b[2]["coord"])
    hr_c, _, maps_c = images.aligned_crop(hr, lr, maps, 64, 4, np.random.default_rng(3), flips=False)
    top = maps_c["coord"][0, 0]
    np.testing.assert_array_equal(maps_c["coord"], top + _coords(64, hr.shape[1])[:, :64])


def test_center_crop_and_the_public_code_bug():
    hr, lr, maps = _setup()
    hr_c, lr_c, maps_c = images.center_crop_aligned(hr, lr, maps, 64, 4)
    _check_crop(hr, lr, maps, hr_c, lr_c, maps_c, 64, 4)
    i, j = (50 - 16) // 2, (75 - 16) // 2                       # LR top-left of the centred window
    assert maps_c["coord"][0, 0] == (i * 4) * 300 + j * 4        # HR top-left is (4i, 4j)
    # the public code slices the HR-sized map with the LR coordinates: a different, wrong window
    buggy = maps["coord"][i:i + 64, j:j + 64]
    assert not np.array_equal(buggy, maps_c["coord"])
    r, c = np.divmod(buggy, 300)
    assert not np.array_equal(hr[r, c], hr_c)                    # it no longer describes the HR crop


def test_crop_rejects_bad_geometry():
    hr, lr, maps = _setup()
    with pytest.raises(ImageError) as info:
        images.aligned_crop(hr, lr, maps, 256, 4, np.random.default_rng(0))
    assert info.value.reason == "too_small"
    with pytest.raises(ValueError, match="not the HR geometry"):
        images.aligned_crop(hr, lr, {"m": maps["coord"][::4, ::4]}, 64, 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="not a multiple of scale"):
        images.center_crop_aligned(hr, lr, maps, 62, 4)
