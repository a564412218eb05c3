"""Tests of diffusion.py: the schedule, q(x_t | x_0), the samplers and LatentDiffusion training.

The networks are tiny ``modules.UNet``s on 8x8x2 latents, or analytic stand-ins whose
exact sampler outputs are known (``ZeroNoise``, ``Oracle`` for a one-point data set, and
``gaussian_eps`` for Gaussian data). The tf.distribute
check runs in a subprocess because logical CPU devices must be configured before
TensorFlow initialises its devices.
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import diffusion as D
import modules

ROOT = Path(__file__).resolve().parents[1]

LATENT = (8, 8, 2)
UNET_KW = dict(dim=8, dim_mults=(1, 2), channels=2, resnet_groups=4, attn_heads=2, attn_dim_head=8)
# One level (no down/upsampling): about half the layers, so building and compiling a train
# step cost less. Used by the training tests; the sampler tests use the two-level UNet.
FLAT_UNET_KW = dict(UNET_KW, dim_mults=(1,))


def tiny_unet(**overrides):
    return modules.UNet(**dict(UNET_KW, **overrides))


def make_model(schedule, seed=1, ema_decay=0.999, **unet_overrides):
    model = D.LatentDiffusion(tiny_unet(**unet_overrides), schedule, ema_decay=ema_decay, seed=seed)
    model.build((None, *LATENT))
    return model


def fit_steps(model, data, steps):
    """Run ``steps`` train steps on the same batch ``data``; returns the epoch's mean loss."""
    dataset = tf.data.Dataset.from_tensors(data).repeat()
    return model.fit(dataset, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0).history["loss"][0]


def weights(layer):
    return [w.numpy() for w in layer.weights]


def max_abs_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))


class ZeroNoise(keras.layers.Layer):
    """Predicts eps_hat = 0, so x0_hat = x_t / sqrt(alpha_bar_t) and the samplers are closed-form."""

    def call(self, x_t, t, training=None):
        return tf.zeros_like(x_t)


class Oracle(keras.layers.Layer):
    """The exact noise for a data set of one known x0: eps = (x_t - sqrt(ab_t) x0) / sqrt(1 - ab_t)."""

    def __init__(self, schedule, x0, **kwargs):
        super().__init__(**kwargs)
        self.schedule, self.x0 = schedule, tf.constant(x0)

    def call(self, x_t, t, training=None):
        a = tf.reshape(tf.gather(self.schedule.sqrt_alphas_cumprod, t), [-1, 1, 1, 1])
        b = tf.reshape(tf.gather(self.schedule.sqrt_one_minus_alphas_cumprod, t), [-1, 1, 1, 1])
        return (x_t - a * self.x0) / b


# --------------------------------------------------------------------------- schedule


# alpha_bar_t of the linear schedule 1e-4..0.02 with T = 1000, computed as the exact rational
# product prod_{s<=t} (1 - beta_s) with fractions.Fraction and rounded to 11 digits: an
# independent check of the float64 cumprod behind make_schedule.
LINEAR_1000_ALPHA_BAR = {0: 0.9999, 9: 0.99810520479, 99: 0.89701814567, 499: 0.078587242882, 999: 4.0358297654e-5}


