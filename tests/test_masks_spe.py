"""Mask storage/ordering (samsr.structure.masks) and SAM-DiffSR's SPE (samsr.structure.spe, METHOD.md §A)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from samsr.structure.masks import (MaskRecord, coverage, label_map, order_records, record_from_mask,
                                   records_from_json, records_to_json, rle_decode, rle_encode)
from samsr.structure.spe import encode, rotary_position_map, spe_map


# ----------------------------------------------------------------------------- SPE, §A

def rotary_by_hand(height: int, width: int) -> list[list[float]]:
    """Rotary embedding of all-ones, written out: pair (2i, 2i+1) rotated by h·10000^(−2i/W)."""
    rows = []
    for h in range(height):
        row = [1.0] * width
        for i in range(width // 2):
            angle = h * 10000.0 ** (-2.0 * i / width)
            x1, x2 = 1.0, 1.0
            row[2 * i] = x1 * math.cos(angle) - x2 * math.sin(angle)
            row[2 * i + 1] = x1 * math.sin(angle) + x2 * math.cos(angle)
        rows.append(row)
    return rows


@pytest.mark.parametrize("height,width", [(6, 8), (5, 7), (1, 1), (3, 2)])
def test_rotary_map_matches_formula(height, width):
    p = rotary_position_map(height, width)
    assert p.shape == (height, width) and p.dtype == np.float64
    np.testing.assert_allclose(p, np.array(rotary_by_hand(height, width)), rtol=0, atol=1e-12)


def test_rotary_fixed_numbers():
    p = rotary_position_map(6, 8)
    assert p[3, 0] == pytest.approx(-1.1311125046603125, abs=1e-12)   # cos 3 − sin 3
    assert p[3, 1] == pytest.approx(-0.8488724885405782, abs=1e-12)   # cos 3 + sin 3
    assert p[3, 2] == pytest.approx(0.6598162824642664, abs=1e-12)    # θ_1 = 0.1: cos .3 − sin .3
    assert np.all(p[0] == 1.0)                                         # h = 0: no rotation
    odd = rotary_position_map(5, 7)
    assert np.all(odd[:, 6] == 1.0)                                    # odd W: last column unpaired


def test_encode_value_of_one_mask():
    mask = np.zeros((6, 8), bool)
    mask[1:4, 2:6] = True
    labels, values = encode([mask], [0.9])
    p = rotary_by_hand(6, 8)
    by_hand = sum(p[h][c] for h in range(1, 4) for c in range(2, 6)) / 48
    assert values.dtype == np.float32 and values.shape == (2,)
    assert values[0] == 0.0
    assert values[1] == pytest.approx(by_hand, abs=1e-7)
    assert values[1] == pytest.approx(0.24707113637821265, abs=1e-7)
    assert labels.dtype == np.uint16
    np.testing.assert_array_equal(labels, mask.astype(np.uint16))


def test_encode_lower_iou_overwrites_and_sorts_by_iou():
    h, w = 5, 7
    big = np.zeros((h, w), bool)
    big[:, :5] = True
    small = np.zeros((h, w), bool)
    small[1:3, 1:3] = True
    p = rotary_by_hand(h, w)
    v_big = sum(p[r][c] for r in range(h) for c in range(w) if big[r, c]) / (h * w)
    v_small = sum(p[r][c] for r in range(h) for c in range(w) if small[r, c]) / (h * w)
    # input order deliberately low-IoU first: encode must sort by IoU, highest first
    labels, values = encode([small, big], [0.5, 0.95])
    np.testing.assert_allclose(values, [0.0, v_big, v_small], atol=1e-7)
    e = spe_map(labels, values)
    assert e.dtype == np.float32 and e.shape == (h, w)
    assert e[1, 1] == pytest.approx(v_small, abs=1e-7)   # small (lower IoU) drawn over big
    assert e[4, 4] == pytest.approx(v_big, abs=1e-7)
    assert e[0, 6] == 0.0                                # uncovered
    expected = np.zeros((h, w), np.uint16)
    expected[:, :5] = 1
    expected[1:3, 1:3] = 2
    np.testing.assert_array_equal(labels, expected)


def test_encode_ties_keep_input_order():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[1:3] = True
    labels, _ = encode([a, b], [0.7, 0.7])   # stable: b stays second and overwrites row 1
    np.testing.assert_array_equal(labels[:, 0], [1, 2, 2, 0])
    labels, _ = encode([b, a], [0.7, 0.7])
    np.testing.assert_array_equal(labels[:, 0], [2, 2, 1, 0])


def test_encode_without_masks_needs_shape():
    labels, values = encode([], [], shape=(3, 4))
    assert labels.shape == (3, 4) and not labels.any()
    np.testing.assert_array_equal(values, [0.0])
    with pytest.raises(ValueError, match="shape"):
        encode([], [])
    with pytest.raises(ValueError, match="predicted_iou"):
        encode([np.ones((2, 2), bool)], [0.5, 0.4])


def test_spe_map_rejects_missing_values():
    with pytest.raises(ValueError, match="label 2"):
        spe_map(np.array([[0, 2]], np.uint16), np.array([0.0, 1.0], np.float32))


# ----------------------------------------------------------------------------- RLE and records

def test_rle_round_trip_random_empty_full():
    rng = np.random.default_rng(1234)
    cases = [rng.random((17, 23)) < 0.3 for _ in range(5)]
    cases += [np.zeros((9, 11), bool), np.ones((9, 11), bool), rng.random((1, 40)) < 0.5]
    for mask in cases:
        rle = rle_encode(mask)
        assert isinstance(rle["counts"], str) and rle["size"] == list(mask.shape)
        json.dumps(rle)
        back = rle_decode(json.loads(json.dumps(rle)))
        assert back.dtype == bool
        np.testing.assert_array_equal(back, mask)


def test_rle_matches_hand_counts():
    # [[0,1],[1,1]] column-major is 0,1,1,1: runs (1 zero, 3 ones)
    mask = np.array([[0, 1], [1, 1]], bool)
    compressed = mask_utils.frPyObjects({"size": [2, 2], "counts": [1, 3]}, 2, 2)
    assert rle_encode(mask)["counts"] == compressed["counts"].decode()
    np.testing.assert_array_equal(rle_decode(compressed), mask)


def _rec(iou, stab, box, area_mask_shape=(6, 6)):
    mask = np.zeros(area_mask_shape, bool)
    x, y, w, h = box
    mask[y:y + h, x:x + w] = True
    return MaskRecord(mask, iou, stab, box, int(mask.sum()))


def test_order_records_is_deterministic():
    recs = [
        _rec(0.9, 0.8, (0, 0, 2, 2)),    # 0
        _rec(0.9, 0.95, (0, 0, 1, 1)),   # 1: same iou, higher stability -> before 0
        _rec(0.99, 0.1, (3, 3, 1, 1)),   # 2: highest iou -> first
        _rec(0.9, 0.8, (1, 1, 3, 3)),    # 3: ties 0 on scores, larger area -> before 0
        _rec(0.9, 0.8, (2, 0, 2, 2)),    # 4: ties 0 on scores and area, larger bbox -> after 0
        _rec(None, None, (0, 0, 6, 6)),  # 5: no scores (superpixel) -> last despite its area
    ]
    expected = [2, 1, 3, 0, 4, 5]
    rng = np.random.default_rng(7)
    for _ in range(5):
        shuffled = [recs[i] for i in rng.permutation(len(recs))]
        assert [recs.index(r) for r in order_records(shuffled)] == expected


def test_order_records_none_scores_fall_back_to_area():
    recs = [_rec(None, None, (0, 0, 1, 2)), _rec(None, None, (0, 0, 3, 3)), _rec(None, None, (4, 4, 2, 1))]
    assert [r.area for r in order_records(recs)] == [9, 2, 2]
    assert [r.bbox for r in order_records(recs)][1:] == [(0, 0, 1, 2), (4, 4, 2, 1)]


def test_record_from_mask_bbox_and_area():
    mask = np.zeros((5, 6), bool)
    mask[1:4, 2] = True
    mask[2, 4] = True
    r = record_from_mask(mask, 0.5, None)
    assert r.bbox == (2, 1, 3, 3) and r.area == 4
    assert record_from_mask(np.zeros((3, 3), bool)).bbox == (0, 0, 0, 0)


def test_json_round_trip():
    rng = np.random.default_rng(3)
    recs = [record_from_mask(rng.random((8, 10)) < 0.4, 0.123456789, 0.987654321),
            record_from_mask(rng.random((8, 10)) < 0.4, None, None)]
    items = json.loads(json.dumps(records_to_json(recs)))
    assert set(items[0]) == {"segmentation", "predicted_iou", "stability_score", "bbox", "area"}
    assert items[0]["predicted_iou"] == 0.123457 and items[0]["stability_score"] == 0.987654
    back = records_from_json(items)
    for a, b in zip(recs, back):
        np.testing.assert_array_equal(a.segmentation, b.segmentation)
        assert (a.bbox, a.area) == (b.bbox, b.area)
    assert back[0].predicted_iou == 0.123457 and back[1].predicted_iou is None and back[1].stability_score is None
    with pytest.raises(ValueError, match="'area'"):
        records_from_json([{k: v for k, v in items[0].items() if k != "area"}])


# ----------------------------------------------------------------------------- label map, coverage

def _overlapping():
    a = np.zeros((3, 4), bool)
    a[0:2, 0:3] = True
    b = np.zeros((3, 4), bool)
    b[1:3, 1:4] = True
    c = np.zeros((3, 4), bool)
    c[1, 2] = True
    return [a, b, c]


def test_label_map_later_overwrites():
    expected = np.array([[1, 1, 1, 0],
                         [1, 2, 3, 2],
                         [0, 2, 2, 2]], np.uint16)
    labels = label_map(_overlapping())
    assert labels.dtype == np.uint16
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(label_map([], shape=(2, 2)), np.zeros((2, 2), np.uint16))


def test_coverage_counts_background_once():
    expected = np.array([[1, 1, 1, 1],     # row 0: a only, last pixel none -> background
                         [1, 2, 3, 1],
                         [1, 1, 1, 1]], np.uint8)
    c = coverage(_overlapping(), (3, 4))
    assert c.dtype == np.uint8
    np.testing.assert_array_equal(c, expected)
    np.testing.assert_array_equal(coverage([], (2, 3)), np.ones((2, 3), np.uint8))
    full = [np.ones((1, 2), bool)] * 300
    np.testing.assert_array_equal(coverage(full, (1, 2)), [[255, 255]])   # saturates


def test_label_map_limits_and_shapes():
    with pytest.raises(ValueError, match="65535"):
        label_map([np.zeros((1, 1), bool)] * 65536)
    with pytest.raises(ValueError, match=r"masks\[1\] has shape"):
        label_map([np.zeros((2, 2), bool), np.zeros((2, 3), bool)])
    with pytest.raises(ValueError, match="bool"):
        label_map([np.full((2, 2), 2)])


# ----------------------------------------------------------------------------- hostile RLEs (issue 11)

def _runs_by_hand(mask: np.ndarray) -> list[int]:
    runs, value, n = [], False, 0
    for bit in mask.T.reshape(-1):               # COCO RLE runs go down columns, starting with zeros
        if bit != value:
            runs.append(n)
            value, n = bit, 0
        n += 1
    return runs + [n]


def test_rle_counts_parses_pycocotools_strings_exactly():
    from samsr.structure.masks import rle_counts

    rng = np.random.default_rng(5)
    masks = [rng.random(tuple(rng.integers(1, 40, 2))) < rng.random() for _ in range(60)]
    big = np.zeros((300, 400), bool)
    big[10:290, 30:350] = True                   # runs past 2^15 need multi-char counts and deltas
    for mask in masks + [big, np.ones((3, 3), bool), np.zeros((3, 3), bool)]:
        size, runs = rle_counts(rle_encode(mask))
        assert size == mask.shape and runs.tolist() == _runs_by_hand(mask)


def test_rle_that_would_write_past_its_mask_is_refused_before_decoding():
    from samsr.structure.masks import rle_counts

    rle = rle_encode(np.ones((4, 4), bool))                 # runs 0, 16
    for bad, why in (({**rle, "size": [2, 2]}, "cover 16 px, not the 2x2 = 4"),   # pycocotools would overflow
                     ({**rle, "size": [100_000, 100_000]}, "over the limit"),
                     ({**rle, "size": [-1, 4]}, "non-negative"),
                     ({**rle, "counts": rle["counts"] + "\x00"}, "outside the COCO alphabet"),
                     ({**rle, "counts": "0" + "o"}, "cut short"),          # 'o' = continuation bit set
                     ({**rle, "counts": "0" + "Q" * 9 + "0"}, "spans 10 chars"),
                     ({"size": [2, 2], "counts": "0@"}, "negative run")):    # "@": sign bit, -32
        with pytest.raises(ValueError, match=why):
            rle_counts(bad)
        with pytest.raises(ValueError, match=why):
            rle_decode(bad)
    with pytest.raises(ValueError, match=r"RLE size \[4, 4\] is not the image's \(8, 8\)"):
        rle_decode(rle, shape=(8, 8))
    assert rle_decode(rle, shape=(4, 4)).all()


def test_records_from_json_bounds_masks_by_the_image():
    items = records_to_json([record_from_mask(np.eye(6, 8, dtype=bool), 0.5, 0.5)])
    assert records_from_json(items, shape=(6, 8))[0].area == 6
    with pytest.raises(ValueError, match=r"mask record 0: RLE size \[6, 8\] is not the image's \(6, 9\)"):
        records_from_json(items, shape=(6, 9))
    with pytest.raises(ValueError, match="JSON list"):
        records_from_json({"segmentation": 1})
    with pytest.raises(ValueError, match="mask record 0 is a int"):
        records_from_json([3])


def test_structure_without_masks_is_all_background():
    from samsr.data import structure_from_records

    labels, values = structure_from_records([], (5, 7))      # raised 'no masks and no shape' before
    assert labels.shape == (5, 7) and labels.dtype == np.uint16 and not labels.any()
    assert values.dtype == np.float32 and values.tolist() == [0.0]
    assert not spe_map(labels, values).any()                 # E ≡ 0
