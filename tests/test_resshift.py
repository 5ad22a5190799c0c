"""ResShift formulas (METHOD.md §B): schedule numbers, coefficients against hand arithmetic, the
posterior against the forward process, the deterministic step, the sampler and the x̂ parameterisation."""
from __future__ import annotations

import math

import pytest
import torch

from samsr.config import ResShiftConfig, UNetConfig
from samsr.diffusion import resshift as rs

TINY_UNET = UNetConfig(base=8, mults=(1, 2), blocks_per_level=1)


def default_schedule() -> torch.Tensor:
    c = ResShiftConfig()
    return rs.eta_schedule(c.timesteps, c.kappa, c.power, c.etas_end, c.min_noise_level)


def test_eta_schedule_default_numbers():
    s = default_schedule()
    assert s.shape == (15,) and s.dtype == torch.float64
    # t = 1, 13, 14, 15 (index t-1): METHOD.md §B constants T=15, κ=2, p=0.3, √η_T=0.99, min_noise_level=0.04
    for t, expected in [(1, 0.02), (13, 0.830), (14, 0.909), (15, 0.99)]:
        assert abs(float(s[t - 1]) - expected) < 1e-3, (t, float(s[t - 1]))
    assert torch.all(s[1:] > s[:-1])


def test_eta_schedule_first_level_follows_min_noise_rule():
    # √η_1 = min(mnl/κ, mnl, √0.001): κ = 0.5 -> min(0.08, 0.04, 0.0316) = 0.0316
    s = rs.eta_schedule(10, 0.5, 0.3, 0.99, 0.04)
    assert float(s[0]) == pytest.approx(math.sqrt(0.001), abs=1e-12)
    assert float(s[-1]) == pytest.approx(0.99, abs=1e-12)


def test_coefficients_against_hand_arithmetic():
    # √η_t = 0.5, √η_{t-1} = 0.3, κ = 2: η = 0.25, η_prev = 0.09, α = 0.16
    c_xt, c_x, var = rs.posterior_coefficients(0.5, 0.3, 2.0)
    assert (c_xt, c_x, var) == pytest.approx((0.36, 0.64, 0.2304))
    k, m, j = rs.deterministic_coefficients(0.5, 0.3)
    # m = 0.3/0.5, j = 0.09 - 0.15, k = 1 - 0.09 + 0.15 - 0.6
    assert (k, m, j) == pytest.approx((0.46, 0.6, -0.06))
    assert rs.q_sample(torch.tensor(0.2), torch.tensor(-0.4), torch.tensor(0.5), 0.5, 2.0).item() == pytest.approx(0.55)
    assert rs.input_scale(0.5, 2.0) == pytest.approx(1 / math.sqrt(2))
    assert rs.prior_sample(torch.tensor(0.1), torch.tensor(-1.0), 0.99, 1.6).item() == pytest.approx(0.1 - 1.584)


def test_scheduler_uses_schedule_values_at_t():
    sched = rs.ResShiftScheduler(default_schedule(), 2.0)
    ref = torch.zeros(1, 3, 2, 2)
    # √η_13 = 0.82995066, √η_12 = 0.75398526 (computed by hand from the schedule formula)
    s13, s12 = 0.82995066, 0.75398526
    x_hat, x_t, y = torch.full_like(ref, 0.3), torch.full_like(ref, -0.2), torch.full_like(ref, 0.7)
    out = sched.step(x_hat, x_t, 13, y)
    m = s12 / s13
    k = 1 - s12 ** 2 + s12 * s13 - m
    j = s12 ** 2 - s12 * s13
    assert torch.allclose(out, torch.full_like(ref, k * 0.3 + m * -0.2 + j * 0.7), atol=1e-6)
    noise = torch.full_like(ref, 1.5)
    out = sched.step(x_hat, x_t, 13, y, noise)
    e13, e12 = s13 ** 2, s12 ** 2
    expected = (e12 / e13) * -0.2 + ((e13 - e12) / e13) * 0.3 + math.sqrt(4 * e12 * (e13 - e12) / e13) * 1.5
    assert torch.allclose(out, torch.full_like(ref, expected), atol=1e-6)
    assert float(sched.sqrt_eta_at(0, ref)) == 0.0
    assert sched.sqrt_eta_at(torch.tensor([1, 15]), ref).flatten().tolist() == pytest.approx([0.02, 0.99])


