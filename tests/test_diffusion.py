"""Tests of diffusion.py: the schedule, q(x_t | x_0), the loss and LatentDiffusion training.

The networks are tiny ``modules.UNet``s on 8x8x2 latents, or analytic stand-ins whose
exact sampler outputs are known (``ZeroNoise``, ``Oracle`` for a one-point data set, and
``gaussian_eps`` for Gaussian data). The tf.distribute
check runs in a subprocess because logical CPU devices must be configured before
TensorFlow initialises its devices.
"""

import dataclasses
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import diffusion as D
import modules
import samplers as S

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


class VOracle(Oracle):
    """The exact velocity for the same one-point data set: v = alpha_t eps - sigma_t x0, with
    alpha_t = sqrt(ab_t), sigma_t = sqrt(1 - ab_t) and eps the exact noise of ``Oracle``."""

    def call(self, x_t, t, training=None):
        alpha = tf.reshape(tf.gather(self.schedule.sqrt_alphas_cumprod, t), [-1, 1, 1, 1])
        sigma = tf.reshape(tf.gather(self.schedule.sqrt_one_minus_alphas_cumprod, t), [-1, 1, 1, 1])
        return alpha * super().call(x_t, t) - sigma * self.x0


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


def test_min_snr_weighting_scales_each_example_by_min_snr_gamma_over_snr():
    """Min-SNR-γ (Hang et al. 2023): each example's ε-MSE × min(SNR_t, γ) / SNR_t, SNR_t = ᾱ_t / (1 − ᾱ_t):
    weight 1 at the noisy steps (SNR < γ), γ / SNR below 1 at the clean ones; γ = 0 is unweighted."""
    s = D.make_schedule("linear", 20, 1e-3, 0.3)
    x0 = np.zeros((4, *LATENT), np.float32)
    t = tf.constant([0, 3, 10, 19])
    noise = tf.random.stateless_normal(x0.shape, seed=[5, 6])
    per_example = tf.reduce_mean(noise**2, axis=[1, 2, 3]).numpy()
    alpha_bar = s.alphas_cumprod.numpy()[[0, 3, 10, 19]].astype(np.float64)
    snr = alpha_bar / (1 - alpha_bar)
    assert snr[0] > 5 > snr[-1]  # both sides of γ = 5
    weights = np.minimum(snr, 5.0) / snr
    got = float(D.epsilon_mse(ZeroNoise(), s, x0, t, noise, min_snr_gamma=5.0))
    assert got == pytest.approx(float(np.mean(weights * per_example)), rel=1e-5)
    assert weights[-1] == 1.0 and weights[0] < 0.5
    assert float(D.epsilon_mse(ZeroNoise(), s, x0, t, noise, min_snr_gamma=0.0)) == pytest.approx(
        float(np.mean(per_example)), rel=1e-6
    )
    with pytest.raises(ValueError, match="min_snr_gamma must be >= 0"):
        D.LatentDiffusion(ZeroNoise(), s, min_snr_gamma=-1.0)


def test_predict_eps_of_a_v_network_is_the_exact_noise():
    """eps_hat = sigma_t x_t + alpha_t v_hat: the exact v gives the exact eps (so a zero loss), and
    the same network read as an ε-predictor does not."""
    s = D.make_schedule("cosine", 20)
    x0 = np.random.default_rng(0).standard_normal((4, *LATENT)).astype(np.float32)
    t = tf.constant([0, 5, 12, 19])
    noise = tf.random.stateless_normal(x0.shape, seed=[3, 4])
    x_t = D.q_sample(s, x0, t, noise)
    eps_hat = D.predict_eps(VOracle(s, x0), x_t, t, prediction="v", schedule=s)
    np.testing.assert_allclose(eps_hat.numpy(), noise.numpy(), atol=1e-4)
    assert float(D.epsilon_mse(VOracle(s, x0), s, x0, t, noise, prediction="v")) < 1e-8
    assert float(D.epsilon_mse(VOracle(s, x0), s, x0, t, noise)) > 0.1  # read as eps: wrong
    with pytest.raises(ValueError, match="needs its noise schedule"):
        D.predict_eps(VOracle(s, x0), x_t, t, prediction="v")
    with pytest.raises(ValueError, match="prediction must be one of"):
        D.predict_eps(VOracle(s, x0), x_t, t, prediction="x0", schedule=s)
    with pytest.raises(ValueError, match="prediction must be one of"):
        D.LatentDiffusion(ZeroNoise(), s, prediction="x0")


def test_the_loss_of_a_v_network_is_min_snr_weighted_v_mse():
    """For a v-network the ε-MSE with Min-SNR-γ is the v-prediction loss of Hang et al. 2023 (eq. 10):
    each example's mean (v - v_hat)^2 × min(SNR_t, γ) / (SNR_t + 1); without γ, × ᾱ_t. Here
    v_hat = 0, so (v - v_hat)^2 = v^2 with v = sqrt(ᾱ) eps - sqrt(1 - ᾱ) x0 (NumPy, float64)."""
    s = D.make_schedule("cosine", 20)
    rng = np.random.default_rng(2)
    x0 = rng.standard_normal((4, *LATENT)).astype(np.float32)
    noise = rng.standard_normal((4, *LATENT)).astype(np.float32)
    index = [0, 3, 10, 19]
    alpha_bar = s.alphas_cumprod.numpy()[index].astype(np.float64)
    snr = alpha_bar / (1 - alpha_bar)
    assert snr[0] > 5 > snr[-1]  # both sides of γ = 5
    a, b = np.sqrt(alpha_bar)[:, None, None, None], np.sqrt(1 - alpha_bar)[:, None, None, None]
    v_mse = np.mean((a * noise - b * x0) ** 2, axis=(1, 2, 3))
    for gamma, weights in ((5.0, np.minimum(snr, 5.0) / (snr + 1)), (0.0, alpha_bar)):
        got = float(D.epsilon_mse(ZeroNoise(), s, x0, tf.constant(index), noise, min_snr_gamma=gamma, prediction="v"))
        assert got == pytest.approx(float(np.mean(weights * v_mse)), rel=1e-5), gamma


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
def test_the_ema_network_samples_otherwise_than_the_trained_one(trained):
    model = trained["model"]
    ema = S.Sampler(model.ema_network, model.schedule).ddim((2, *LATENT), steps=4, seed=9)
    assert ema.shape == (2, *LATENT) and np.all(np.isfinite(ema.numpy()))
    online = S.Sampler(model.network, model.schedule).ddim((2, *LATENT), steps=4, seed=9)
    assert max_abs_diff([ema.numpy()], [online.numpy()]) > 1e-3
    final, states, labels = S.Sampler(model.ema_network, model.schedule).ddpm((2, *LATENT), seed=9, num_intermediates=4)
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
    model.fit(toy.repeat().batch(32), steps_per_epoch=200, epochs=1, shuffle=False, verbose=0)

    sampler = S.Sampler(model.ema_network, schedule)
    unclipped = sampler.ddim((64, *shape), steps=10, seed=1).numpy()
    clipped = sampler.ddim((64, *shape), steps=10, seed=1, clip_x0=1.0).numpy()
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
    sample = S.Sampler(model.ema_network, model.schedule).ddim((2, *LATENT), steps=3)
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
    xla = S.Sampler(model.ema_network, model.schedule, jit_compile=True)
    a, b = xla.ddim((2, *LATENT), steps=3, eta=1.0, seed=1), xla.ddim((2, *LATENT), steps=3, eta=1.0, seed=1)
    assert np.all(np.isfinite(a.numpy()))
    np.testing.assert_array_equal(a.numpy(), b.numpy())
