"""Segmenters (samsr.structure.segmenters): the tiny random SAM through SAM's real automatic mask
generator, checkpoint loading, errors, and the superpixel fallback."""
from __future__ import annotations

import hashlib
import importlib.util
import json

import numpy as np
import pytest
import torch
from skimage import data, transform

from samsr.config import SegmenterConfig
from samsr.storage import StorageError
from samsr.structure.masks import coverage, label_map, records_to_json, rle_decode, rle_encode
from samsr.structure.segmenters import (SamSegmenter, SegmenterError, SuperpixelSegmenter,
                                        TinySamSegmenter, build_segmenter, build_tiny_sam, generator_settings,
                                        resolve_device, state_dict_sha256)


# the tiny presets' permissive settings (samsr/configs/*-tiny.yaml)
TINY = dict(points_per_side=8, points_per_batch=64, pred_iou_thresh=-1.0, stability_score_thresh=0.0,
            box_nms_thresh=0.99)


def _photo(shape: tuple[int, int]) -> np.ndarray:
    return (transform.resize(data.astronaut(), shape, anti_aliasing=True) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return _photo((256, 256))


@pytest.fixture(scope="module")
def tiny() -> TinySamSegmenter:
    return TinySamSegmenter(seed=0, image_size=256, settings=TINY, device="cpu")


@pytest.fixture(scope="module")
def tiny_records(tiny, photo):
    return tiny.segment(photo)


def _same_records(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.segmentation, y.segmentation)
        assert (x.predicted_iou, x.stability_score, x.bbox, x.area) == \
            (y.predicted_iou, y.stability_score, y.bbox, y.area)


def test_tiny_sam_is_tiny_and_seeded_without_touching_global_rng():
    state = torch.random.get_rng_state()
    a, b, c = build_tiny_sam(0), build_tiny_sam(0), build_tiny_sam(1)
    assert torch.equal(state, torch.random.get_rng_state())
    assert 100_000 < sum(p.numel() for p in a.parameters()) < 400_000
    assert state_dict_sha256(a) == state_dict_sha256(b) != state_dict_sha256(c)


def test_tiny_sam_masks_on_a_photo(tiny, tiny_records, photo):
    assert len(tiny_records) > 0, "the tiny SAM produced no masks: the generator path is not exercised"
    for r in tiny_records:
        assert r.segmentation.shape == photo.shape[:2] and r.segmentation.dtype == bool
        assert r.area == int(r.segmentation.sum()) > 0
        assert all(isinstance(v, int) for v in r.bbox) and isinstance(r.area, int)
        assert isinstance(r.predicted_iou, float) and isinstance(r.stability_score, float)
        np.testing.assert_array_equal(rle_decode(rle_encode(r.segmentation)), r.segmentation)
    ious = [r.predicted_iou for r in tiny_records]
    assert ious == sorted(ious, reverse=True)
    masks = [r.segmentation for r in tiny_records]
    assert np.unique(label_map(masks)).size > 1
    assert coverage(masks, photo.shape[:2]).min() >= 1
    json.dumps(records_to_json(tiny_records))


def test_tiny_sam_provenance(tiny):
    prov = json.loads(json.dumps(tiny.provenance()))
    assert tiny.id == "tiny-sam-random-seed0" and tiny.is_sam
    assert prov["segmenter"] == tiny.id and prov["random_weights"] is True and prov["checkpoint"] == "random-init"
    assert prov["checkpoint_sha256"] == state_dict_sha256(build_tiny_sam(0))
    assert prov["generator"]["points_per_side"] == 8 and prov["generator"]["pred_iou_thresh"] == -1.0
    assert prov["generator"]["output_mode"] == "binary_mask"
    assert prov["generator"]["stability_score_offset"] == SegmenterConfig().stability_score_offset   # default kept


def test_tiny_sam_is_deterministic(tiny_records, photo):
    again = TinySamSegmenter(seed=0, image_size=256, settings=TINY, device="cpu").segment(photo)
    _same_records(tiny_records, again)


def test_tiny_sam_any_image_size(tiny):
    image = _photo((120, 200))   # SAM's ResizeLongestSide + padding, masks back at the input size
    records = tiny.segment(image)
    assert records and all(r.segmentation.shape == (120, 200) for r in records)


def test_checkpoint_round_trip(tmp_path, tiny, tiny_records, photo):
    path = tmp_path / "tiny-seed0.pth"
    torch.save(build_tiny_sam(0).state_dict(), path)
    seg = SamSegmenter.from_checkpoint(str(path), model_type="tiny", settings=TINY, device="cpu",
                                       builder=lambda: build_tiny_sam(7))   # other weights until loaded
    assert seg.provenance()["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert seg.provenance()["checkpoint"] == str(path) and seg.id == "sam-tiny" and seg.is_sam
    assert state_dict_sha256(seg.model) == state_dict_sha256(tiny.model) != state_dict_sha256(build_tiny_sam(7))
    _same_records(tiny_records, seg.segment(photo))


def test_missing_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "sam_vit_b.pth"
    with pytest.raises(StorageError, match="nowhere"):
        SamSegmenter.from_checkpoint(str(missing), model_type="vit_b", builder=lambda: build_tiny_sam(0))


def test_no_checkpoint_is_an_error_not_a_fallback():
    with pytest.raises(SegmenterError, match="--segmenter superpixel"):
        build_segmenter(SegmenterConfig(kind="sam", checkpoint=""))


def test_unknown_model_type_lists_valid_ones():
    with pytest.raises(SegmenterError, match="vit_h, vit_l, vit_b"):
        SamSegmenter.from_checkpoint("sam.pth", model_type="vit_x")


def test_checkpoint_of_another_model_is_rejected(tmp_path):
    path = tmp_path / "tiny-256.pth"
    torch.save(build_tiny_sam(0, image_size=256).state_dict(), path)
    with pytest.raises(SegmenterError, match="does not fit"):
        SamSegmenter.from_checkpoint(str(path), model_type="tiny", builder=lambda: build_tiny_sam(0, image_size=128))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"hook": print}, path)
    with pytest.raises(SegmenterError, match="weights-only"):
        SamSegmenter.from_checkpoint(str(path), builder=lambda: build_tiny_sam(0))