def test_posterior_sampling_reproduces_the_forward_marginal():
    """x_t ~ q(x_t|x), then x_{t-1} ~ q(x_{t-1}|x_t, x) must be distributed as q(x_{t-1}|x)."""
    sched = rs.ResShiftScheduler(default_schedule(), 2.0)
    g = torch.Generator().manual_seed(1)
    n, t = 200_000, 8
    x, y = torch.full((n, 1, 1, 1), 0.4), torch.full((n, 1, 1, 1), -0.6)
    x_t = sched.add_noise(x, y, t, torch.randn(x.shape, generator=g))
    x_prev = sched.step(x, x_t, t, y, torch.randn(x.shape, generator=g))
    s_prev = 0.41235614                           # √η_7 by hand
    mean, std = 0.4 + s_prev ** 2 * (-1.0), 2.0 * s_prev
    # standard errors: std/√n = 0.0021 for the mean, std/√(2n) = 0.0015 for the std; 5σ tolerances
    assert abs(float(x_prev.mean()) - mean) < 5 * std / math.sqrt(n)
    assert abs(float(x_prev.std()) - std) < 5 * std / math.sqrt(2 * n)


@pytest.mark.parametrize("pixelwise", [False, True])
def test_deterministic_step_with_true_x_follows_the_same_noise(pixelwise):
    """With x̂ = x, the k,m,j step maps q_sample(x, ε) at t onto q_sample(x, ε) at t−1 exactly."""
    g = torch.Generator().manual_seed(2)
    x, y, eps = (torch.randn((2, 3, 4, 5), generator=g) for _ in range(3))
    sched = rs.ResShiftScheduler(default_schedule(), 2.0)
    if pixelwise:
        sched = sched.pixelwise(torch.rand((2, 1, 4, 5), generator=g) * 0.2)
    for t in (15, 9, 2):
        out = sched.step(x, sched.add_noise(x, y, t, eps), t, y)
        assert torch.allclose(out, sched.add_noise(x, y, t - 1, eps), atol=1e-5)


def test_untrained_denoiser_returns_bicubic_exactly():
    torch.manual_seed(0)
    net = rs.Denoiser(TINY_UNET)
    g = torch.Generator().manual_seed(3)
    x_in, y_up = torch.randn((2, 3, 20, 12), generator=g), torch.rand((2, 3, 20, 12), generator=g) * 2 - 1
    assert torch.equal(net(x_in, y_up, 7), y_up)
    assert torch.equal(net(x_in, y_up, torch.tensor([0.0, 15.0])), y_up)


@pytest.mark.parametrize("deterministic", [False, True])
def test_sampler_steps_noise_and_untrained_output(deterministic):
    torch.manual_seed(0)
    net = rs.Denoiser(TINY_UNET)
    sched = rs.ResShiftScheduler(default_schedule(), 2.0)
    y_up = torch.rand((1, 3, 8, 8), generator=torch.Generator().manual_seed(4)) * 2 - 1
    steps, calls = [], []
    net.register_forward_hook(lambda *_: calls.append(1))

    def noise_fn(step: int) -> torch.Tensor:
        steps.append(step)
        return torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(step))

    out = rs.sample(net, y_up, sched, deterministic=deterministic, noise_fn=noise_fn)
    assert torch.equal(out, y_up)                           # x̂ ≡ y↑, and x_0 = x̂ at t = 1
    assert len(calls) == 15
    assert steps == ([15] if deterministic else list(range(15, 0, -1)))


def test_sampler_refuses_to_draw_without_a_source_of_randomness():
    sched = rs.ResShiftScheduler(default_schedule(), 2.0)
    with pytest.raises(ValueError, match="generator"):
        rs.sample(lambda x, y, t: y, torch.zeros(1, 3, 4, 4), sched)


def test_teacher_loss_of_untrained_model_is_bicubic_mse():
    torch.manual_seed(0)
    net = rs.Denoiser(TINY_UNET)
    g = torch.Generator().manual_seed(5)
    x, y_up = torch.rand((3, 3, 8, 8), generator=g) * 2 - 1, torch.rand((3, 3, 8, 8), generator=g) * 2 - 1
    loss = rs.teacher_loss(net, rs.ResShiftScheduler(default_schedule(), 2.0), x, y_up, g)
    assert float(loss.detach()) == pytest.approx(float(((x - y_up) ** 2).mean()), rel=1e-6)
    loss.backward()
    assert net.unet.conv_out.weight.grad.abs().sum() > 0
