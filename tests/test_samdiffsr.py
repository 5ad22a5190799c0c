"""SAM-DiffSR (METHOD.md §A): cosine schedule, mask coefficient, modulated q_sample, sampler, model."""
import math

import pytest
import torch

from samsr import config
from samsr.diffusion.samdiffsr import (SamDiffSR, cosine_beta_schedule, from_residual, make_schedule,
                                       mask_coefficient, p_sample_loop, q_sample, to_residual)


T = 100


def _reference_schedule(timesteps=T, s=0.008, max_beta=0.999):
    """Nichol & Dhariwal's cosine schedule written out in plain Python: (betas, alphas_cumprod)."""
    f = [math.cos((i / timesteps + s) / (1 + s) * math.pi / 2) ** 2 for i in range(timesteps + 1)]
    betas = [min(1 - f[i + 1] / f[i], max_beta) for i in range(timesteps)]
    cumprod, acc = [], 1.0
    for b in betas:
        acc *= 1 - b
        cumprod.append(acc)
    return betas, cumprod


# the same numbers, hard-coded (computed once with the plain-Python formula above)
BETA = {0: 6.312815983416931e-04, 50: 3.154633936072593e-02, 99: 0.999}
ALPHA_BAR = {0: 0.9993687184016583, 50: 0.47826463294547805, 99: 2.4285722793500615e-07}
C_T = {0: 1.5861150827248216e-05, 50: 0.022786315673095255, 99: 0.9989998786928074}


def test_cosine_betas_and_alpha_bar_match_the_formula():
    betas, cumprod = _reference_schedule()
    got = cosine_beta_schedule(T)
    assert got.dtype == torch.float64 and got.shape == (T,)
    sched = make_schedule(T, 0.008, 0.999)
    for t in (0, 1, 50, 81, 98, 99):
        assert got[t].item() == pytest.approx(betas[t], rel=1e-12, abs=1e-15)
        assert sched.alphas_cumprod[t].item() == pytest.approx(cumprod[t], rel=1e-10)
    for t, value in BETA.items():
        assert got[t].item() == pytest.approx(value, rel=1e-12)
    for t, value in ALPHA_BAR.items():
        assert sched.alphas_cumprod[t].item() == pytest.approx(value, rel=1e-10)
    assert got[99].item() == 0.999  # clipped at max_beta


def test_posterior_constants_written_out():
    betas, cumprod = _reference_schedule()
    sched = make_schedule(T)
    t = 40
    prev = cumprod[t - 1]
    var = betas[t] * (1 - prev) / (1 - cumprod[t])
    assert sched.posterior_variance[t].item() == pytest.approx(var, rel=1e-10)
    assert sched.posterior_mean_coef1[t].item() == pytest.approx(betas[t] * math.sqrt(prev) / (1 - cumprod[t]), rel=1e-10)
    assert sched.posterior_mean_coef2[t].item() == pytest.approx((1 - prev) * math.sqrt(1 - betas[t]) / (1 - cumprod[t]), rel=1e-10)
    assert sched.alphas_cumprod_prev[0].item() == 1.0
    assert sched.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(1e-20))


def test_mask_coefficient_values_and_the_t82_threshold():
    betas, cumprod = _reference_schedule()
    sched = make_schedule(T)
    c = mask_coefficient(sched, torch.arange(T))
    for t, value in C_T.items():
        assert c[t].item() == pytest.approx(value, rel=1e-10)
        assert c[t].item() == pytest.approx(math.sqrt(1 - cumprod[t]) * betas[t], rel=1e-10)
    # METHOD.md §A: c_t < 0.1 for t < 82, so modulation acts in the last ~18 steps
    assert (c[:82] < 0.1).all()
    assert (c[82:] > 0.1).all()
    assert c[81].item() == pytest.approx(0.09588540877350968, rel=1e-10)
    assert c[82].item() == pytest.approx(0.1018010131458699, rel=1e-10)
    assert mask_coefficient(sched, 50).item() == pytest.approx(C_T[50], rel=1e-10)


