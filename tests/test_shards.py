"""samsr.shards: sample keys, member bytes, deterministic tars, plans and the per-image work (no Ray)."""
from __future__ import annotations

import hashlib
import io
import tarfile

import numpy as np
import pytest
import skimage.data
from PIL import Image

from samsr import config
from samsr.data import prepare_sample
from samsr.shards import format as fmt
from samsr.shards import plan as plan_mod
from samsr.shards import preview
from samsr.shards.process import Failure, process_image
from samsr.structure.segmenters import SuperpixelSegmenter


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def cfg():
    return config.load("samdiffsr", ["segmenter.kind=superpixel", "segmenter.superpixel_segments=16",
                                     "shard.input=s3://b/in", "shard.output=s3://b/out", "shard.samples_per_shard=2"])


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return skimage.data.astronaut()[100:190, 150:253]     # 90 x 103, not a multiple of 4


def test_sample_key_is_sanitised_stable_and_hashed():
    assert fmt.sample_key("dir/a b.png") == "dir_a_b_png-c6eb31693a"
    assert fmt.sample_key("ünï.png") == "n_png-e4df94c364"
    # same sanitised stem, different sources -> different keys
    assert fmt.sample_key("a.b/c.png") != fmt.sample_key("a_b/c.png")
    assert "." not in fmt.sample_key("x.y.z/w.tar.png")


def test_png_and_npy_roundtrip_keep_dtype_and_values():
    labels = np.array([[0, 1, 300], [65535, 2, 7]], dtype=np.uint16)
    assert np.array_equal(fmt.png_array(fmt.png_bytes(labels, 1)), labels)
    assert fmt.png_array(fmt.png_bytes(labels, 1)).dtype == np.uint16
    cover = np.array([[1, 2], [255, 3]], dtype=np.uint8)
    assert np.array_equal(fmt.png_array(fmt.png_bytes(cover, 1)), cover)
    vals = np.array([0.0, 0.25, -1.5], dtype=np.float32)
    assert fmt.npy_array(fmt.npy_bytes(vals)).tolist() == [0.0, 0.25, -1.5]
    with pytest.raises(ValueError, match="uint16"):
        fmt.png_bytes(np.zeros((2, 2), np.float32), 1)


def test_tar_is_deterministic_sorted_and_readable_by_webdataset(tmp_path):
    samples = [("k2-aa", {"lr.png": b"L", "hr.png": b"HH", "json": b"{}"}), ("k1-bb", {"json": b"{\"a\":1}"})]
    one, two = fmt.tar_bytes(samples), fmt.tar_bytes(samples)
    assert one == two
    with tarfile.open(fileobj=io.BytesIO(one)) as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == ["k2-aa.hr.png", "k2-aa.json", "k2-aa.lr.png", "k1-bb.json"]   # plan order
    assert {(i.mtime, i.uid, i.gid, i.uname, i.gname) for i in infos} == {(946684800, 0, 0, "", "")}
    assert fmt.read_tar(one) == {"k2-aa": {"hr.png": b"HH", "json": b"{}", "lr.png": b"L"}, "k1-bb": {"json": b"{\"a\":1}"}}
    import webdataset as wds

    (tmp_path / "s.tar").write_bytes(one)
    got = list(wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False))
    assert [(g["__key__"], g.get("hr.png")) for g in got] == [("k2-aa", b"HH"), ("k1-bb", None)]
    with pytest.raises(ValueError, match="repeated"):
        fmt.tar_bytes([("a", {"json": b""}), ("a", {"json": b""})])


