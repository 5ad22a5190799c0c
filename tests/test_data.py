"""samsr.data: SAMSR's SAM maps of y↑ (hard coverage, and soft masks segmented at 2x and pooled back,
METHOD.md §B) carried from `prepare_sample` through `make_batch` into the student's loss."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipelines.local.photos import bundled_photo
from samsr import config
from samsr.data import lrup_maps, make_batch, prepare_sample
from samsr.diffusion.samnoise import whole_image_stats
from samsr.diffusion.samsr import ResShiftTeacher, SamsrStudent
from samsr.structure.masks import record_from_mask
from samsr.structure.segmenters import SuperpixelSegmenter


class FixedMasks:
    """Returns hand-built masks for the image size it is asked about (records the sizes)."""

    def __init__(self, masks_by_shape):
        self.masks_by_shape, self.seen = masks_by_shape, []

    def segment(self, image):
        self.seen.append(image.shape[:2])
        return [record_from_mask(m) for m in self.masks_by_shape[image.shape[:2]]]


def test_soft_masks_are_segmented_at_2x_and_pooled_by_hand():
    left = np.zeros((2, 8), bool)
    left[:, :3] = True                       # pooled back to columns [1, 0.5, 0, 0]
    whole = np.ones((2, 8), bool)
    seg = FixedMasks({(2, 8): [left, whole]})
    y_up = np.full((1, 4, 3), 128, np.uint8)
    cover, scale = lrup_maps(y_up, seg, soft=True)
    assert seg.seen == [(2, 8)]
    # M1 = [1, .5, 0, 0], M2 = 1, background 1 − max = 0: C = [2, 1.5, 1, 1], scale = sqrt(M1² + M2²)/C
    assert cover[0].tolist() == pytest.approx([2, 1.5, 1, 1])
    assert scale[0].tolist() == pytest.approx([math.sqrt(2) / 2, math.sqrt(1.25) / 1.5, 1, 1])
    hard_cover, none = lrup_maps(y_up, FixedMasks({(1, 4): [np.array([[1, 1, 0, 0]], bool)]}))
    assert none is None and hard_cover.dtype == np.uint8 and hard_cover[0].tolist() == [1, 1, 1, 1]


def test_soft_samples_carry_the_scale_into_batch_and_loss():
    seg = SuperpixelSegmenter(n_segments=16)
    photo = bundled_photo("coffee")[:64, :96]
    sample = prepare_sample("coffee", photo, 4, seg, soft_masks=True)
    assert sample.noise_scale.shape == sample.cover.shape == (64, 96)
    assert (sample.cover_max, sample.noise_rms) == whole_image_stats(sample.cover, sample.noise_scale)
    assert 0 < sample.noise_scale.min() and sample.noise_scale.max() <= 1 + 1e-6
    batch = make_batch([sample], 2, 32, 4, np.random.default_rng(0))
    assert batch["noise_scale"].shape == (2, 1, 32, 32)
    hard = prepare_sample("coffee", photo, 4, seg)
    assert hard.noise_scale is None and "noise_scale" not in make_batch([hard], 1, 32, 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="soft-mask"):
        make_batch([sample, hard], 2, 32, 4, np.random.default_rng(0))

    torch.manual_seed(0)
    teacher = ResShiftTeacher.from_config(config.load("samsr-teacher-tiny"))
    student = SamsrStudent.from_teacher(teacher, config.load("samsr-student-tiny", ["resshift.soft_masks=true"]))
    _, m = student.loss(batch, torch.Generator().manual_seed(1))
    assert m["loss_distill"] == 0.0 and m["loss_inverse"] > 0.5
    with pytest.raises(ValueError, match="noise_scale"):
        student.loss(make_batch([hard], 2, 32, 4, np.random.default_rng(0)), torch.Generator().manual_seed(1))