def test_residual_round_trip_and_clip():
    hr = torch.tensor([0.5, -0.2, 0.9, -1.0]).reshape(1, 1, 2, 2)
    up = torch.tensor([0.4, 0.3, 0.0, -0.8]).reshape(1, 1, 2, 2)
    r0 = to_residual(hr, up, 2.0)
    assert torch.allclose(r0, torch.tensor([0.2, -1.0, 1.0, -0.4]).reshape(1, 1, 2, 2))
    back = from_residual(up, r0, 2.0)
    assert torch.allclose(back, torch.tensor([0.5, -0.2, 0.5, -1.0]).reshape(1, 1, 2, 2))


def _r0_noise_t(seed):
    """r0 (3,3,8,8) in [-1,1], ε, and t = (0, 50, 99), seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, 3, 8, 8, generator=g) * 2 - 1, torch.randn(3, 3, 8, 8, generator=g), torch.tensor([0, 50, 99])


def test_q_sample_with_zero_structure_is_the_plain_forward_process():
    sched = make_schedule(T)
    r0, noise, t = _r0_noise_t(3)
    plain, eps_plain = q_sample(r0, t, noise, None, sched)
    zero, eps_zero = q_sample(r0, t, noise, torch.zeros(3, 1, 8, 8), sched)
    assert torch.equal(plain, zero) and torch.equal(eps_plain, eps_zero) and torch.equal(eps_plain, noise)
    # the plain forward process written out
    for i, ti in enumerate((0, 50, 99)):
        a = ALPHA_BAR[ti]
        expected = math.sqrt(a) * r0[i].double() + math.sqrt(1 - a) * noise[i].double()
        assert torch.allclose(plain[i].double(), expected, atol=1e-6)


def test_q_sample_constant_structure_shifts_the_mean():
    sched = make_schedule(T)
    r0, noise, t = _r0_noise_t(4)
    e = 0.75
    plain, _ = q_sample(r0, t, noise, None, sched)
    shifted, eps_prime = q_sample(r0, t, noise, torch.full((3, 1, 8, 8), e), sched)
    for i, ti in enumerate((0, 50, 99)):
        shift = math.sqrt(1 - ALPHA_BAR[ti]) * C_T[ti] * e
        assert torch.allclose(shifted[i] - plain[i], torch.full((3, 8, 8), shift), atol=1e-6)
        assert torch.allclose(eps_prime[i] - noise[i], torch.full((3, 8, 8), C_T[ti] * e), atol=1e-6)


def test_q_sample_rejects_a_wrongly_shaped_structure_map():
    sched = make_schedule(T)
    with pytest.raises(ValueError, match=r"\(B,1,H,W\)"):
        q_sample(torch.zeros(1, 3, 8, 8), torch.tensor([1]), torch.zeros(1, 3, 8, 8), torch.zeros(1, 1, 2, 2), sched)


def _generator_noise(seed, shape):
    g = torch.Generator().manual_seed(seed)
    return lambda step: torch.randn(shape, generator=g)


def test_sampler_is_deterministic_per_seed_and_stays_in_range():
    sched = make_schedule(T)
    shape = (2, 3, 6, 6)
    denoise = lambda x, t: 0.3 * x + 0.2 * torch.sin(3 * x)  # noqa: E731
    a = p_sample_loop(denoise, shape, sched, _generator_noise(0, shape))
    b = p_sample_loop(denoise, shape, sched, _generator_noise(0, shape))
    c = p_sample_loop(denoise, shape, sched, _generator_noise(1, shape))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    assert a.min() >= -1 and a.max() <= 1


def test_sampler_asks_for_steps_T_down_to_1():
    sched = make_schedule(10)
    asked = []

    def noise_fn(step):
        asked.append(step)
        return torch.zeros(1, 3, 2, 2)

    p_sample_loop(lambda x, t: torch.zeros_like(x), (1, 3, 2, 2), sched, noise_fn)
    assert asked == list(range(10, 0, -1))


def test_sampler_with_an_oracle_denoiser_returns_its_r0():
    sched = make_schedule(T)
    target = torch.linspace(-0.9, 0.9, 2 * 3 * 5 * 5).reshape(2, 3, 5, 5)
    ac = sched.alphas_cumprod

    def oracle(x, t):  # the exact ε for which x = sqrt(ᾱ) target + sqrt(1-ᾱ) ε
        a = ac[t].float().reshape(-1, 1, 1, 1)
        return (x - a.sqrt() * target) / (1 - a).sqrt()

    out = p_sample_loop(oracle, target.shape, sched, _generator_noise(5, target.shape))
    assert torch.allclose(out, target, atol=1e-5)


def test_sampler_steps_match_hand_written_ddpm():
    """Three-step schedule, fixed noise: the ancestral update written out in float64."""
    sched = make_schedule(3)
    betas, cumprod = _reference_schedule(3)
    fields = {3: torch.full((1, 3, 1, 1), 0.8), 2: torch.full((1, 3, 1, 1), -0.5), 1: torch.full((1, 3, 1, 1), 0.3)}
    out = p_sample_loop(lambda x, t: 0.5 * x, (1, 3, 1, 1), sched, lambda step: fields[step])
    x = 0.8
    for t in (2, 1, 0):
        a, prev = cumprod[t], (cumprod[t - 1] if t > 0 else 1.0)
        r0 = max(-1.0, min(1.0, math.sqrt(1 / a) * x - math.sqrt(1 / a - 1) * 0.5 * x))
        mean = betas[t] * math.sqrt(prev) / (1 - a) * r0 + (1 - prev) * math.sqrt(1 - betas[t]) / (1 - a) * x
        x = mean + (math.sqrt(betas[t] * (1 - prev) / (1 - a)) * fields[t][0, 0, 0, 0].item() if t > 0 else 0.0)
    assert out[0, 0, 0, 0].item() == pytest.approx(x, abs=1e-5)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return SamDiffSR.from_config(config.load("samdiffsr-tiny"))


def _batch(seed, b=2, size=16):
    g = torch.Generator().manual_seed(seed)
    hr = torch.rand(b, 3, size, size, generator=g) * 2 - 1
    lr = torch.nn.functional.avg_pool2d(hr, 4)
    spe = torch.rand(b, 1, size, size, generator=g) - 0.5
    return {"hr": hr, "lr": lr, "spe": spe}


def test_model_wiring_frozen_rrdb(tiny):
    assert tiny.scale == 4 and tiny.schedule.timesteps == 100
    assert all(not p.requires_grad for p in tiny.rrdb.parameters())
    assert {id(p) for p in tiny.trainable_parameters()} == {id(p) for p in tiny.denoiser.parameters()}
    tiny.train()
    assert not tiny.rrdb.training and tiny.denoiser.training
    tiny.eval()


def test_loss_uses_structure_only_when_modulating(tiny):
    batch = _batch(0)
    no_spe = {k: v for k, v in batch.items() if k != "spe"}
    zero_spe = {**batch, "spe": torch.zeros_like(batch["spe"])}
    loss = lambda m, b: m.loss(b, torch.Generator().manual_seed(7))[0].item()  # noqa: E731
    # at the drawn t's c_t is tiny unless t >= 82, so use a strong map to see the effect
    strong = {**batch, "spe": batch["spe"] * 50}
    assert loss(tiny, zero_spe) == loss(tiny, no_spe)
    assert loss(tiny, strong) != loss(tiny, no_spe)
    plain = SamDiffSR(tiny.rrdb, tiny.denoiser, tiny.schedule, structure_modulation=False)
    assert loss(plain, strong) == loss(tiny, no_spe)
    _, metrics = tiny.loss(batch, torch.Generator().manual_seed(7))
    assert set(metrics) == {"loss", "t_mean"} and 0 <= metrics["t_mean"] <= 99


def test_loss_decreases_when_overfitting_one_batch():
    torch.manual_seed(1)
    model = SamDiffSR.from_config(config.load("samdiffsr-tiny"))
    batch = _batch(2)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=2e-3)
    evaluate = lambda: model.loss(batch, torch.Generator().manual_seed(123))[0].item()  # noqa: E731
    with torch.no_grad():
        before = evaluate()
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        opt.zero_grad()
        loss, _ = model.loss(batch, g)
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = evaluate()
    assert after < 0.6 * before, (before, after)


def test_super_resolve_shape_range_and_seeds(tiny):
    lr = _batch(3, b=1, size=32)["lr"]  # (1,3,8,8)
    a = tiny.super_resolve(lr, generator=torch.Generator().manual_seed(0))
    b = tiny.super_resolve(lr, generator=torch.Generator().manual_seed(0))
    c = tiny.super_resolve(lr, generator=torch.Generator().manual_seed(1))
    assert a.shape == (1, 3, 32, 32)
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-4
    assert not a.requires_grad
    with pytest.raises(ValueError, match="generator"):
        tiny.super_resolve(lr)