def test_superpixel_fallback(photo):
    seg = build_segmenter(SegmenterConfig(kind="superpixel", superpixel_segments=16))
    assert isinstance(seg, SuperpixelSegmenter) and not seg.is_sam and "fallback" in seg.id
    prov = json.loads(json.dumps(seg.provenance()))
    assert prov["fallback"] == "superpixels, not SAM" and prov["checkpoint_sha256"] is None
    records = seg.segment(photo)
    assert len(records) > 4
    assert all(r.predicted_iou is None and r.stability_score is None for r in records)
    areas = [r.area for r in records]
    assert areas == sorted(areas, reverse=True)
    masks = [r.segmentation for r in records]
    np.testing.assert_array_equal(coverage(masks, photo.shape[:2]), 1)   # a partition: C ≡ 1
    assert label_map(masks).min() >= 1
    _same_records(records, seg.segment(photo))


def test_build_segmenter_tiny_from_config():
    cfg = SegmenterConfig(kind="tiny-sam", tiny_seed=3, tiny_image_size=128, device="cpu", points_per_side=4)
    seg = build_segmenter(cfg)
    assert isinstance(seg, TinySamSegmenter) and seg.id == "tiny-sam-random-seed3"
    assert seg.provenance()["generator"]["points_per_side"] == 4


def test_bad_inputs():
    with pytest.raises(SegmenterError, match="uint8"):
        SuperpixelSegmenter().segment(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(SegmenterError, match="not a device"):
        resolve_device("gpu7")
    with pytest.raises(SegmenterError, match="multiple of 64"):
        build_tiny_sam(0, image_size=100)
    with pytest.raises(SegmenterError, match="kind"):
        build_segmenter(SegmenterConfig(kind="watershed"))
    with pytest.raises(SegmenterError, match="points_per_side"):
        generator_settings(points_per_sid=8)
    if importlib.util.find_spec("cv2") is None:   # opencv is not a dependency
        with pytest.raises(SegmenterError, match="OpenCV"):
            TinySamSegmenter(0, settings={"min_mask_region_area": 10}, device="cpu")


def test_cli_tiny_sam_gets_the_tiny_presets_settings_and_finds_masks(photo):
    from pipelines import cli
    from samsr import config

    args = cli.build_parser().parse_args(["shard", "--input", "in", "--output", "out", "--segmenter", "tiny-sam"])
    got = config.load(args.config, cli.shard_overrides(args)).segmenter      # on the paper preset (samdiffsr)
    preset = config.load("samdiffsr-tiny").segmenter
    assert config.to_dict(got) == config.to_dict(config.replace(preset, device=got.device))
    assert got.pred_iou_thresh == -1.0 and got.stability_score_thresh == 0.0
    strict = config.replace(got, **{k: getattr(SegmenterConfig(), k) for k in ("pred_iou_thresh",
                                                                               "stability_score_thresh",
                                                                               "box_nms_thresh")})
    assert build_segmenter(config.replace(strict, device="cpu")).segment(photo) == []   # SAM's defaults: none
    assert len(build_segmenter(config.replace(got, device="cpu")).segment(photo)) > 0
    # an explicit --set still wins over what the flag brings
    args = cli.build_parser().parse_args(["shard", "--input", "in", "--segmenter", "tiny-sam",
                                          "--set", "segmenter.points_per_side=4"])
    assert config.load(args.config, cli.shard_overrides(args)).segmenter.points_per_side == 4