def test_process_image_members_match_samsr_directly(cfg, photo):
    seg = SuperpixelSegmenter(16, 10.0)
    data = png(photo)
    out = process_image("s3://b/in/p.png", data, cfg, seg)
    assert sorted(out) == sorted(fmt.MEMBERS_HR + fmt.MEMBERS_LRUP)
    d = fmt.decode_members(out)
    ref = prepare_sample("k", photo, 4, seg)          # the library's own per-image path
    assert d["hr.png"].shape == (88, 100, 3) and d["lr.png"].shape == (22, 25, 3)
    assert np.array_equal(d["hr.png"], photo[:88, :100])
    assert np.array_equal(d["lr.png"], ref.lr)
    assert np.array_equal(d["hr.seg.png"], ref.spe_labels)
    assert np.array_equal(d["hr.spe.npy"], ref.spe_values)
    assert np.array_equal(d["lrup.cover.png"], ref.cover)
    assert d["hr.spe.npy"][0] == 0.0 and d["hr.seg.png"].max() == len(d["hr.masks.json"])
    meta = d["json"]
    assert meta["source_sha256"] == hashlib.sha256(data).hexdigest()
    assert meta["crop_box"] == [0, 0, 100, 88] and meta["decoded_size"] == [103, 90]
    assert meta["segmenter"]["fallback"] == "superpixels, not SAM"
    assert not any("time" in k or k.startswith("t_") for k in meta)        # reproducible: no timings
    assert process_image("s3://b/in/p.png", data, cfg, seg) == out           # same bytes twice


def test_process_image_reports_bad_inputs_and_lrup_switch(cfg, photo):
    seg = SuperpixelSegmenter(16, 10.0)
    assert process_image("x.png", b"", cfg, seg) == Failure("empty", "empty: x.png has 0 bytes")
    bad = process_image("x.png", b"not an image", cfg, seg)
    assert isinstance(bad, Failure) and bad.reason == "corrupt"
    no_lrup = config.replace(cfg, shard=config.replace(cfg.shard, lrup_masks=False))
    out = process_image("x.png", png(photo), no_lrup, seg)
    assert sorted(out) == sorted(fmt.MEMBERS_HR)


def test_plan_orders_cuts_limits_and_rejects_unsafe_keys(cfg):
    uris = ["s3://b/in/c.png", "s3://b/in/a.png", "s3://b/in/sub/b.jpg", "s3://b/in/../evil.png", "s3://b/in/d.png"]
    plan = plan_mod.build_plan(cfg, uris)
    got = [[e.uri.rsplit("/in/", 1)[1] for e in s] for s in plan.shards]
    assert got == [["a.png", "c.png"], ["d.png", "sub/b.jpg"]]
    assert plan.shards[0][0].key == fmt.sample_key("a.png")
    assert [r["reason"] for r in plan.rejected] == ["unsafe_key"]
    again = plan_mod.plan_from_json(plan_mod.plan_to_json(plan))
    assert again == plan
    limited = plan_mod.build_plan(config.replace(cfg, shard=config.replace(cfg.shard, limit=3)), uris)
    assert limited.num_images == 2 and len(limited.rejected) == 1      # the first 3 of the sorted listing
    plan_mod.check_rerun(plan, cfg)
    other = config.replace(cfg, shard=config.replace(cfg.shard, samples_per_shard=3))
    with pytest.raises(ValueError, match="samples_per_shard"):
        plan_mod.check_rerun(plan, other)
    assert plan_mod.shard_name(12) == "shard-00012"


def test_preview_tints_covered_pixels_with_fixed_colours():
    hr = np.full((4, 4, 3), 101, np.uint8)
    labels = np.zeros((4, 4), np.uint16)
    labels[0, 0] = 1
    thumb = preview.overlay_thumbnail(hr, labels, max_side=4)
    # colour of label 1 = (97+40, 57+120, (151+200) % 256) = (137, 177, 95); half blended with 101
    assert thumb[0, 0].tolist() == [119, 139, 98] and thumb[1, 1].tolist() == [101, 101, 101]
    sheet = Image.open(io.BytesIO(preview.contact_sheet([thumb, thumb, thumb], cell=4, cols=2)))
    assert sheet.size == (2 * 6 + 2, 2 * 6 + 2) and sheet.format == "JPEG"
