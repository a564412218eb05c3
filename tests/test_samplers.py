"""Tests of samplers.py: DDPM, DDIM and DPM-Solver++(2M), seeding, traces, and their maths.

The networks are tiny ``modules.UNet``s on 8x8x2 latents, or analytic stand-ins whose exact
sampler outputs are known (``ZeroNoise``, ``Oracle`` for a one-point data set, and
``gaussian_eps`` for Gaussian data). Guided sampling is tested in test_conditioning.py.
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

import config as cfg
import diffusion as D
import samplers as S
from test_diffusion import FLAT_UNET_KW, LATENT, Oracle, VOracle, ZeroNoise, make_model, max_abs_diff, tiny_unet


@pytest.fixture(scope="module")
def unet():
    keras.utils.set_random_seed(1)
    return tiny_unet().build_for(LATENT)


@pytest.fixture(scope="module")
def sampler(unet):
    return S.Sampler(unet, D.make_schedule("linear", 20))


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
    s = S.Sampler(unet, D.make_schedule("linear", 20))
    s.ddim((2, *LATENT), steps=3, seed=0)
    s.ddim((2, *LATENT), steps=3, seed=1)
    assert s._ddim_fn.experimental_get_tracing_count() == 1
    s.ddim((2, *LATENT), steps=4, seed=1)  # a new setting is a new trace
    assert s._ddim_fn.experimental_get_tracing_count() == 2


def test_dpmpp_reuses_its_trace_across_seeds_and_initial_noises(unet):
    s = S.Sampler(unet, D.make_schedule("linear", 20))
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
    sampler = S.Sampler(gaussian_eps(schedule), schedule)
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


def forward_path(schedule, x0, z, labels):
    """The states sqrt(ab) x0 + sqrt(1 - ab) z (K, B, ...) at the sampler's state labels (K,): label
    L is noising step L, schedule index L - 1; label 0 is x0 itself."""
    ab = np.concatenate([[1.0], schedule.alphas_cumprod.numpy()])[labels][:, None, None, None, None]
    return np.sqrt(ab) * x0 + np.sqrt(1.0 - ab) * z


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
    sampler = S.Sampler(Oracle(schedule, x0), schedule)
    final, states, labels = sampler.ddim(x0.shape, steps=steps, eta=0.0, initial_noise=x_T, num_intermediates=steps + 1)
    expected = forward_path(schedule, x0, z, labels)
    np.testing.assert_allclose(states.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(final.numpy(), x0, atol=1e-5)


@pytest.mark.parametrize("sampler_name", ["ddim", "dpmpp"])
def test_a_v_network_with_the_exact_velocity_samples_the_data_point(sampler_name):
    """The exact v of a one-point data set, through the sampler's prediction="v": every DDIM (eta 0)
    and DPM-Solver++ state retraces the forward path to x0 as with the exact eps (above); the same
    network read as an ε-predictor lands elsewhere."""
    schedule = D.make_schedule("cosine", 20)
    x0 = np.random.default_rng(1).standard_normal((3, *LATENT)).astype(np.float32)
    x_T, z = point_mass_start(schedule, x0, seed=2)
    run = getattr(S.Sampler(VOracle(schedule, x0), schedule, prediction="v"), sampler_name)
    final, states, labels = run(x0.shape, steps=5, initial_noise=x_T, num_intermediates=6)
    expected = forward_path(schedule, x0, z, labels)
    np.testing.assert_allclose(states.numpy(), expected, atol=1e-4)
    np.testing.assert_allclose(final.numpy(), x0, atol=1e-4)
    as_eps = getattr(S.Sampler(VOracle(schedule, x0), schedule), sampler_name)(x0.shape, steps=5, initial_noise=x_T)
    assert max_abs_diff([as_eps.numpy()], [x0]) > 0.1
    with pytest.raises(ValueError, match="prediction must be one of"):
        S.Sampler(VOracle(schedule, x0), schedule, prediction="x0")


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
    sampler = S.Sampler(Oracle(schedule, x0), schedule)
    final, states, labels = sampler.dpmpp(x0.shape, steps=steps, initial_noise=x_T, num_intermediates=steps + 1)
    expected = forward_path(schedule, x0, z, labels)
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
    final, states, labels = run(S.Sampler(Oracle(schedule, x0), schedule), seed=4, initial_noise=x_T)
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
    sampler = S.Sampler(gaussian_eps(schedule), schedule if sampler_schedule is None else sampler_schedule)
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
    x = S.Sampler(gaussian_eps(schedule), schedule).dpmpp(GAUSSIAN_SHAPE, steps=steps, initial_noise=x_T).numpy()
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
    original = S._dpmpp_coefficients

    def perturbed(schedule, visited):
        coef = original(schedule, visited).copy()
        if coefficient == "second-order":  # (w, w_prev) = (1 + q, -q) -> (1 + 1.01 q, -1.01 q)
            coef[:, 2], coef[:, 3] = 1.0 + 1.01 * (coef[:, 2] - 1.0), 1.01 * coef[:, 3]
        else:
            coef[:, 1] *= 1.01
        return coef

    monkeypatch.setattr(S, "_dpmpp_coefficients", perturbed)
    schedule = D.make_schedule("linear", 1000)
    x_T = gaussian_x_T()
    x = S.Sampler(gaussian_eps(schedule), schedule).dpmpp(GAUSSIAN_SHAPE, steps=20, initial_noise=x_T).numpy()
    a, c = dpmpp_gaussian_map(schedule, 20)
    assert np.max(np.abs(x - (a * x_T + c))) > 20 * DPMPP_MAP_ATOL["linear"]


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_dpmpp_20_beats_ddim_20_and_50_on_gaussian_data(kind):
    """|std / SIGMA - 1| from the same x_T (so the sampling noise is common): DPM-Solver++ with 20
    network calls against DDIM (eta = 0) with 20 and 50. Float64 biases: linear 4.7% against 13.9%
    and 5.6%; cosine 0.3% against 7.8% and 3.1%. Measured (this x_T's std is 0.42% low, which
    shifts every one): 5.1%, 14.3%, 6.0% and 0.75%, 8.2%, 3.5%."""
    schedule = D.make_schedule(kind, 1000)
    sampler = S.Sampler(gaussian_eps(schedule), schedule)
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
    final, states, labels = S.Sampler(ZeroNoise(), s).ddpm((4, *LATENT), seed=2, num_intermediates=T + 1)
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
    final, states, labels = S.Sampler(ZeroNoise(), s).ddim((2, *LATENT), steps=4, seed=5, num_intermediates=5)
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
    np.testing.assert_array_equal(S.ddim_timesteps(20, 20), np.arange(20))
    np.testing.assert_array_equal(S.ddim_timesteps(20, 4), [0, 6, 13, 19])
    np.testing.assert_array_equal(S.ddim_timesteps(20, 1), [19])
    for steps in range(2, 51):
        ts = S.ddim_timesteps(50, steps)
        assert len(ts) == steps and ts[0] == 0 and ts[-1] == 49 and np.all(np.diff(ts) > 0)


def test_sample_runs_the_sampler_its_options_name():
    """Sampler.sample(shape, options) is the sampler `options.sampler` names with the settings it
    takes (DPM-Solver++: steps, not eta), the options' seed, and the call's clip_x0 and state count."""
    schedule = D.make_schedule("linear", 20)
    s = S.Sampler(make_model(schedule, seed=2, **FLAT_UNET_KW).ema_network, schedule)
    options = cfg.SamplingOptions(sampler="dpmpp", steps=4, seed=9)
    clipped = s.sample((2, *LATENT), options, clip_x0=0.5)
    direct = s.dpmpp((2, *LATENT), steps=4, seed=9, clip_x0=0.5)
    np.testing.assert_array_equal(clipped.numpy(), direct.numpy())
    assert np.abs(clipped.numpy()).max() <= 0.5  # the final x0_hat, clipped
    assert np.abs(s.sample((2, *LATENT), options).numpy()).max() > 0.5
    final, states, labels = s.sample((2, *LATENT), options, clip_x0=0.5, num_intermediates=5)
    np.testing.assert_array_equal(final.numpy(), clipped.numpy())
    assert states.shape == (5, 2, *LATENT) and list(labels) == [20, 14, 7, 1, 0]
    ddim = cfg.SamplingOptions(steps=3, eta=1.0, seed=2)
    np.testing.assert_array_equal(
        s.sample((2, *LATENT), ddim).numpy(), s.ddim((2, *LATENT), steps=3, eta=1.0, seed=2).numpy()
    )
    assert cfg.SAMPLERS == ("ddim", "ddpm", "dpmpp")
    with pytest.raises(ValueError, match="dpmpp"):
        s.sample((2, *LATENT), cfg.SamplingOptions(sampler="euler"))