def test_linear_schedule_matches_exact_products_and_has_no_off_by_one():
    """beta_t runs linearly from beta_start (index 0) to beta_end (index T-1) and alpha_bar_t
    equals the exact products above; rtol 1e-6 allows the float32 storage (6e-8)."""
    T, b0, b1 = 1000, 1e-4, 0.02
    s = D.make_schedule("linear", T, beta_start=b0, beta_end=b1)
    np.testing.assert_allclose(s.betas.numpy(), b0 + (b1 - b0) * np.arange(T) / (T - 1), rtol=1e-6)
    ab = s.alphas_cumprod.numpy()
    for t, value in LINEAR_1000_ALPHA_BAR.items():
        assert ab[t] == pytest.approx(value, rel=1e-6), t
    # Index 0 is one noising step: alpha_bar_0 = 1 - beta_0 (the original had 1 here).
    assert ab[0] == pytest.approx(1.0 - b0, abs=1e-7)
    assert s.alphas_cumprod_prev.numpy()[0] == 1.0
    np.testing.assert_array_equal(s.alphas_cumprod_prev.numpy()[1:], ab[:-1])


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_invariants(kind):
    """dtypes, shapes and ranges, and every derived field against its definition on the stored
    values (rtol 1e-6 / atol 1e-6: float32 storage of float64 values)."""
    T = 1000
    s = D.make_schedule(kind, T)
    assert (s.kind, s.timesteps) == (kind, T)
    for field in dataclasses.fields(s):
        value = getattr(s, field.name)
        if isinstance(value, tf.Tensor):
            assert value.dtype == tf.float32 and value.shape == (T,), field.name
    n = {
        f.name: getattr(s, f.name).numpy().astype(np.float64)
        for f in dataclasses.fields(s)
        if f.name not in ("kind", "timesteps")
    }
    ab = n["alphas_cumprod"]
    assert np.all(np.diff(ab) < 0) and ab[0] <= 1.0 and ab[-1] > 0.0
    assert np.all((n["betas"] > 0) & (n["betas"] < 1))
    np.testing.assert_allclose(n["alphas"], 1.0 - n["betas"], rtol=0, atol=1e-7)
    # The defining recursion alpha_bar_t = alpha_bar_{t-1} alpha_t, at every index (a ratio, not a cumprod).
    np.testing.assert_allclose(ab[1:] / ab[:-1], n["alphas"][1:], rtol=1e-6)
    np.testing.assert_allclose(n["sqrt_alphas_cumprod"] ** 2, ab, rtol=1e-6)
    np.testing.assert_allclose(n["sqrt_one_minus_alphas_cumprod"] ** 2, 1.0 - ab, rtol=0, atol=1e-6)
    # Posterior q(x_{t-1} | x_t, x_0): exactly x_0 at t = 0, and a variance <= beta_t after
    # (its values are checked by test_posterior_is_the_gaussian_conditional).
    var = n["posterior_variance"]
    assert var[0] == 0.0 and np.all(var[1:] > 0) and np.all(var <= n["betas"] * (1 + 1e-6))
    assert n["posterior_mean_coef1"][0] == 1.0 and n["posterior_mean_coef2"][0] == 0.0


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_posterior_is_the_gaussian_conditional(kind):
    """c1_t, c2_t and beta~_t against E and Var of x_{t-1} given (x_0, x_t), obtained by generic
    Gaussian conditioning of the joint covariance of (x_0, x_{t-1}, x_t): no posterior formula
    involved. Inputs are the stored alpha_t, beta_t (float64 from there on); rtol 1e-6 allows the
    float32 storage of the schedule (6e-8, compounded by the ratios: seen 1.3e-7)."""
    s = D.make_schedule(kind, 1000)
    alpha, beta = s.alphas.numpy().astype(np.float64), s.betas.numpy().astype(np.float64)
    # log alpha_t from whichever stored value is relatively accurate (1 - alpha_bar_{t-1} near
    # t = 0 is a difference of numbers near 1, so it must not come from the rounded alpha_t).
    log_alpha = np.where(beta < 0.5, np.log1p(-beta), np.log(alpha))
    log_ab_prev = np.concatenate([[0.0], np.cumsum(log_alpha)[:-1]])
    # (x_0, x_{t-1}, x_t) as linear maps of three independent N(0, 1) draws w: x_0 = w_0 (any
    # prior gives the same conditional), x_{t-1} ~ q(x_{t-1} | x_0) and one more noising step.
    loading = np.zeros((len(beta), 3, 3))
    loading[:, 0, 0] = 1.0
    loading[:, 1, 0], loading[:, 1, 1] = np.exp(log_ab_prev / 2), np.sqrt(-np.expm1(log_ab_prev))
    loading[:, 2, :2] = np.sqrt(alpha)[:, None] * loading[:, 1, :2]
    loading[:, 2, 2] = np.sqrt(beta)
    cov = loading @ loading.transpose(0, 2, 1)
    given = [0, 2]  # condition x_{t-1} (row 1) on x_0 and x_t
    cov_gg, cov_yg = cov[:, given][:, :, given], cov[:, 1, given]
    weights = np.linalg.solve(cov_gg, cov_yg[..., None])[..., 0]  # E[x_{t-1} | .] = w_0 x_0 + w_1 x_t
    variance = cov[:, 1, 1] - np.sum(weights * cov_yg, axis=-1)
    np.testing.assert_allclose(s.posterior_mean_coef1.numpy(), weights[:, 0], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(s.posterior_mean_coef2.numpy(), weights[:, 1], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(s.posterior_variance.numpy(), variance, rtol=1e-6, atol=1e-12)


def test_cosine_schedule_follows_cos_squared():
    T, s_off = 1000, 0.008
    s = D.make_schedule("cosine", T)
    f = lambda u: np.cos((u / T + s_off) / (1 + s_off) * np.pi / 2) ** 2  # noqa: E731
    t = np.arange(T)
    # Index t has had t + 1 steps; only the very last beta is clipped (to 0.999).
    np.testing.assert_allclose(s.alphas_cumprod.numpy()[:-1], (f(t + 1) / f(0))[:-1], rtol=1e-5)
    assert s.betas.numpy()[-1] == pytest.approx(0.999)
    assert np.all(s.betas.numpy()[:-1] < 0.999)


@pytest.mark.parametrize(
    "kwargs", [dict(kind="quadratic"), dict(timesteps=0), dict(beta_start=0.02, beta_end=1e-4), dict(beta_end=1.0)]
)
def test_make_schedule_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        D.make_schedule(**kwargs)


def test_q_sample_uses_each_examples_own_t():
    s = D.make_schedule("linear", 50)
    t = tf.constant([0, 17, 49])
    out = D.q_sample(s, 2.0 * tf.ones((3, 4, 4, 2)), t, -tf.ones((3, 4, 4, 2))).numpy()
    expected = 2.0 * s.sqrt_alphas_cumprod.numpy()[[0, 17, 49]] - s.sqrt_one_minus_alphas_cumprod.numpy()[[0, 17, 49]]
    np.testing.assert_allclose(out, np.broadcast_to(expected[:, None, None, None], out.shape), rtol=1e-6)


def test_q_sample_statistics():
    s = D.make_schedule("linear", 50)
    steps, n = [0, 25, 49], 20000
    x0_one = np.array([[1.5, -0.5], [0.0, 2.0]], np.float32).reshape(1, 2, 2, 1)
    x0 = tf.constant(np.repeat(x0_one, n * len(steps), 0))
    t = tf.constant(np.repeat(steps, n), tf.int32)
    noise = tf.random.stateless_normal(x0.shape, seed=[1, 2])
    x_t = D.q_sample(s, x0, t, noise).numpy().reshape(len(steps), n, 2, 2, 1)
    for i, step in enumerate(steps):
        mean_ab, std = s.sqrt_alphas_cumprod.numpy()[step], s.sqrt_one_minus_alphas_cumprod.numpy()[step]
        np.testing.assert_allclose(x_t[i].mean(0), mean_ab * x0_one[0], atol=5 * std / np.sqrt(n))
        np.testing.assert_allclose(x_t[i].std(0), std, rtol=0.03)


def test_epsilon_mse_is_zero_for_the_exact_noise():
    s = D.make_schedule("linear", 20, 1e-3, 0.3)
    x0 = np.random.default_rng(0).standard_normal((4, *LATENT)).astype(np.float32)
    t = tf.constant([0, 5, 12, 19])
    noise = tf.random.stateless_normal(x0.shape, seed=[3, 4])
    assert float(D.epsilon_mse(Oracle(s, x0), s, x0, t, noise)) < 1e-8
    assert float(D.epsilon_mse(ZeroNoise(), s, x0, t, noise)) == pytest.approx(
        float(tf.reduce_mean(noise**2)), rel=1e-6
    )


# --------------------------------------------------------------------------- samplers


@pytest.fixture(scope="module")
def unet():
    keras.utils.set_random_seed(1)
    return tiny_unet().build_for(LATENT)


@pytest.fixture(scope="module")
def sampler(unet):
    return D.Sampler(unet, D.make_schedule("linear", 20))


SAMPLERS = {
    "ddpm": lambda s, **kw: s.ddpm((2, *LATENT), **kw),
    "ddim-eta0": lambda s, **kw: s.ddim((2, *LATENT), steps=5, eta=0.0, **kw),
    "ddim-eta1": lambda s, **kw: s.ddim((2, *LATENT), steps=5, eta=1.0, **kw),
    "dpmpp": lambda s, **kw: s.dpmpp((2, *LATENT), steps=5, **kw),
}


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_is_seeded(sampler, name):
    run = SAMPLERS[name]
    a, b, c = run(sampler, seed=3), run(sampler, seed=3), run(sampler, seed=4)
    assert a.shape == (2, *LATENT) and a.dtype == tf.float32
    assert np.all(np.isfinite(a.numpy()))
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert max_abs_diff([a.numpy()], [c.numpy()]) > 0.1


def test_sampler_reuses_its_trace_across_seeds(unet):
    s = D.Sampler(unet, D.make_schedule("linear", 20))
    s.ddim((2, *LATENT), steps=3, seed=0)
    s.ddim((2, *LATENT), steps=3, seed=1)
    assert s._ddim_fn.experimental_get_tracing_count() == 1
    s.ddim((2, *LATENT), steps=4, seed=1)  # a new setting is a new trace
    assert s._ddim_fn.experimental_get_tracing_count() == 2


def test_dpmpp_reuses_its_trace_across_seeds_and_initial_noises(unet):
    s = D.Sampler(unet, D.make_schedule("linear", 20))
    s.dpmpp((2, *LATENT), steps=5, seed=0)
    s.dpmpp((2, *LATENT), steps=5, seed=1)
    assert s._dpmpp_fn.experimental_get_tracing_count() == 1
    for seed in (2, 3):  # a given x_T is a tensor argument too (one more trace for "given")
        s.dpmpp((2, *LATENT), steps=5, seed=seed, initial_noise=tf.random.stateless_normal((2, *LATENT), [seed, 1]))
    assert s._dpmpp_fn.experimental_get_tracing_count() == 2
    s.dpmpp((2, *LATENT), steps=6, seed=1)  # a new setting is a new trace
    assert s._dpmpp_fn.experimental_get_tracing_count() == 3


@pytest.mark.parametrize("clip_x0", [None, 0.5])
def test_dpmpp_with_at_most_three_steps_is_ddim(clip_x0):
    """S <= 3 uses first-order steps only (first step, step onto index 0, final x0_hat), and the
    first-order DPM-Solver++ step is DDIM's (eta = 0), clipped or not; S = 5 has second-order
    steps and differs. rtol/atol 1e-5: float32 round-off of two algebraically equal updates.
    (The analytic Gaussian predictor, not the UNet: the same check, without UNet traces.)"""
    schedule = D.make_schedule("linear", 20)
    sampler = D.Sampler(gaussian_eps(schedule), schedule)
    for steps in (1, 2, 3):
        ddim = sampler.ddim((2, *LATENT), steps=steps, seed=6, clip_x0=clip_x0).numpy()
        dpmpp = sampler.dpmpp((2, *LATENT), steps=steps, seed=6, clip_x0=clip_x0).numpy()
        np.testing.assert_allclose(dpmpp, ddim, rtol=1e-5, atol=1e-5, err_msg=f"steps={steps}")
    ddim = sampler.ddim((2, *LATENT), steps=5, seed=6, clip_x0=clip_x0).numpy()
    assert max_abs_diff([sampler.dpmpp((2, *LATENT), steps=5, seed=6, clip_x0=clip_x0).numpy()], [ddim]) > 1e-3


def test_ddpm_equals_ddim_with_every_step_and_eta_one(sampler):
    ddpm = sampler.ddpm((2, *LATENT), seed=7).numpy()
    ddim = sampler.ddim((2, *LATENT), steps=20, eta=1.0, seed=7).numpy()
    np.testing.assert_allclose(ddim, ddpm, atol=1e-4 * np.abs(ddpm).max())
    deterministic = sampler.ddim((2, *LATENT), steps=20, eta=0.0, seed=7).numpy()
    assert max_abs_diff([deterministic], [ddpm]) > 0.1


def point_mass_start(schedule, x0, seed):
    """x_T drawn from the true q(x_T | x_0) (not N(0, I)), and its noise z: x_T = sqrt(ab) x0 + sqrt(1 - ab) z."""
    z = tf.random.stateless_normal(x0.shape, seed=[seed, 0]).numpy()
    ab = schedule.alphas_cumprod.numpy()[-1]
    return (np.sqrt(ab) * x0 + np.sqrt(1.0 - ab) * z).astype(np.float32), z


@pytest.mark.parametrize("steps", [4, 1])
def test_ddim_eta0_with_the_exact_noise_retraces_the_forward_path(steps):
    """Data = one point x0 and eps_hat exact: x0_hat = x0 and eps_hat = z at every step, so every
    DDIM (eta = 0) state at index t is exactly sqrt(ab_t) x0 + sqrt(1 - ab_t) z, ending at x0.
    That pins x0_hat and the sqrt(ab_prev) and direction coefficients of each update (by hand,
    1% off in sqrt(alpha_bar) or alpha_bar moves the states by 0.03 and 0.2); 1e-5 is float32
    round-off, amplified by 1 / sqrt(ab_T) ~ 6."""
    schedule = D.make_schedule("linear", 20, 1e-3, 0.3)
    x0 = np.random.default_rng(1).standard_normal((3, *LATENT)).astype(np.float32)
    x_T, z = point_mass_start(schedule, x0, seed=2)
    sampler = D.Sampler(Oracle(schedule, x0), schedule)
    final, states, labels = sampler.ddim(x0.shape, steps=steps, eta=0.0, initial_noise=x_T, num_intermediates=steps + 1)
    ab = np.concatenate([[1.0], schedule.alphas_cumprod.numpy()])  # by label: label L is index L - 1
    expected = (
        np.sqrt(ab[labels])[:, None, None, None, None] * x0 + np.sqrt(1.0 - ab[labels])[:, None, None, None, None] * z
    )
    np.testing.assert_allclose(states.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(final.numpy(), x0, atol=1e-5)


@pytest.mark.parametrize("steps", [6, 20, 1])
def test_dpmpp_with_the_exact_noise_retraces_the_forward_path(steps):
    """Data = one point x0 and eps_hat exact: x0_hat = x0 at every step, and the exponential
    integrator is exact for a constant x0_hat whatever the weights (1 + 1/(2r), -1/(2r)) if they
    sum to 1: x_p = (sigma_p / sigma_t) (alpha_t x0 + sigma_t z) + alpha_p (1 - e^-h) x0 with
    e^-h = alpha_t sigma_p / (sigma_t alpha_p) is alpha_p x0 + sigma_p z. So every state at index t
    is sqrt(ab_t) x0 + sqrt(1 - ab_t) z and the sample is x0 (S = 6 and 20 include second-order
    steps; S = 20 = T visits every index). 1e-5: float32 round-off, amplified by 1 / sqrt(ab_T) ~ 6."""
    schedule = D.make_schedule("linear", 20, 1e-3, 0.3)
    x0 = np.random.default_rng(1).standard_normal((3, *LATENT)).astype(np.float32)
    x_T, z = point_mass_start(schedule, x0, seed=2)
    sampler = D.Sampler(Oracle(schedule, x0), schedule)
    final, states, labels = sampler.dpmpp(x0.shape, steps=steps, initial_noise=x_T, num_intermediates=steps + 1)
    ab = np.concatenate([[1.0], schedule.alphas_cumprod.numpy()])  # by label: label L is index L - 1
    expected = (
        np.sqrt(ab[labels])[:, None, None, None, None] * x0 + np.sqrt(1.0 - ab[labels])[:, None, None, None, None] * z
    )
    np.testing.assert_allclose(states.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(final.numpy(), x0, atol=1e-5)


@pytest.mark.parametrize(
    "run",
    [
        lambda s, **kw: s.ddpm((5000, 2, 2, 1), num_intermediates=21, **kw),
        lambda s, **kw: s.ddim((5000, 2, 2, 1), steps=5, eta=1.0, num_intermediates=6, **kw),
    ],
    ids=["ddpm", "ddim-eta1"],
)
def test_stochastic_samplers_with_the_exact_noise_follow_the_forward_marginals(run):
    """Data = one point x0 and eps_hat exact: then q(x_{t-1} | x_t, x0) is the true reverse kernel,
    so started from q(x_T | x0), DDPM (and DDIM, eta = 1) states at index t are distributed as
    q(x_t | x0) = N(sqrt(ab_t) x0, 1 - ab_t), and the noise-free last step returns x0 itself.

    Per state the standardised residual r = (x - sqrt(ab_t) x0) / sqrt(1 - ab_t) of 20,000
    elements must be N(0, 1): |mean| < 0.035 and |std - 1| < 0.025 are 5 standard errors
    (1 / sqrt(N) and 1 / sqrt(2N)). By hand, DDPM fails it with c1 or c2 1% off or beta~ 10% off."""
    schedule = D.make_schedule("linear", 20, 1e-3, 0.3)
    x0 = np.tile(np.array([1.5, -0.5, 0.0, 2.0], np.float32).reshape(1, 2, 2, 1), (5000, 1, 1, 1))
    x_T, _ = point_mass_start(schedule, x0, seed=3)
    final, states, labels = run(D.Sampler(Oracle(schedule, x0), schedule), seed=4, initial_noise=x_T)
    states = states.numpy().astype(np.float64)
    assert labels[0] == 20 and labels[-1] == 0
    ab = schedule.alphas_cumprod.numpy().astype(np.float64)
    for state, label in zip(states[:-1], labels[:-1], strict=True):
        r = (state - np.sqrt(ab[label - 1]) * x0) / np.sqrt(1.0 - ab[label - 1])
        assert abs(r.mean()) < 0.035 and abs(r.std() - 1.0) < 0.025, (label, r.mean(), r.std())
    np.testing.assert_allclose(final.numpy(), x0, atol=1e-5)


# Gaussian data x0 ~ N(MU, SIGMA^2) per element, whose exact noise predictor is known.
MU, SIGMA = 0.5, 0.5
GAUSSIAN_SHAPE = (2000, 10, 1, 1)  # N = 20,000 independent samples

# name: (run, (mean tolerance, relative std tolerance)). With S = T the samplers are nearly exact:
# a float64 propagation of these updates' mean and variance gives biases of at most 0.0016 in the
# mean and 0.8% in the std (DDPM's "fixed small" variance), and 20,000 samples add a standard error
# of SIGMA / sqrt(N) = 0.0035 to the mean and 1 / sqrt(2N) = 0.5% to the std, so 0.015 and 3% leave
# about 4 standard errors on top of the bias (float32 is far below both). S = 50 DDIM has a real
# discretisation bias (float64: std 3-6% low at eta 0, 7-11% low at eta 1), hence 0.02 and 15%.
GAUSSIAN_RUNS = {
    "ddpm": (lambda s: s.ddpm(GAUSSIAN_SHAPE, seed=0), (0.015, 0.03)),
    "ddim-eta0-S=T": (lambda s: s.ddim(GAUSSIAN_SHAPE, steps=1000, eta=0.0, seed=0), (0.015, 0.03)),
    "ddim-eta1-S=T": (lambda s: s.ddim(GAUSSIAN_SHAPE, steps=1000, eta=1.0, seed=0), (0.015, 0.03)),
    "ddim-eta0-S=50": (lambda s: s.ddim(GAUSSIAN_SHAPE, steps=50, eta=0.0, seed=0), (0.02, 0.15)),
    "ddim-eta1-S=50": (lambda s: s.ddim(GAUSSIAN_SHAPE, steps=50, eta=1.0, seed=0), (0.02, 0.15)),
}


def gaussian_eps(schedule, mu=MU, sigma=SIGMA):
    """The exact noise predictor E[eps | x_t] for x0 ~ N(mu, sigma^2) per element.

    x_t = sqrt(a) x0 + sqrt(1 - a) eps (a = alpha_bar_t) and eps are jointly Gaussian, so
    E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a sigma^2 + 1 - a).
    """

    def network(x_t, t, training=False):
        a = tf.reshape(tf.gather(schedule.alphas_cumprod, t), [-1, 1, 1, 1])
        return tf.sqrt(1.0 - a) * (x_t - tf.sqrt(a) * mu) / (a * sigma**2 + 1.0 - a)

    return network


def gaussian_sample_moments(kind, name, sampler_schedule=None):
    """(mean, std) of GAUSSIAN_RUNS[name] on the T = 1000 ``kind`` schedule, fed the exact predictor.

    ``sampler_schedule`` (default: the same schedule) is what the sampler uses, to perturb it alone.
    """
    schedule = D.make_schedule(kind, 1000)
    sampler = D.Sampler(gaussian_eps(schedule), schedule if sampler_schedule is None else sampler_schedule)
    x = GAUSSIAN_RUNS[name][0](sampler).numpy().astype(np.float64)
    return x.mean(), x.std()


@pytest.mark.parametrize("name", GAUSSIAN_RUNS)
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_samplers_reproduce_gaussian_data_from_its_exact_noise_predictor(kind, name):
    """Fed the exact eps for N(MU, SIGMA^2) data, DDPM and DDIM must sample N(MU, SIGMA^2).

    Unlike a single-point data set (where x0_hat = x0 whatever the coefficients), this needs
    the right posterior mean/variance and DDIM coefficients; tolerances: see GAUSSIAN_RUNS.
    """
    mean_tol, std_tol = GAUSSIAN_RUNS[name][1]
    mean, std = gaussian_sample_moments(kind, name)
    assert abs(mean - MU) < mean_tol, (mean, std)
    assert abs(std / SIGMA - 1.0) < std_tol, (mean, std)


@pytest.mark.parametrize(
    "name,field",
    [("ddpm", "posterior_mean_coef1"), ("ddim-eta0-S=50", "sqrt_alphas_cumprod")],
    ids=["ddpm-c1", "ddim-x0-hat"],
)
def test_gaussian_check_catches_a_one_percent_coefficient_error(name, field):
    """The check above can fail: 1.01 x c1 (DDPM) or x0_hat / 1.01 (DDIM, via sqrt(alpha_bar)) in
    the sampler's schedule alone moves the sample mean by more than twice its tolerance (by hand:
    0.539 and 0.431 for MU = 0.5; 1.01 x c2 diverges to ~10)."""
    schedule = D.make_schedule("linear", 1000)
    perturbed = dataclasses.replace(schedule, **{field: getattr(schedule, field) * 1.01})
    mean, _ = gaussian_sample_moments("linear", name, sampler_schedule=perturbed)
    assert abs(mean - MU) > 2 * GAUSSIAN_RUNS[name][1][0], mean


def dpmpp_gaussian_map(schedule, steps, mu=MU, sigma=SIGMA):
    """(A, c) of DPM-Solver++(2M) fed ``gaussian_eps``: its sample is exactly A x_T + c.

    An independent float64 statement of the method (time-uniform indices T-1 ... 0, then the
    clean data; first order at the first step, onto index 0 and at the end), propagated through
    the affine maps x -> eps_hat -> x0_hat, on the schedule's stored values.
    """
    T = schedule.timesteps
    alpha_bar = schedule.alphas_cumprod.numpy().astype(np.float64)
    alpha = schedule.sqrt_alphas_cumprod.numpy().astype(np.float64)
    sig = schedule.sqrt_one_minus_alphas_cumprod.numpy().astype(np.float64)
    lam = np.log(alpha / sig)
    points = np.round(np.linspace(T - 1, 0, steps)).astype(int)

    def x0_hat(t, x):  # x = (A, c); eps_hat = sqrt(1 - a) (x - sqrt(a) mu) / (a sigma^2 + 1 - a)
        a = alpha_bar[t]
        k = (1.0 - a) / (a * sigma**2 + 1.0 - a)
        return (x[0] * (1.0 - k) / alpha[t], (x[1] * (1.0 - k) + k * alpha[t] * mu) / alpha[t])

    x, prev, h_prev = (1.0, 0.0), None, None
    for k in range(steps - 1):
        t, p = points[k], points[k + 1]
        m, h = x0_hat(t, x), lam[p] - lam[t]
        if k == 0 or p == 0:
            d = m
        else:
            q = h / (2.0 * h_prev)  # 1 / (2r)
            d = tuple((1.0 + q) * m[j] - q * prev[j] for j in range(2))
        x = tuple(sig[p] / sig[t] * x[j] - alpha[p] * np.expm1(-h) * d[j] for j in range(2))
        prev, h_prev = m, h
    return x0_hat(points[-1], x)


def gaussian_x_T(seed=5):
    return tf.random.stateless_normal(GAUSSIAN_SHAPE, seed=[seed, 0]).numpy()


# Tolerances of |std / SIGMA - 1| for DPM-Solver++ (kind, S). The float64 map above gives the
# real discretisation bias of the std (its mean bias is below 0.002, from x_T ~ N(0, 1) instead
# of the true q(x_T)): linear -21.5% (S = 10), -4.7% (20), +0.3% (50); cosine -6.1%, -0.3%,
# +0.2%. 20,000 samples add a standard error of 0.5% to the std and 0.0035 to the mean, so
# bias + 2.5% (5 s.e.) for the std and 0.02 for the mean.
DPMPP_STD_TOL = {
    ("linear", 10): 0.24,
    ("linear", 20): 0.075,
    ("linear", 50): 0.03,
    ("cosine", 10): 0.09,
    ("cosine", 20): 0.03,
    ("cosine", 50): 0.03,
}
# float32 against the float64 map (|x_T| <= 4.1), measured: <= 1.4e-6 linear; <= 2.5e-4 cosine, whose
# first x0_hat divides a float32 difference of nearly equal numbers by sqrt(alpha_bar_{T-1}) = 5e-5
# (DDIM's does too). A 1% error in a coefficient moves the linear samples by 1e-3 or more (next test).
DPMPP_MAP_ATOL = {"linear": 2e-5, "cosine": 1e-3}


@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_dpmpp_reproduces_gaussian_data_from_its_exact_noise_predictor(kind, steps):
    """Fed the exact eps for N(MU, SIGMA^2) data, DPM-Solver++ samples it up to its discretisation
    bias (tolerances: DPMPP_STD_TOL), and each sample is the float64 map's A x_T + c."""
    schedule = D.make_schedule(kind, 1000)
    x_T = gaussian_x_T()
    x = D.Sampler(gaussian_eps(schedule), schedule).dpmpp(GAUSSIAN_SHAPE, steps=steps, initial_noise=x_T).numpy()
    x = x.astype(np.float64)
    assert abs(x.mean() - MU) < 0.02, (x.mean(), x.std())
    assert abs(x.std() / SIGMA - 1.0) < DPMPP_STD_TOL[kind, steps], (x.mean(), x.std())
    a, c = dpmpp_gaussian_map(schedule, steps)
    np.testing.assert_allclose(x, a * x_T + c, rtol=0, atol=DPMPP_MAP_ATOL[kind])


@pytest.mark.parametrize("coefficient", ["second-order", "alpha"])
def test_dpmpp_gaussian_check_catches_a_one_percent_coefficient_error(monkeypatch, coefficient):
    """1.01 x the second-order correction 1/(2r) (both weights, so they still sum to 1) or 1.01 x
    alpha_p in c_d, in the sampler alone, moves the samples off the float64 map by far more than
    DPMPP_MAP_ATOL (by hand: 2.1e-3 and 7.5e-2 at most). Their moments alone would miss both at
    S = 20: the std moves by 0.1 and 2.8 points (from -5.1%) and the mean by 0 and 0.018, all
    within the tolerances of 7.5% and 0.02 that the discretisation bias needs."""
    original = D._dpmpp_coefficients

    def perturbed(schedule, visited):
        coef = original(schedule, visited).copy()
        if coefficient == "second-order":  # (w, w_prev) = (1 + q, -q) -> (1 + 1.01 q, -1.01 q)
            coef[:, 2], coef[:, 3] = 1.0 + 1.01 * (coef[:, 2] - 1.0), 1.01 * coef[:, 3]
        else:
            coef[:, 1] *= 1.01
        return coef

    monkeypatch.setattr(D, "_dpmpp_coefficients", perturbed)
    schedule = D.make_schedule("linear", 1000)
    x_T = gaussian_x_T()
    x = D.Sampler(gaussian_eps(schedule), schedule).dpmpp(GAUSSIAN_SHAPE, steps=20, initial_noise=x_T).numpy()
    a, c = dpmpp_gaussian_map(schedule, 20)
    assert np.max(np.abs(x - (a * x_T + c))) > 20 * DPMPP_MAP_ATOL["linear"]


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_dpmpp_20_beats_ddim_20_and_50_on_gaussian_data(kind):
    """|std / SIGMA - 1| from the same x_T (so the sampling noise is common): DPM-Solver++ with 20
    network calls against DDIM (eta = 0) with 20 and 50. Float64 biases: linear 4.7% against 13.9%
    and 5.6%; cosine 0.3% against 7.8% and 3.1%. Measured (this x_T's std is 0.42% low, which
    shifts every one): 5.1%, 14.3%, 6.0% and 0.75%, 8.2%, 3.5%."""
    schedule = D.make_schedule(kind, 1000)
    sampler = D.Sampler(gaussian_eps(schedule), schedule)
    x_T = gaussian_x_T()

    def std_error(x):
        return abs(float(np.std(x.numpy().astype(np.float64))) / SIGMA - 1.0)

    dpmpp = std_error(sampler.dpmpp(GAUSSIAN_SHAPE, steps=20, initial_noise=x_T))
    ddim20 = std_error(sampler.ddim(GAUSSIAN_SHAPE, steps=20, initial_noise=x_T))
    ddim50 = std_error(sampler.ddim(GAUSSIAN_SHAPE, steps=50, initial_noise=x_T))
    assert dpmpp < 0.5 * ddim20 and dpmpp < ddim50, (dpmpp, ddim20, ddim50)


def test_ddpm_last_step_is_the_posterior_mean_without_noise():
    T = 5
    s = D.make_schedule("linear", T, 0.1, 0.5)  # large betas: any added noise is visible
    final, states, labels = D.ddpm_sample(ZeroNoise(), s, (4, *LATENT), seed=2, num_intermediates=T + 1)
    final, states = final.numpy(), states.numpy()
    assert states.shape == (T + 1, 4, *LATENT)
    np.testing.assert_array_equal(labels, [5, 4, 3, 2, 1, 0])
    np.testing.assert_array_equal(states[-1], final)
    c1, c2 = s.posterior_mean_coef1.numpy(), s.posterior_mean_coef2.numpy()
    sqrt_ab, post_std = s.sqrt_alphas_cumprod.numpy(), np.sqrt(s.posterior_variance.numpy())
    for k, t in enumerate(range(T - 1, -1, -1)):  # state k -> k + 1 is the step at index t
        mean = c1[t] * states[k] / sqrt_ab[t] + c2[t] * states[k]  # eps_hat = 0
        residual = states[k + 1] - mean
        if t == 0:
            np.testing.assert_allclose(final, mean, rtol=1e-6, atol=1e-6)
        else:  # the earlier steps do add noise of std sqrt(beta~_t)
            assert residual.std() == pytest.approx(post_std[t], rel=0.15)


def test_ddim_eta0_with_zero_noise_rescales_the_initial_noise():
    # eps_hat = 0 and eta = 0: each step multiplies by sqrt(ab_prev / ab), so the result is x_T / sqrt(ab_{T-1}).
    s = D.make_schedule("linear", 20, 1e-3, 0.3)
    final, states, labels = D.ddim_sample(ZeroNoise(), s, (2, *LATENT), steps=4, seed=5, num_intermediates=5)
    np.testing.assert_array_equal(labels, [20, 14, 7, 1, 0])  # indices 19, 13, 6, 0 visited
    np.testing.assert_allclose(final.numpy(), states[0].numpy() / s.sqrt_alphas_cumprod.numpy()[-1], rtol=1e-5)


def test_intermediates_count_shape_and_order(sampler):
    final, states, labels = sampler.ddim((2, *LATENT), steps=4, seed=3, num_intermediates=3)
    assert states.shape == (3, 2, *LATENT) and states.dtype == tf.float32
    np.testing.assert_array_equal(labels, [20, 7, 0])
    np.testing.assert_array_equal(states[-1].numpy(), final.numpy())
    assert np.std(states[0].numpy()) == pytest.approx(1.0, abs=0.2)  # pure N(0, I) noise
    np.testing.assert_array_equal(sampler.ddim((2, *LATENT), steps=4, seed=3).numpy(), final.numpy())
    for bad in (1, 6):
        with pytest.raises(ValueError):
            sampler.ddim((2, *LATENT), steps=4, num_intermediates=bad)
    for bad in (0, 21):
        with pytest.raises(ValueError):
            sampler.ddim((2, *LATENT), steps=bad)


def test_dpmpp_intermediates_count_shape_and_order(sampler):
    final, states, labels = sampler.dpmpp((2, *LATENT), steps=4, seed=3, num_intermediates=3)
    assert final.dtype == tf.float32 and states.shape == (3, 2, *LATENT) and states.dtype == tf.float32
    np.testing.assert_array_equal(labels, [20, 7, 0])  # indices 19, 13, 6, 0 visited, like DDIM's
    np.testing.assert_array_equal(states[-1].numpy(), final.numpy())
    assert np.std(states[0].numpy()) == pytest.approx(1.0, abs=0.2)  # pure N(0, I) noise
    np.testing.assert_array_equal(sampler.dpmpp((2, *LATENT), steps=4, seed=3).numpy(), final.numpy())
    _, _, every = sampler.dpmpp((2, *LATENT), steps=4, seed=3, num_intermediates=5)
    np.testing.assert_array_equal(every, [20, 14, 7, 1, 0])
    for bad in (1, 6):
        with pytest.raises(ValueError):
            sampler.dpmpp((2, *LATENT), steps=4, num_intermediates=bad)
    for bad in (0, 21):
        with pytest.raises(ValueError, match="DPM-Solver"):
            sampler.dpmpp((2, *LATENT), steps=bad)


def test_dpmpp_depends_on_the_initial_noise_alone(sampler):
    final, states, _ = sampler.dpmpp((2, *LATENT), steps=5, seed=3, num_intermediates=2)
    a = sampler.dpmpp((2, *LATENT), steps=5, seed=11, initial_noise=states[0]).numpy()
    b = sampler.dpmpp((2, *LATENT), steps=5, seed=12, initial_noise=states[0]).numpy()
    np.testing.assert_array_equal(a, b)  # the seed is unused once x_T is given
    np.testing.assert_allclose(a, final.numpy(), rtol=1e-6, atol=1e-6)  # and x_T is the seeded one's
    other = sampler.dpmpp((2, *LATENT), steps=5, seed=3, initial_noise=-states[0]).numpy()
    assert max_abs_diff([other], [a]) > 0.1
    with pytest.raises(ValueError):
        sampler.dpmpp((2, *LATENT), steps=5, initial_noise=states[0][:1])


def test_initial_noise_replaces_the_seeded_x_T(sampler):
    final, states, _ = sampler.ddim((2, *LATENT), steps=4, seed=3, num_intermediates=3)
    # eta = 0: the per-step noise is unused, so x_T alone decides the result, whatever the seed.
    again = sampler.ddim((2, *LATENT), steps=4, seed=11, initial_noise=states[0])
    np.testing.assert_allclose(again.numpy(), final.numpy(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        sampler.ddim((2, *LATENT), steps=4, initial_noise=states[0][:1])


def test_ddim_timesteps():
    np.testing.assert_array_equal(D.ddim_timesteps(20, 20), np.arange(20))
    np.testing.assert_array_equal(D.ddim_timesteps(20, 4), [0, 6, 13, 19])
    np.testing.assert_array_equal(D.ddim_timesteps(20, 1), [19])
    for steps in range(2, 51):
        ts = D.ddim_timesteps(50, steps)
        assert len(ts) == steps and ts[0] == 0 and ts[-1] == 49 and np.all(np.diff(ts) > 0)


def test_model_sample_with_dpmpp_returns_the_clipped_x0_estimate():
    """LatentDiffusion.sample(sampler="dpmpp") is the EMA network's Sampler.dpmpp, and the sample is
    the final x0_hat, so with clip_x0 it lies within +-clip_x0 (the untrained network's does not)."""
    schedule = D.make_schedule("linear", 20)
    model = make_model(schedule, seed=2, **FLAT_UNET_KW)
    clipped = model.sample(2, LATENT, sampler="dpmpp", steps=4, seed=9, clip_x0=0.5)
    direct = D.Sampler(model.ema_network, schedule).dpmpp((2, *LATENT), steps=4, seed=9, clip_x0=0.5)
    np.testing.assert_array_equal(clipped.numpy(), direct.numpy())
    assert np.abs(clipped.numpy()).max() <= 0.5
    assert np.abs(model.sample(2, LATENT, sampler="dpmpp", steps=4, seed=9).numpy()).max() > 0.5
    final, states, labels = model.sample(2, LATENT, sampler="dpmpp", steps=4, seed=9, clip_x0=0.5, num_intermediates=5)
    np.testing.assert_array_equal(final.numpy(), clipped.numpy())
    assert states.shape == (5, 2, *LATENT) and list(labels) == [20, 14, 7, 1, 0]
    assert D.SAMPLERS == ("ddim", "ddpm", "dpmpp")
    with pytest.raises(ValueError, match="dpmpp"):
        model.sample(2, LATENT, sampler="euler")


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained():
    """(~20 s) A tiny model fitted with fit() for 200 steps on one fixed batch.

    The batch is one latent x0 repeated, with fixed t spread over [0, T) and fixed eps.

    Fixing t and eps makes the objective a deterministic function of the weights, so the
    loss curve does not depend on which t were drawn (small t are much harder than large).
    """
    keras.utils.set_random_seed(0)
    T, batch_size = 50, 8
    schedule = D.make_schedule("linear", T)
    model = make_model(schedule, ema_decay=0.99, **FLAT_UNET_KW)
    ema_at_start = weights(model.ema_network)
    model.compile(optimizer=keras.optimizers.Adam(4e-3))
    rng = np.random.default_rng(0)
    batch = {
        "latents": np.repeat(rng.standard_normal((1, *LATENT)), batch_size, 0).astype(np.float32),
        "t": np.round(np.linspace(0, T - 1, batch_size)).astype(np.int32),
        "noise": rng.standard_normal((batch_size, *LATENT)).astype(np.float32),
    }
    history = model.fit(
        tf.data.Dataset.from_tensors(batch).repeat(), epochs=10, steps_per_epoch=20, shuffle=False, verbose=0
    )
    return dict(model=model, losses=history.history["loss"], ema_at_start=ema_at_start)


@pytest.mark.slow
def test_fit_lowers_the_loss_tenfold(trained):
    losses = trained["losses"]
    assert np.all(np.isfinite(losses))
    assert losses[0] / losses[-1] >= 10, losses


@pytest.mark.slow  # (the fixture)
def test_ema_lags_the_trained_network(trained):
    model = trained["model"]
    assert max_abs_diff(weights(model.ema_network), weights(model.network)) > 1e-3
    assert max_abs_diff(weights(model.ema_network), trained["ema_at_start"]) > 1e-3


@pytest.mark.slow  # (the fixture)
def test_model_sample_uses_the_ema_network(trained):
    model = trained["model"]
    ema = model.sample(2, LATENT, steps=4, seed=9)
    assert ema.shape == (2, *LATENT) and np.all(np.isfinite(ema.numpy()))
    direct = D.Sampler(model.ema_network, model.schedule).ddim((2, *LATENT), steps=4, seed=9)
    np.testing.assert_array_equal(ema.numpy(), direct.numpy())
    online = model.sample(2, LATENT, steps=4, seed=9, use_ema=False)
    assert max_abs_diff([ema.numpy()], [online.numpy()]) > 1e-3
    final, states, labels = model.sample(2, LATENT, sampler="ddpm", seed=9, num_intermediates=4)
    assert states.shape == (4, 2, *LATENT) and labels[0] == 50 and labels[-1] == 0


@pytest.mark.slow
def test_cosine_schedule_samples_stay_in_the_data_range_with_x0_clipping():
    """(~20 s) A one-level UNet fitted for 200 steps on a toy (4×4×2 latents ±A, A a fixed ±1
    pattern) under the cosine schedule, T = 100: its ᾱ_{T-1} is tiny, so DDIM's first x0
    estimate multiplies the network's error by 1/sqrt(ᾱ) and the unclipped sampler ends
    hundreds of units outside the data. Clipping x0_hat to the training range (runs.generate
    passes the run's latent_max_abs) keeps every sample within it, most near a mode."""
    keras.utils.set_random_seed(0)
    shape = (4, 4, 2)
    pattern = np.where(np.random.default_rng(0).random(shape) > 0.5, 1.0, -1.0).astype(np.float32)
    schedule = D.make_schedule("cosine", 100)
    assert float(schedule.alphas_cumprod[-1]) < 1e-6
    model = D.LatentDiffusion(tiny_unet(**FLAT_UNET_KW), schedule, ema_decay=0.9, seed=1)
    model.build((None, *shape))
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    toy = tf.data.Dataset.from_tensor_slices(np.stack([pattern, -pattern] * 64)).shuffle(128, seed=0)
    model.fit(toy.repeat().batch(32), steps_per_epoch=200, epochs=1, verbose=0)

    unclipped = model.sample(64, shape, steps=10, seed=1).numpy()
    clipped = model.sample(64, shape, steps=10, seed=1, clip_x0=1.0).numpy()
    assert np.abs(unclipped).max() > 10
    assert np.abs(clipped).max() <= 1.0 + 1e-5
    # Mean |x - nearest mode| per element (the two modes are 2 apart): 0.16 measured.
    to_nearest_mode = np.minimum(np.abs(clipped - pattern).mean((1, 2, 3)), np.abs(clipped + pattern).mean((1, 2, 3)))
    assert np.median(to_nearest_mode) < 0.3, to_nearest_mode


def test_ema_starts_as_a_copy_then_follows_the_warmup_decay():
    schedule = D.make_schedule("linear", 20)
    model = make_model(schedule, seed=3, ema_decay=0.999)
    w0, e0 = weights(model.network), weights(model.ema_network)
    np.testing.assert_array_equal(np.concatenate([w.ravel() for w in e0]), np.concatenate([w.ravel() for w in w0]))
    model.compile(optimizer=keras.optimizers.SGD(0.05), run_eagerly=True)
    latents = np.random.default_rng(0).standard_normal((4, *LATENT)).astype(np.float32)
    fit_steps(model, latents, 1)
    w1, e1 = weights(model.network), weights(model.ema_network)
    assert max_abs_diff(w1, w0) > 1e-4
    d = min(0.999, (1 + 1) / (10 + 1))  # warm-up after update n = 1
    for ema, before, after in zip(e1, w0, w1, strict=True):
        np.testing.assert_allclose(ema, d * before + (1 - d) * after, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(model.train_seed.numpy(), [3, 1])

    # evaluate(): the EMA network's loss, no update, training draws untouched.
    batch = {
        "latents": latents,
        "t": np.array([0, 5, 12, 19], np.int32),
        "noise": np.random.default_rng(1).standard_normal((4, *LATENT)).astype(np.float32),
    }
    loss = model.evaluate(tf.data.Dataset.from_tensors(batch), verbose=0)
    expected = D.epsilon_mse(model.ema_network, schedule, batch["latents"], batch["t"], batch["noise"])
    assert loss == pytest.approx(float(expected), rel=1e-5)
    assert max_abs_diff(weights(model.ema_network), e1) == 0.0
    np.testing.assert_array_equal(model.train_seed.numpy(), [3, 1])


def test_save_load_restores_everything_and_resumes_exactly(tmp_path):
    schedule = D.make_schedule("linear", 20)
    latents = np.random.default_rng(0).standard_normal((4, *LATENT)).astype(np.float32)
    x = tf.constant(np.random.default_rng(1).standard_normal((2, *LATENT)), tf.float32)
    t = tf.constant([3, 17])

    a = make_model(schedule, seed=1, **FLAT_UNET_KW)
    a.compile(optimizer=keras.optimizers.Adam(1e-3), run_eagerly=True)
    fit_steps(a, latents, 2)
    a.save_weights(tmp_path / "state.weights.h5")
    a.ema_network.save_weights(tmp_path / "ema.weights.h5")

    keras.utils.set_random_seed(123)  # a different init, overwritten by the load
    b = make_model(schedule, seed=99, **FLAT_UNET_KW)
    b.compile(optimizer=keras.optimizers.Adam(1e-3), run_eagerly=True)
    b.optimizer.build(b.trainable_variables)  # optimizer state loads only into a built optimizer
    b.load_weights(tmp_path / "state.weights.h5")
    assert max_abs_diff(weights(b.network), weights(a.network)) == 0.0
    assert max_abs_diff(weights(b.ema_network), weights(a.ema_network)) == 0.0
    assert max_abs_diff([v.numpy() for v in b.optimizer.variables], [v.numpy() for v in a.optimizer.variables]) == 0
    assert int(b.optimizer.iterations) == 2
    np.testing.assert_array_equal(b.train_seed.numpy(), a.train_seed.numpy())
    np.testing.assert_array_equal(b.network(x, t).numpy(), a.network(x, t).numpy())
    np.testing.assert_array_equal(b.ema_network(x, t).numpy(), a.ema_network(x, t).numpy())

    ema_only = tiny_unet(**FLAT_UNET_KW).build_for(LATENT)  # what predict.py needs
    ema_only.load_weights(tmp_path / "ema.weights.h5")
    np.testing.assert_array_equal(ema_only(x, t).numpy(), a.ema_network(x, t).numpy())

    # Same state + same data = same next steps (weights, Adam moments, EMA and the t/eps draws).
    fit_steps(a, latents, 2)
    fit_steps(b, latents, 2)
    assert max_abs_diff(weights(b), weights(a)) == 0.0


# bfloat16 runs compiled, as in training; float16 runs eagerly (same numerics, and it saves
# a ~15 s compile on CPU). Float16 convolutions do run on CPU, slowly.
@pytest.mark.parametrize("policy", [pytest.param("mixed_bfloat16", marks=pytest.mark.slow), "mixed_float16"])
def test_mixed_precision_training(policy):
    keras.config.set_dtype_policy(policy)  # conftest restores float32 afterwards
    model = make_model(D.make_schedule("linear", 20), **FLAT_UNET_KW)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), run_eagerly=policy == "mixed_float16")
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.network.compute_dtype == policy.split("_")[1]
    latents = np.random.default_rng(0).standard_normal((4, *LATENT)).astype(np.float32)
    w0 = weights(model.network)
    loss = fit_steps(model, latents, 4)
    assert np.isfinite(loss)
    assert all(w.dtype == "float32" for w in model.network.weights + model.ema_network.weights)
    # float16 skips steps whose scaled gradients overflow while the loss scale settles.
    assert int(model.optimizer.iterations) >= 1 and max_abs_diff(weights(model.network), w0) > 0
    assert all(np.all(np.isfinite(w)) for w in weights(model.network) + weights(model.ema_network))
    sample = model.sample(2, LATENT, steps=3)
    assert sample.dtype == tf.float32 and np.all(np.isfinite(sample.numpy()))


@pytest.mark.slow
def test_fit_traces_the_train_step_once(monkeypatch):
    """compile builds Adam's slots (keras_fixes.FitFixes): were they created in the first trace,
    TensorFlow would trace the train step a second time, doubling a fit's start-up."""
    model = make_model(D.make_schedule("linear", 20), **FLAT_UNET_KW)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    assert model.optimizer.built and len(model.optimizer.variables) > 2 * len(model.trainable_variables)
    traces = []
    step = D.LatentDiffusion.train_step
    monkeypatch.setattr(D.LatentDiffusion, "train_step", lambda self, data: traces.append(1) or step(self, data))
    latents = np.random.default_rng(0).standard_normal((4, *LATENT)).astype(np.float32)
    assert np.isfinite(fit_steps(model, latents, 2))
    assert len(traces) == 1


def test_train_step_and_sampler_under_xla():
    model = make_model(D.make_schedule("linear", 20), seed=4, **FLAT_UNET_KW)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=True)
    latents = np.random.default_rng(0).standard_normal((4, *LATENT)).astype(np.float32)
    assert np.isfinite(fit_steps(model, latents, 3))
    assert int(model.optimizer.iterations) == 3
    np.testing.assert_array_equal(model.train_seed.numpy(), [4, 3])
    assert max_abs_diff(weights(model.ema_network), weights(model.network)) > 0
    xla = D.Sampler(model.ema_network, model.schedule, jit_compile=True)
    a, b = xla.ddim((2, *LATENT), steps=3, eta=1.0, seed=1), xla.ddim((2, *LATENT), steps=3, eta=1.0, seed=1)
    assert np.all(np.isfinite(a.numpy()))
    np.testing.assert_array_equal(a.numpy(), b.numpy())


DISTRIBUTED_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import diffusion as D
    import modules

    unet_kw = json.loads(sys.argv[1])
    schedule = D.make_schedule("linear", 20)

    def make(strategy):
        with strategy.scope():
            model = D.LatentDiffusion(modules.UNet(**unet_kw), schedule, ema_decay=0.9, seed=1)
            model.build((None, 8, 8, 2))
            model.compile(optimizer=keras.optimizers.SGD(0.01))  # the update is the gradient itself
        return model

    keras.utils.set_random_seed(0)
    one = make(tf.distribute.get_strategy())
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    two = make(mirrored)
    two.set_weights(one.get_weights())
    start = [w.numpy() for w in one.network.weights]

    rng = np.random.default_rng(0)
    batch = {"latents": rng.standard_normal((4, 8, 8, 2)).astype(np.float32),
             "t": np.array([0, 6, 13, 19], np.int32),
             "noise": rng.standard_normal((4, 8, 8, 2)).astype(np.float32)}
    losses = []
    for model in (one, two):
        history = model.fit(tf.data.Dataset.from_tensors(batch).repeat(), epochs=1, steps_per_epoch=2, verbose=0)
        losses.append(history.history["loss"][0])

    def diff(a, b):
        return max(float(np.max(np.abs(x.numpy() - y.numpy()))) for x, y in zip(a, b))

    result = {
        "replicas": mirrored.num_replicas_in_sync,
        "losses": losses,
        "weights_diff": diff(one.network.weights, two.network.weights),
        "ema_diff": diff(one.ema_network.weights, two.ema_network.weights),
        "moved": max(float(np.max(np.abs(w.numpy() - s))) for w, s in zip(one.network.weights, start)),
    }
    # Random draws: replicas must not share noise, and one step advances the counter once.
    draws = mirrored.run(tf.function(lambda: two._draws(tf.zeros((2, 8, 8, 2)), two.train_seed)[2]))
    replica0, replica1 = mirrored.experimental_local_results(draws)
    result["replica_noise_diff"] = float(tf.reduce_max(tf.abs(replica0 - replica1)))
    result["train_seed"] = two.train_seed.numpy().tolist()
    print("RESULT " + json.dumps(result))
""")


@pytest.mark.slow
def test_mirrored_strategy_matches_one_device():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "-c", DISTRIBUTED_SCRIPT, json.dumps(FLAT_UNET_KW)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT ") :])
    assert r["replicas"] == 2
    # Same batch, same t and eps: the global-batch mean loss and its gradient match one device.
    assert r["losses"][1] == pytest.approx(r["losses"][0], rel=1e-5)
    # A wrong scaling (e.g. a per-replica mean not divided by the replica count) moves the
    # weights by a multiple of the update, far beyond the tolerance.
    assert r["moved"] > 1e-3
    assert r["weights_diff"] < 1e-3 * r["moved"] and r["ema_diff"] < 1e-3 * r["moved"]
    assert r["replica_noise_diff"] > 0.1
    assert r["train_seed"] == [1, 1]
