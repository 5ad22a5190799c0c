"""SAMSR's "space" (METHOD.md §B): pixel space is the identity and the default; a registered code
space (here a lossless 2x pixel-unshuffle, 12 channels) runs teacher, student and tiled inference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from samsr import config, images
from samsr.diffusion import space as space_mod
from samsr.diffusion.samsr import ResShiftTeacher, SamsrStudent
from samsr.infer import NoiseField, super_resolve_image


class Unshuffle2(space_mod.Space):
    """A lossless stand-in for a latent autoencoder: 2x2 pixel blocks -> 12 channels."""

    channels, factor, clip = 12, 2, False

    def encode(self, image):
        return F.pixel_unshuffle(image, 2)

    def decode(self, code):
        return F.pixel_shuffle(code, 2)


@pytest.fixture
def unshuffle_space():
    space_mod.register_space("unshuffle2", Unshuffle2)
    yield ["resshift.space=unshuffle2"]
    space_mod.SPACES.pop("unshuffle2")


def pair(overrides=()):
    torch.manual_seed(0)
    teacher = ResShiftTeacher.from_config(config.load("samsr-teacher-tiny", overrides))
    return teacher, SamsrStudent.from_teacher(teacher, config.load("samsr-student-tiny", overrides))


def lr_image(seed, h=8, w=6):
    return torch.rand((1, 3, h, w), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_pixel_space_is_the_default_identity():
    assert config.load("samsr-student-tiny").resshift.space == "pixel"
    teacher, student = pair()
    x = torch.rand(1, 3, 4, 4)
    for model in (teacher, student):
        assert isinstance(model.space, space_mod.PixelSpace)
        assert model.space.encode(x) is x and model.space.decode(x) is x and model.space.to_grid(x) is x
    assert teacher.net.unet.conv_in.in_channels == 6
    assert not list(teacher.space.parameters()) and "space" not in "".join(teacher.state_dict())


def test_unknown_space_is_rejected_by_name():
    with pytest.raises(ValueError, match=r"resshift.space='vqgan-f4'.*\['pixel'\]"):
        ResShiftTeacher.from_config(config.load("samsr-teacher-tiny", ["resshift.space=vqgan-f4"]))


def test_untrained_models_in_a_code_space_return_bicubic(unshuffle_space):
    teacher, student = pair(unshuffle_space)
    assert teacher.net.unet.conv_in.in_channels == 24 and student.net.unet.conv_out.out_channels == 12
    lr = lr_image(1)
    bicubic = images.upscale(lr, 4).clamp(-1, 1)
    out = teacher.super_resolve(lr, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, bicubic)
    cover = torch.randint(1, 4, (1, 1, 32, 24), generator=torch.Generator().manual_seed(2)).float()
    assert torch.equal(student.super_resolve(lr, generator=torch.Generator().manual_seed(0), cover=cover), bicubic)
    assert torch.equal(student.super_resolve(lr, generator=torch.Generator().manual_seed(0)), bicubic)  # C ≡ 1


def test_maps_are_pooled_onto_the_code_grid(unshuffle_space):
    _, student = pair(unshuffle_space)
    cover = torch.tensor([[1.0, 3.0, 2.0, 2.0], [1.0, 3.0, 4.0, 2.0]]).view(1, 1, 2, 4)
    assert student.space.to_grid(cover).flatten().tolist() == [2.0, 2.5]
    with pytest.raises(ValueError, match="factor 2"):
        student.space.to_grid(torch.ones(1, 1, 3, 4))


def test_student_loss_in_a_code_space(unshuffle_space):
    _, student = pair(unshuffle_space)
    g = torch.Generator().manual_seed(3)
    hr = torch.rand((2, 3, 16, 16), generator=g) * 2 - 1
    cover = torch.randint(1, 4, (2, 1, 16, 16), generator=g).float()
    batch = {"hr": hr, "lr": images.downscale(hr, 4), "cover": cover,
             "cover_max": torch.full((2,), 4.0), "noise_rms": torch.full((2,), 0.7)}
    loss, m = student.loss(batch, torch.Generator().manual_seed(4))
    # untrained: every call returns the code of y↑; unshuffle only permutes pixels, so the code-space
    # ground-truth MSE equals the pixel-space one
    y_up = images.upscale(batch["lr"], 4)
    assert m["loss_distill"] == 0.0
    assert m["loss_gt"] == pytest.approx(float(((y_up - hr) ** 2).mean()), rel=1e-6)
    loss.backward()
    assert student.net.unet.conv_out.weight.grad.abs().sum() > 0


def test_tiled_inference_draws_noise_on_the_code_grid(unshuffle_space):
    _, student = pair(unshuffle_space)
    with torch.no_grad():
        student.net.unet.conv_out.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(5))
    lr = lr_image(6, 12, 12)
    whole = super_resolve_image(student, lr, config.InferConfig(tile=0), seed=7)
    field = NoiseField(7, (1, 12, 24, 24))
    direct = student.super_resolve(lr, noise_fn=field.full)
    assert torch.equal(whole, direct)
    assert not torch.equal(whole, images.upscale(lr, 4).clamp(-1, 1))      # the network does something
    tiled = super_resolve_image(student, lr, config.InferConfig(tile=8, overlap=2, tile_batch=4), seed=7)
    assert tiled.shape == (1, 3, 48, 48)
    assert float((tiled - whole).abs().mean()) < 0.1      # same noise field, tiles blended
