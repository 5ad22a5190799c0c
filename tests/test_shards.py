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


# ----------------------------------------------------------------------------- hostile keys and shards (issue 11)

LONG_KEYS = [
    "photos/2023/summer-vacation/italy/IMG_20230712_123456_HDR_edited_final.png",
    "Fotos/Ürlaub 2023/Çinque Terre – tramonto sul mare (versione finale, modificata) " + "ä ö ü ß " * 40 + ".png",
    "/".join(["a" * 200] * 5) + "/img.png",            # ~1 KB, S3's limit
]


def test_long_and_non_ascii_keys_fit_plain_tar_names_and_keep_short_keys():
    members = {m: b"x" for m in fmt.MEMBERS_HR + fmt.MEMBERS_LRUP}
    keys = [fmt.sample_key(k) for k in LONG_KEYS]
    assert len(set(keys)) == 3 and all(len(k) <= 84 and "." not in k for k in keys)
    # its 74-char stem (101-byte `.lrup.masks.json` name before) is cut to 73, the hash keeps it apart
    assert keys[0] == "photos_2023_summer-vacation_italy_IMG_20230712_123456_HDR_edited_final_pn-" + \
        hashlib.sha256(LONG_KEYS[0].encode()).hexdigest()[:10]
    # a key that fitted before (stem <= 73 chars) is unchanged: stem + '-' + 10 hex of the source key
    short = "b" * 69 + ".png"
    assert fmt.sample_key(short) == "b" * 69 + "_png-" + hashlib.sha256(short.encode()).hexdigest()[:10]
    tar = fmt.tar_bytes([(k, members) for k in keys])          # raised 'name is too long' before
    assert tar == fmt.tar_bytes([(k, members) for k in keys])
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as t:
        names = t.getnames()
    assert max(len(n.encode()) for n in names) <= fmt.USTAR_NAME_BYTES == 100
    assert b"PaxHeader" not in tar                             # plain ustar headers throughout
    assert fmt.read_tar(tar) == {k: members for k in keys}


def test_tar_names_past_100_bytes_get_pax_headers_and_short_ones_stay_ustar(tmp_path):
    long_key = "k" * 150
    tar = fmt.tar_bytes([(long_key, {"hr.png": b"HR", "json": b"{}"}), ("short-1", {"json": b"1"})])
    assert tar == fmt.tar_bytes([(long_key, {"hr.png": b"HR", "json": b"{}"}), ("short-1", {"json": b"1"})])
    assert fmt.read_tar(tar) == {long_key: {"hr.png": b"HR", "json": b"{}"}, "short-1": {"json": b"1"}}
    import webdataset as wds

    (tmp_path / "p.tar").write_bytes(tar)
    assert [g["__key__"] for g in wds.WebDataset(str(tmp_path / "p.tar"), shardshuffle=False)] == [long_key, "short-1"]
    # names that fit: the same bytes as a plain ustar writer, so earlier shards keep their bytes
    samples = [("k2-aa", {"lr.png": b"L", "hr.png": b"HH"}), ("k1-bb", {"json": b"{}"})]
    ustar = io.BytesIO()
    with tarfile.open(fileobj=ustar, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for key, members in samples:
            for name in sorted(members):
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = \
                    len(members[name]), fmt.TAR_MTIME, 0o644, 0, 0, "", ""
                t.addfile(info, io.BytesIO(members[name]))
    assert fmt.tar_bytes(samples) == ustar.getvalue()


def test_read_tar_takes_whole_plain_tars_only_and_names_the_shard():
    import gzip

    tar = fmt.tar_bytes([("k1-aa", {"hr.png": b"H" * 3000, "json": b"{}"}), ("k2-bb", {"json": b"{}"})])
    assert sorted(fmt.read_tar(tar, where="s3://b/shard-00001.tar")) == ["k1-aa", "k2-bb"]
    for bad in (gzip.compress(tar, mtime=0),          # compressed: refused, not inflated
                tar[:1500],                           # cut inside a member
                tar[:512 * 8],                        # cut at a member boundary: no end-of-archive blocks
                b"not a tar at all" * 40):
        with pytest.raises(ValueError, match="s3://b/shard-00001.tar: not a whole plain tar"):
            fmt.read_tar(bad, where="s3://b/shard-00001.tar")
    odd = io.BytesIO()
    with tarfile.open(fileobj=odd, mode="w", format=tarfile.USTAR_FORMAT) as t:
        link = tarfile.TarInfo("k1.hr.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(link)
    with pytest.raises(ValueError, match="not a regular file"):
        fmt.read_tar(odd.getvalue(), where="x.tar")


def _sample(photo, cfg):
    seg = SuperpixelSegmenter(16, 10.0)
    return process_image("s3://b/in/p.png", png(photo), cfg, seg)


def test_decode_members_checks_each_member_against_the_sample(cfg, photo):
    import json
    import tracemalloc

    good = _sample(photo, cfg)
    assert sorted(fmt.decode_members(good, where="shard-00000.tar p")) == sorted(good)
    huge = [{"segmentation": {"size": [100_000, 100_000], "counts": "0"}, "predicted_iou": 0.9,
             "stability_score": 0.9, "bbox": [0, 0, 1, 1], "area": 1}]
    tracemalloc.start()
    try:
        for members in ({**good, "hr.masks.json": json.dumps(huge).encode()},            # HR size from hr.png
                        {"json": good["json"], "lrup.masks.json": json.dumps(huge).encode()},   # from json's hr_size
                        {"hr.masks.json": json.dumps(huge).encode()}):                         # global bound
            with pytest.raises(ValueError, match=r"shard-00000.tar p: \S*masks.json cannot be read: mask record 0: "
                                                 r"RLE size \[100000, 100000\]"):
                fmt.decode_members(members, where="shard-00000.tar p")
        assert tracemalloc.get_traced_memory()[1] < 20 * 2**20          # refused before any allocation
    finally:
        tracemalloc.stop()
    labels = fmt.png_array(good["hr.seg.png"])
    short_spe = fmt.npy_bytes(np.zeros(int(labels.max()), np.float32))   # one value short of the top label
    with pytest.raises(ValueError, match=f"hr.spe.npy holds {int(labels.max())} values but hr.seg.png uses label"):
        fmt.decode_members({k: good[k] for k in ("hr.png", "hr.seg.png")} | {"hr.spe.npy": short_spe}, where="k")
    with pytest.raises(ValueError, match="values for .* masks"):
        fmt.decode_members({"hr.masks.json": good["hr.masks.json"], "hr.spe.npy": fmt.npy_bytes(np.zeros(2, np.float32)),
                            "hr.png": good["hr.png"]})
    with pytest.raises(ValueError, match=r"hr.seg.png is \(4, 4\), not the HR"):
        fmt.decode_members({"hr.png": good["hr.png"], "hr.seg.png": fmt.png_bytes(np.zeros((4, 4), np.uint16), 1)})
    with pytest.raises(ValueError, match="lr.png 5x7 is not the HR"):
        fmt.decode_members({"hr.png": good["hr.png"], "lr.png": fmt.png_bytes(np.zeros((5, 7, 3), np.uint8), 1)})
    # a .npy header that claims 10^12 floats over a few bytes of data: refused from the header
    lying = fmt.npy_bytes(np.zeros(2, np.float32)).replace(b"(2,)", b"(1000000000000,)")
    with pytest.raises(ValueError, match=r"declares float32 .1000000000000,. = 4000000000000 bytes but \d+ follow"):
        fmt.npy_array(lying, where="k.hr.spe.npy")


def test_plan_stores_the_normalized_input_and_counts_new_images(cfg, tmp_path, monkeypatch):
    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("a.png", "b.png"):
        (inp / name).write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    rel = config.replace(cfg, shard=config.replace(cfg.shard, input="./in/"))
    plan = plan_mod.build_plan(rel)
    assert plan.input == str(inp) and plan.shards[0][0].uri == str(inp / "a.png")
    plan_mod.check_rerun(plan, config.replace(cfg, shard=config.replace(cfg.shard, input=str(inp))))
    plan_mod.check_rerun(plan, rel)
    (inp / "c.png").write_bytes(b"x")
    assert plan_mod.new_inputs(plan, plan_mod.list_images("in")) == ["in/c.png"]
    with pytest.raises(ValueError, match="different input"):
        plan_mod.check_rerun(plan, config.replace(cfg, shard=config.replace(cfg.shard, input=str(tmp_path))))
