"""The diffusion process on latents: noise schedule, q(x_t | x_0), samplers, training model.

Everything here is independent of the network architecture (as in improved-diffusion):
the noise predictor is passed in as ``network`` and only has to honour the contract

    network(x_t, t, training=...) -> eps_hat           (unconditional)
    network(x_t, t, cond, training=...) -> eps_hat     (conditional; only called so when
                                                        a cond tensor is given)
        x_t      (B, h, w, c) float32 latents at noise level t
        t        (B,) int32 schedule indices in [0, T)
        cond     (B, K) float32 normalised condition variables, NaN = unknown
        eps_hat  (B, h, w, c) predicted noise (any float dtype; cast to float32 here)

Indexing convention (used everywhere in this file)
--------------------------------------------------
Schedule index t runs over 0..T-1 and index t holds beta_t, alpha_t = 1 - beta_t and
alpha_bar_t = prod_{s<=t} alpha_s. ``q_sample(x0, t)`` draws the latent after t + 1
noising steps, i.e. the paper's x_{t+1}; there is no off-by-one shift of alpha_bar (the
original design used alpha_bar_{t-1} here, which is the defect fixed). So alpha_bar_0 =
1 - beta_0 and the sampler's last step (index 0) returns the clean estimate x0_hat.

Forward process (closed form, Ho et al. 2020, eq. 4):

    q(x_t | x_0) = N( sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I )
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,   eps ~ N(0, I)

Training minimises the epsilon-prediction MSE  E || eps - network(x_t, t) ||^2  with
t ~ U{0, ..., T-1}.

Classifier-free guidance (Ho & Salimans 2022): a conditional network is trained with
each variable replaced by "unknown" (NaN) with probability ``cond_dropout``, so it also
predicts eps_u = eps(x_t, t, unknown). Samplers given a cond and a guidance weight w != 1
use  eps_hat = eps_u + w (eps_c - eps_u)  (w = 1: the conditional prediction alone,
w = 0: the unconditional one), both halves from one network call on a doubled batch.

Samplers (all run their whole loop in one compiled ``tf.function``/``tf.while_loop``,
batched, seeded with stateless RNG so a seed always gives the same latents; ``SAMPLERS``
names them for ``LatentDiffusion.sample``). Each forms x0_hat = (x_t - sqrt(1 - alpha_bar_t)
eps_hat) / sqrt(alpha_bar_t) (optionally clipped) and returns the last one, at index 0:

* DDPM ancestral sampling: x_{t-1} ~ q(x_{t-1} | x_t, x0_hat), the Gaussian posterior
  with mean  c1_t x0_hat + c2_t x_t  and the "fixed small" variance
  beta~_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t); no noise at the last step.
* DDIM (Song et al. 2021) on S <= T evenly spaced indices; eta = 0 is deterministic,
  eta = 1 with S = T is exactly DDPM.
* DPM-Solver++(2M) (Lu et al. 2022), deterministic, on the same S indices. With
  alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), lambda_t = log(alpha_t / sigma_t)
  and h = lambda_next - lambda_t, one step is the exponential integrator of the probability
  flow ODE in data-prediction form,
      x_next = (sigma_next / sigma_t) x_t - alpha_next (exp(-h) - 1) D,
  with D = x0_hat (first order: the first step, the step onto index 0, and the final
  step to the clean data, sigma = 0, which returns x0_hat) or, in between, the multistep
  second-order D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_prev, r = h_prev / h.

``LatentDiffusion`` is a ``keras.Model`` with a custom ``train_step`` (in the spirit of the
keras.io DDIM example), so ``fit()`` gives callbacks, progress bars, ``tf.distribute``,
mixed precision and XLA; it keeps an exponential moving average (EMA) copy of the network
that is used for sampling.

Latents are expected already multiplied by the latent scale factor (unit std); samplers
return latents on that same scale (the caller divides by the factor and decodes).
"""

from __future__ import annotations

import dataclasses
import math
import random

import keras
import numpy as np
import tensorflow as tf

from keras_fixes import FitFixes

__all__ = [
    "NoiseSchedule",
    "make_schedule",
    "q_sample",
    "epsilon_mse",
    "Sampler",
    "ddpm_sample",
    "ddim_sample",
    "ddim_timesteps",
    "dpmpp_sample",
    "LatentDiffusion",
    "SAMPLERS",
]

SCHEDULE_KINDS = ("linear", "cosine")
SAMPLERS = ("ddim", "ddpm", "dpmpp")  # the ``sampler`` names LatentDiffusion.sample accepts

# Stateless RNG algorithm, fixed rather than "auto_select" so a seed's numbers do not depend
# on what TF picks for a device. Note: XLA-compiled code (jit_compile=True) lays out Philox
# differently and draws other (equally valid) numbers from the same seed than TF's kernels.
RNG_ALG = "philox"


# --------------------------------------------------------------------------- schedule


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hash by identity (tensors are unhashable)
class NoiseSchedule:
    """Per-timestep constants of a discrete diffusion process with T steps.

    Every tensor field is a float32 ``tf.Tensor`` of shape (T,), indexed by the schedule
    index t in [0, T) (see the module docstring for the convention); all were computed in
    float64 NumPy and rounded once.

    Attributes:
        kind: "linear" or "cosine".
        timesteps: T.
        betas: beta_t in (0, 1).
        alphas: alpha_t = 1 - beta_t.
        alphas_cumprod: alpha_bar_t = prod_{s<=t} alpha_s, strictly decreasing in (0, 1).
        alphas_cumprod_prev: alpha_bar_{t-1}, with alpha_bar_{-1} = 1.
        sqrt_alphas_cumprod: sqrt(alpha_bar_t), the signal coefficient of q(x_t | x_0).
        sqrt_one_minus_alphas_cumprod: sqrt(1 - alpha_bar_t), its noise std.
        posterior_variance: beta~_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t),
            the variance of q(x_{t-1} | x_t, x_0); exactly 0 at t = 0.
        posterior_mean_coef1: c1_t = beta_t sqrt(alpha_bar_{t-1}) / (1 - alpha_bar_t),
            the weight of x_0 in the posterior mean (1 at t = 0).
        posterior_mean_coef2: c2_t = (1 - alpha_bar_{t-1}) sqrt(alpha_t) / (1 - alpha_bar_t),
            the weight of x_t in the posterior mean (0 at t = 0).
    """

    kind: str
    timesteps: int
    betas: tf.Tensor
    alphas: tf.Tensor
    alphas_cumprod: tf.Tensor
    alphas_cumprod_prev: tf.Tensor
    sqrt_alphas_cumprod: tf.Tensor
    sqrt_one_minus_alphas_cumprod: tf.Tensor
    posterior_variance: tf.Tensor
    posterior_mean_coef1: tf.Tensor
    posterior_mean_coef2: tf.Tensor


def _cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Betas of Nichol & Dhariwal (2021): alpha_bar(u) = f(u) / f(0), f(u) = cos^2((u/T + s)/(1 + s) pi/2).

    beta_t = min(1 - alpha_bar(t + 1) / alpha_bar(t), max_beta), so that (unless clipped)
    the cumulative product at index t equals f(t + 1) / f(0).
    """
    u = np.arange(timesteps + 1, dtype=np.float64) / timesteps
    f = np.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2
    return np.minimum(1.0 - f[1:] / f[:-1], max_beta)


def make_schedule(
    kind: str = "linear", timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> NoiseSchedule:
    """Build a ``NoiseSchedule``.

    Args:
        kind: "linear": beta_t linear from ``beta_start`` (t = 0) to ``beta_end`` (t = T-1),
            as in DDPM and the original design (T = 200 with the default range reproduces
            it, minus its off-by-one). "cosine": Nichol & Dhariwal's schedule with
            s = 0.008 and beta clipped to 0.999 (``beta_start``/``beta_end`` are ignored).
        timesteps: T >= 1.
        beta_start, beta_end: the linear range, 0 < beta_start <= beta_end < 1.

    Returns:
        A ``NoiseSchedule`` of float32 constants; call eagerly (the tensors are constants
        of the context that builds them).
    """
    timesteps = int(timesteps)
    if timesteps < 1:
        raise ValueError(f"make_schedule: timesteps must be >= 1, got {timesteps}")
    if kind == "linear":
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(f"make_schedule: need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        betas = np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)
    elif kind == "cosine":
        betas = _cosine_betas(timesteps)
    else:
        raise ValueError(f"make_schedule: kind must be one of {SCHEDULE_KINDS}, got {kind!r}")

    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
    one_minus = 1.0 - alphas_cumprod
    arrays = dict(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(one_minus),
        posterior_variance=betas * (1.0 - alphas_cumprod_prev) / one_minus,
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / one_minus,
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / one_minus,
    )
    return NoiseSchedule(kind=kind, timesteps=timesteps, **{k: tf.constant(v, tf.float32) for k, v in arrays.items()})


def _per_example(values: tf.Tensor, t: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    """values[t] reshaped to (B, 1, ..., 1) to broadcast against ``like`` (B, ...), in like's dtype."""
    out = tf.gather(values, t)
    return tf.cast(tf.reshape(out, [-1] + [1] * (like.shape.rank - 1)), like.dtype)


def q_sample(schedule: NoiseSchedule, x0: tf.Tensor, t: tf.Tensor, noise: tf.Tensor) -> tf.Tensor:
    """Draw x_t ~ q(x_t | x_0):  sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise.

    Args:
        schedule: the noise schedule.
        x0: (B, h, w, c) clean latents (float; the result has this dtype).
        t: (B,) int32 schedule indices in [0, T).
        noise: eps, same shape as x0, normally N(0, I).

    Returns:
        x_t, same shape and dtype as x0.
    """
    x0, t = tf.convert_to_tensor(x0), tf.convert_to_tensor(t, tf.int32)
    return _per_example(schedule.sqrt_alphas_cumprod, t, x0) * x0 + _per_example(
        schedule.sqrt_one_minus_alphas_cumprod, t, x0
    ) * tf.cast(noise, x0.dtype)


def predict_eps(network, x_t, t, cond=None, training: bool = False) -> tf.Tensor:
    """network(x_t, t[, cond]) as float32: cond is passed only when given (see the module
    docstring), so unconditional networks keep the two-argument contract."""
    if cond is None:
        return tf.cast(network(x_t, t, training=training), tf.float32)
    return tf.cast(network(x_t, t, cond, training=training), tf.float32)


def epsilon_mse(
    network,
    schedule: NoiseSchedule,
    x0: tf.Tensor,
    t: tf.Tensor,
    noise: tf.Tensor,
    training: bool = False,
    cond: tf.Tensor | None = None,
) -> tf.Tensor:
    """The epsilon-prediction loss  mean over all elements of (noise - network(x_t, t))^2.

    Args:
        network: the noise predictor, called as ``network(x_t, t, training=training)``.
        schedule: the noise schedule.
        x0: (B, h, w, c) float32 clean latents.
        t: (B,) int32 schedule indices.
        noise: (B, h, w, c) float32 eps used to make x_t.
        training: passed to the network.
        cond: (B, K) float32 conditions (NaN = unknown) for a conditional network, or None.

    Returns:
        A float32 scalar: the mean over this batch (no cross-replica scaling).
    """
    t = tf.convert_to_tensor(t, tf.int32)
    x_t = q_sample(schedule, x0, t, noise)
    eps_hat = predict_eps(network, x_t, t, cond, training=training)
    return tf.reduce_mean(tf.square(tf.cast(noise, tf.float32) - eps_hat))


# --------------------------------------------------------------------------- samplers


def ddim_timesteps(timesteps: int, steps: int) -> np.ndarray:
    """The S = ``steps`` schedule indices a DDIM sampler visits, increasing, int32 (S,).

    Evenly spaced over [0, T-1] and rounded, so both ends are always visited (S = 1
    visits only T-1, a single jump from noise to x0_hat). S = T gives 0..T-1.
    """
    if not 1 <= steps <= timesteps:
        raise ValueError(f"DDIM steps must be in [1, T={timesteps}], got {steps}")
    if steps == 1:
        return np.array([timesteps - 1], np.int32)
    # Spacing (T-1)/(S-1) >= 1, so rounding keeps the indices distinct.
    return np.round(np.linspace(0, timesteps - 1, steps)).astype(np.int32)


def _recorded_states(num_steps: int, num_intermediates: int) -> np.ndarray:
    """Indices (0 = initial noise, num_steps = final sample) of the states to keep, evenly spaced."""
    k = int(num_intermediates)
    if k == 0:
        return np.zeros([0], np.int32)
    if not 2 <= k <= num_steps + 1:
        raise ValueError(
            f"num_intermediates must be 0 or in [2, {num_steps + 1}] (the number of "
            f"states of a {num_steps}-step sampler), got {k}"
        )
    return np.round(np.linspace(0, num_steps, k)).astype(np.int32)


def _seed_tensor(seed: int) -> tf.Tensor:
    """An int32 (2,) stateless seed from a Python int (a tensor, so new seeds do not retrace)."""
    seed = int(seed)
    if not 0 <= seed < 2**31:
        raise ValueError(f"seed must be in [0, 2**31), got {seed}")
    return tf.constant([seed, 0], tf.int32)


def _fold(seed: tf.Tensor, data) -> tf.Tensor:
    """A new (2,) stateless seed derived from ``seed`` and an integer."""
    return tf.random.experimental.stateless_fold_in(seed, data, alg=RNG_ALG)


def _normal(shape, seed: tf.Tensor) -> tf.Tensor:
    """float32 N(0, 1) of ``shape`` from a (2,) stateless seed."""
    return tf.random.stateless_normal(shape, seed=seed, alg=RNG_ALG)


def _ensure_built(network, shape) -> None:
    """Create the network's weights eagerly (a tf.while_loop body must not create variables)."""
    if not getattr(network, "built", True):
        network(tf.zeros((1, *shape[1:])), tf.zeros((1,), tf.int32), training=False)


class Sampler:
    """Compiled DDPM, DDIM and DPM-Solver++(2M) samplers for one (network, schedule).

    Each method runs the whole reverse process in one ``tf.function`` holding a
    ``tf.while_loop``. ``tf.function`` keeps one trace per distinct (shape, steps, eta,
    num_intermediates, clip_x0) on this object, and the seed is a tensor argument, so
    repeated calls (any seed) with the same settings do not retrace. Keep one ``Sampler``
    per network to profit from that (``LatentDiffusion.sample`` does).

    Randomness: the initial noise x_T uses ``fold_in(seed, 0)`` (unless ``initial_noise``
    is given) and loop step j
    (j = 0 is the noisiest) uses ``fold_in(seed, j + 1)``, all stateless Philox: the same
    seed gives the same latents on every call with the same ``jit_compile`` (XLA draws
    other numbers from a seed than TF's kernels do).

    Args:
        network: the noise predictor (see the module docstring); built on first use.
        schedule: the schedule it was trained with.
        jit_compile: compile the loops with XLA (works on CPU; may pay off on GPU).
    """

    def __init__(self, network, schedule: NoiseSchedule, jit_compile: bool = False):
        self.network = network
        self.schedule = schedule
        self._ddpm_fn = tf.function(self._ddpm_graph, jit_compile=jit_compile)
        self._ddim_fn = tf.function(self._ddim_graph, jit_compile=jit_compile)
        self._dpmpp_fn = tf.function(self._dpmpp_graph, jit_compile=jit_compile)

    def ddpm(
        self,
        shape,
        seed: int = 0,
        num_intermediates: int = 0,
        clip_x0: float | None = None,
        initial_noise=None,
        cond=None,
        guidance: float = 1.0,
    ):
        """Ancestral DDPM sampling over all T steps (Ho et al. 2020, algorithm 2).

        For t = T-1, ..., 0:
            x0_hat  = (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t)   [optionally clipped]
            mean    = c1_t x0_hat + c2_t x_t                 (posterior mean of q(x_{t-1}|x_t,x_0))
            x_{t-1} = mean + sqrt(beta~_t) z,  z ~ N(0, I),  and no noise at t = 0.

        Args:
            shape: (B, h, w, c) of the latents, Python ints.
            seed: int in [0, 2**31).
            num_intermediates: K = 0, or 2..T+1 states to return, evenly spaced from the
                initial noise to the final sample (both included).
            clip_x0: if set, clip x0_hat to [-clip_x0, clip_x0] before forming the mean.
                Off by default: latents are scaled to unit std, not to a fixed range.
            initial_noise: x_T to start from, float (B, h, w, c) matching ``shape``; None
                (default) draws it from ``seed``. The seed still draws the per-step noise,
                so with a deterministic sampler (DDIM, eta = 0) the result depends on
                ``initial_noise`` alone (e.g. to interpolate between two noises).
            cond: (B, K) float32 normalised conditions for a conditional network (NaN =
                unknown; see the module docstring), or None: the network is called
                without one (a conditional UNet then treats every variable as unknown).
            guidance: classifier-free guidance weight w, used when ``cond`` is given:
                eps_hat = eps_u + w (eps_c - eps_u); w = 1 (the default) makes one plain
                conditional call per step, any other w one call on the doubled batch.

        Returns:
            ``latents``: float32 (B, h, w, c) if K = 0; otherwise the tuple
            ``(latents, intermediates, timesteps)`` with intermediates float32
            (K, B, h, w, c) and timesteps an int NumPy array (K,) giving the number of
            noising steps of each state (T for the initial noise, 0 for the final sample).
        """
        return self._run(
            self._ddpm_fn,
            shape,
            np.arange(self.schedule.timesteps, dtype=np.int32),
            seed,
            num_intermediates,
            clip_x0=clip_x0,
            initial_noise=initial_noise,
            cond=cond,
            guidance=guidance,
        )

    def ddim(
        self,
        shape,
        steps: int = 50,
        eta: float = 0.0,
        seed: int = 0,
        num_intermediates: int = 0,
        clip_x0: float | None = None,
        initial_noise=None,
        cond=None,
        guidance: float = 1.0,
    ):
        """DDIM sampling (Song et al. 2021, eq. 12) over S = ``steps`` evenly spaced indices.

        From index t to the previous visited index p (alpha_bar_p = 1 after the last step):
            x0_hat  = (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t)
            sigma   = eta sqrt((1 - alpha_bar_p) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_p)
            x_p     = sqrt(alpha_bar_p) x0_hat + sqrt(1 - alpha_bar_p - sigma^2) eps_hat + sigma z
        eta = 0 is deterministic given the initial noise; eta = 1 and S = T is DDPM.
        With clipping, eps_hat is recomputed from the clipped x0_hat so the update stays
        consistent.

        Args:
            shape: (B, h, w, c) of the latents, Python ints.
            steps: S in [1, T].
            eta: >= 0, the amount of fresh noise (0 deterministic, 1 DDPM-like; values
                above 1 are allowed but leave the DDIM family).
            seed, num_intermediates, clip_x0, initial_noise: as in ``ddpm`` (K up to S + 1).

        Returns:
            As ``ddpm``; timesteps are the noising steps of each state, T for the
            initial noise, 0 for the final sample.
        """
        if eta < 0:
            raise ValueError(f"DDIM eta must be >= 0, got {eta}")
        return self._run(
            self._ddim_fn,
            shape,
            ddim_timesteps(self.schedule.timesteps, steps),
            seed,
            num_intermediates,
            clip_x0=clip_x0,
            initial_noise=initial_noise,
            cond=cond,
            guidance=guidance,
            eta=float(eta),
        )

    def dpmpp(
        self,
        shape,
        steps: int = 20,
        seed: int = 0,
        num_intermediates: int = 0,
        clip_x0: float | None = None,
        initial_noise=None,
        cond=None,
        guidance: float = 1.0,
    ):
        """DPM-Solver++(2M) (Lu et al. 2022): deterministic, ``steps`` network calls.

        Time points: the S = ``steps`` indices DDIM visits (``ddim_timesteps``: T-1 down to
        0, evenly spaced and rounded), then the clean data (alpha = 1, sigma = 0). That is
        the reference implementation's (LuChengTHU/dpm-solver) default and its choice for
        discrete-time latent models (its Stable Diffusion sampler: multistep, order 2,
        ``skip_type="time_uniform"`` from t = 1 to t = 1/N), where its continuous
        t = (index + 1) / T makes uniform t uniform index; rounded here because the network
        takes integer indices only. Its alternative, uniform logSNR (which it suggests for
        low-resolution pixel models such as CIFAR-10), puts several points on one integer
        index near t = 0 for S >~ 40 (T = 1000) and needs lambda clipped (cosine schedule).
        In the reference's terms: ``steps=S-1, t_end=1/N, denoise_to_zero=True`` and
        ``lower_order_final`` at every S (below).

        With alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t),
        lambda_t = log(alpha_t / sigma_t), from point t to the next point p
        (h = lambda_p - lambda_t > 0):
            x0_hat = (x_t - sigma_t eps_hat) / alpha_t                  [optionally clipped]
            D      = x0_hat                                             (first order), or
            D      = (1 + 1/(2r)) x0_hat - (1/(2r)) x0_hat_prev,  r = h_prev / h  (second order)
            x_p    = (sigma_p / sigma_t) x_t - alpha_p (exp(-h) - 1) D
        where x0_hat_prev and h_prev belong to the previous step. First order is used at the
        first step (no previous estimate), at the final step to the clean data (h = inf:
        x_p = D; a second-order D would need r = 0) and at the step onto index 0: the
        reference's ``lower_order_final`` (for S < 10; diffusers: S < 15), kept here for
        every S because lambda grows fast near t = 0, so that step is long (r = h_prev / h
        = 0.23 at S = 20, 0.30 at S = 50, for both T = 1000 schedules) and the second-order
        extrapolation overshoots. On Gaussian data with the exact predictor (float64), a
        second-order step there makes the sample std 24% (S = 20) and 5.6% (S = 50) too
        large; the first-order one, 4.7% too small and 0.3% too large (linear schedule;
        cosine: +10% and +1.7% against -0.3% and +0.2%). The first-order step is DDIM's
        (eta = 0) step, so S <= 3 is DDIM exactly.

        Args:
            shape: (B, h, w, c) of the latents, Python ints.
            steps: S in [1, T], the number of network evaluations.
            seed, num_intermediates, clip_x0, initial_noise: as in ``ddpm`` (K up to S + 1).
                The seed only draws the initial noise: with ``initial_noise`` the result
                does not depend on it.

        Returns:
            As ``ddpm``. The sample is the final step's value, x0_hat at index 0 (the
            network's clean estimate from the solver's state at index 0, clipped to
            ±clip_x0 if set), like DDIM's last step; intermediate states are the solver's
            x at each visited index (labels: noising steps, T ... 1, and 0 for the sample).
        """
        T = self.schedule.timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"DPM-Solver++ steps must be in [1, T={T}], got {steps}")
        return self._run(
            self._dpmpp_fn,
            shape,
            ddim_timesteps(T, steps),
            seed,
            num_intermediates,
            clip_x0=clip_x0,
            initial_noise=initial_noise,
            cond=cond,
            guidance=guidance,
        )

    # The graphs share the loop; only the update rule (and its extra state) differs.

    def _run(self, fn, shape, visited, seed, num_intermediates, clip_x0, initial_noise, cond, guidance, **options):
        """Validate, call the compiled ``fn`` (Python arguments are its trace key), label states."""
        shape = tuple(int(d) for d in shape)
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError(f"sampler shape must be (B, h, w, c) of positive ints, got {shape}")
        if initial_noise is not None:
            initial_noise = tf.cast(initial_noise, tf.float32)
            if tuple(initial_noise.shape) != shape:
                raise ValueError(f"initial_noise must have the sample shape {shape}, got {tuple(initial_noise.shape)}")
        if cond is not None:
            cond = tf.cast(cond, tf.float32)
            if cond.shape.rank != 2 or cond.shape[0] != shape[0]:
                raise ValueError(f"cond must be (B={shape[0]}, K), got {tuple(cond.shape)}")
        record = _recorded_states(len(visited), num_intermediates)
        _ensure_built(self.network, shape)
        clip = None if clip_x0 is None else float(clip_x0)
        latents, intermediates = fn(
            _seed_tensor(seed),
            initial_noise,
            cond,
            tf.constant(guidance, tf.float32),  # a tensor: a new weight does not retrace
            guided=cond is not None and float(guidance) != 1.0,
            shape=shape,
            visited=tuple(visited.tolist()),
            record=tuple(record.tolist()),
            clip_x0=clip,
            **options,
        )
        if not len(record):
            return latents
        # State i (i = 0 initial noise) sits at index visited[-1 - i], i.e. paper t = index + 1.
        labels = np.concatenate([visited[::-1] + 1, [0]])[record]
        return latents, intermediates, labels

    def _ddpm_graph(self, seed, initial_noise, cond, guidance, guided, shape, visited, record, clip_x0):
        s = self.schedule

        def update(i, t, x, eps_hat, z):
            del i  # DDPM visits every index; t is all it needs
            x0_hat = _predict_x0(s, t, x, eps_hat, clip_x0)
            mean = s.posterior_mean_coef1[t] * x0_hat + s.posterior_mean_coef2[t] * x
            # beta~_0 is 0 already; the explicit mask documents (and guarantees) that the last
            # step adds no noise, the original sampler's bug.
            std = tf.where(t > 0, tf.sqrt(s.posterior_variance[t]), 0.0)
            return mean + std * z

        return self._loop(seed, initial_noise, (cond, guidance, guided), shape, visited, record, update)

    def _ddim_graph(self, seed, initial_noise, cond, guidance, guided, shape, visited, record, eta, clip_x0):
        s = self.schedule
        # alpha_bar of the index visited after visited[i] (visited[i - 1]); 1 after the last step.
        earlier = tf.constant(visited[:-1], tf.int32, shape=[len(visited) - 1])
        ab_prev_of = tf.concat([tf.ones([1]), tf.gather(s.alphas_cumprod, earlier)], 0)

        def update(i, t, x, eps_hat, z):
            ab, ab_prev = s.alphas_cumprod[t], ab_prev_of[i]
            x0_hat = _predict_x0(s, t, x, eps_hat, clip_x0)
            if clip_x0 is not None:
                eps_hat = (x - tf.sqrt(ab) * x0_hat) / tf.sqrt(1.0 - ab)
            sigma = eta * tf.sqrt((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev))
            # max(., 0) only guards round-off: sigma^2 <= 1 - alpha_bar_p for eta <= 1.
            direction = tf.sqrt(tf.maximum(1.0 - ab_prev - sigma**2, 0.0)) * eps_hat
            return tf.sqrt(ab_prev) * x0_hat + direction + sigma * z

        return self._loop(seed, initial_noise, (cond, guidance, guided), shape, visited, record, update)

    def _dpmpp_graph(self, seed, initial_noise, cond, guidance, guided, shape, visited, record, clip_x0):
        s = self.schedule
        coef = tf.constant(_dpmpp_coefficients(s, visited), tf.float32)

        def update(i, t, x, eps_hat, z, x0_prev):
            del z  # deterministic
            c_x, c_d, w, w_prev = tf.unstack(coef[i])
            x0_hat = _predict_x0(s, t, x, eps_hat, clip_x0)
            return c_x * x + c_d * (w * x0_hat + w_prev * x0_prev), x0_hat

        # The previous x0_hat is loop state; its weight is 0 at the first step.
        return self._loop(
            seed, initial_noise, (cond, guidance, guided), shape, visited, record, update, carry=tf.zeros(shape)
        )

    def _guided_eps(self, x, t, cond, guidance, guided):
        """eps_hat for x (B, h, w, c) at index t: unconditional (cond None), conditional, or
        guided, eps_u + w (eps_c - eps_u) from one call on the batch doubled with unknown conditions."""
        batch = x.shape[0]
        if not guided:
            return predict_eps(self.network, x, tf.fill([batch], t), cond)
        unknown = tf.fill(tf.shape(cond), float("nan"))
        both = predict_eps(self.network, tf.concat([x, x], 0), tf.fill([2 * batch], t), tf.concat([cond, unknown], 0))
        eps_c, eps_u = both[:batch], both[batch:]
        return eps_u + guidance * (eps_c - eps_u)

    def _loop(self, seed, initial_noise, conditioning, shape, visited, record, update, carry=None):
        """Run ``update`` from ``initial_noise`` (None: fresh noise from ``seed``) over ``visited``
        (noisiest first); return (x, intermediates). ``conditioning`` = (cond, guidance, guided),
        see ``_guided_eps``.

        ``update(i, t, x, eps_hat, z) -> x``; or, if ``carry`` (extra loop state, a tensor or
        nest of tensors, float32) is given, ``update(i, t, x, eps_hat, z, carry) -> (x, carry)``.
        """
        if carry is None:
            memoryless, carry = update, ()

            def update(i, t, x, eps_hat, z, carry):
                return memoryless(i, t, x, eps_hat, z), carry

        n = len(visited)
        visited_t = tf.constant(visited, tf.int32)
        record_t = tf.constant(record, tf.int32)

        def remember(inter, state_index, x):
            hit = tf.reshape(tf.equal(record_t, state_index), [-1, 1, 1, 1, 1])
            return tf.where(hit, x[None], inter)

        x = _normal(shape, _fold(seed, 0)) if initial_noise is None else initial_noise
        inter = tf.zeros((len(record),) + shape, tf.float32)
        if record:
            inter = remember(inter, 0, x)

        def body(j, x, inter, carry):
            i = n - 1 - j  # position in visited: loop step j = 0 is the noisiest index
            t = visited_t[i]
            eps_hat = self._guided_eps(x, t, *conditioning)
            z = _normal(shape, _fold(seed, j + 1))
            x, carry = update(i, t, x, eps_hat, z, carry)
            x = tf.ensure_shape(x, shape)
            if record:
                inter = remember(inter, j + 1, x)
            return j + 1, x, inter, carry

        _, x, inter, _ = tf.while_loop(lambda j, *_: j < n, body, (tf.constant(0), x, inter, carry))
        return x, inter


def _dpmpp_coefficients(schedule: NoiseSchedule, visited) -> np.ndarray:
    """DPM-Solver++(2M)'s step constants, float64 (n, 4), row i for the step from visited[i]
    (increasing indices) to the next, less noisy point: visited[i - 1], or the clean data for i = 0.

    Row i = (c_x, c_d, w, w_prev) of  x_next = c_x x + c_d (w x0_hat + w_prev x0_hat_prev),
    i.e. c_x = sigma_p / sigma_t, c_d = -alpha_p expm1(-h), and (w, w_prev) = (1, 0) at first
    order or (1 + 1/(2r), -1/(2r)) at second (see ``Sampler.dpmpp``). Computed in float64 from
    the stored sqrt(alpha_bar) and sqrt(1 - alpha_bar) (each accurate to float32 rounding,
    unlike 1 - alpha_bar near t = 0 recomputed from a rounded alpha_bar).
    """
    idx = np.asarray(visited, np.int64)
    alpha = schedule.sqrt_alphas_cumprod.numpy().astype(np.float64)[idx]
    sigma = schedule.sqrt_one_minus_alphas_cumprod.numpy().astype(np.float64)[idx]
    lam = np.log(alpha) - np.log(sigma)
    n = len(idx)
    coef = np.zeros((n, 4))
    coef[0] = (0.0, 1.0, 1.0, 0.0)  # to sigma = 0, lambda = inf: x_next = x0_hat
    for i in range(1, n):
        h = lam[i - 1] - lam[i]
        coef[i, :2] = sigma[i - 1] / sigma[i], -alpha[i - 1] * np.expm1(-h)
        # Second order needs the previous step (i < n - 1); the step onto visited[0] = index 0
        # stays first order (lower_order_final, see Sampler.dpmpp).
        if 1 < i < n - 1:
            half_inv_r = h / (2.0 * (lam[i] - lam[i + 1]))
            coef[i, 2:] = 1.0 + half_inv_r, -half_inv_r
        else:
            coef[i, 2:] = 1.0, 0.0
    return coef


def _predict_x0(schedule: NoiseSchedule, t, x, eps_hat, clip_x0):
    """x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t), optionally clipped."""
    x0 = (x - schedule.sqrt_one_minus_alphas_cumprod[t] * eps_hat) / schedule.sqrt_alphas_cumprod[t]
    return x0 if clip_x0 is None else tf.clip_by_value(x0, -clip_x0, clip_x0)


def ddpm_sample(
    network, schedule: NoiseSchedule, shape, seed: int = 0, num_intermediates: int = 0, clip_x0: float | None = None
):
    """One-off ``Sampler(network, schedule).ddpm(...)``; traces anew on every call.

    Use a ``Sampler`` (or ``LatentDiffusion.sample``) to sample repeatedly without retracing.
    """
    return Sampler(network, schedule).ddpm(shape, seed=seed, num_intermediates=num_intermediates, clip_x0=clip_x0)


def ddim_sample(
    network,
    schedule: NoiseSchedule,
    shape,
    steps: int = 50,
    eta: float = 0.0,
    seed: int = 0,
    num_intermediates: int = 0,
    clip_x0: float | None = None,
):
    """One-off ``Sampler(network, schedule).ddim(...)``; traces anew on every call.

    Use a ``Sampler`` (or ``LatentDiffusion.sample``) to sample repeatedly without retracing.
    """
    return Sampler(network, schedule).ddim(
        shape, steps=steps, eta=eta, seed=seed, num_intermediates=num_intermediates, clip_x0=clip_x0
    )


def dpmpp_sample(
    network,
    schedule: NoiseSchedule,
    shape,
    steps: int = 20,
    seed: int = 0,
    num_intermediates: int = 0,
    clip_x0: float | None = None,
):
    """One-off ``Sampler(network, schedule).dpmpp(...)``; traces anew on every call.

    Use a ``Sampler`` (or ``LatentDiffusion.sample``) to sample repeatedly without retracing.
    """
    return Sampler(network, schedule).dpmpp(
        shape, steps=steps, seed=seed, num_intermediates=num_intermediates, clip_x0=clip_x0
    )


# --------------------------------------------------------------------------- training model


def _replica_id() -> tf.Tensor | int:
    """This replica's index in its sync group (0 outside tf.distribute or in cross-replica context)."""
    ctx = tf.distribute.get_replica_context()
    return 0 if ctx is None else ctx.replica_id_in_sync_group


def _num_replicas() -> int:
    return tf.distribute.get_strategy().num_replicas_in_sync


class LatentDiffusion(FitFixes, keras.Model):
    """Epsilon-prediction diffusion on (scaled) latents, with an EMA copy of the network.

    ``fit(latents)`` trains ``network``; after every optimizer step ``ema_network`` moves
    toward it (``ema <- d ema + (1 - d) w``). Sampling uses the EMA network by default.

    Data: each batch is x0, float32 latents (B, h, w, c) already multiplied by the latent
    scale factor; or a dict ``{"latents": x0, "cond": c, "t": t, "noise": eps}``, every key
    but "latents" optional: c (B, K) float32 conditions of a conditional network (NaN =
    unknown), t (B,) int32 and eps like x0 fix the draws (for tests and debugging). Otherwise, per step,
    t ~ U{0, ..., T-1} and eps ~ N(0, I) are drawn with stateless TF ops (XLA-friendly)
    from the seed in ``train_seed``, folded with the replica id so that replicas of a
    ``tf.distribute`` strategy draw different noise.

    Classifier-free guidance training: in ``train_step`` each condition of each example is
    replaced by unknown (NaN) with probability ``cond_dropout``, drawn from the same seed as
    t and eps (so the masks are part of the saved random stream); ``test_step`` keeps them.

    ``train_seed`` / ``val_seed`` are int64 (2,) model variables [seed, counter]; each
    step uses the current value and increments the counter. They are ordinary weights,
    so ``save_weights``/``load_weights`` (and ``BackupAndRestore``) restore the random
    stream exactly. (A ``keras.random.SeedGenerator`` would not do: ``.weights.h5`` files
    do not store its state.)

    Loss: the mean over the global batch of (eps - network(x_t, t))^2, reported as
    ``loss``. ``test_step`` reports the same loss of the EMA network (the one that
    samples), with draws from ``val_seed`` so validation does not move the training
    stream.

    Build before training: ``model.build((None, h, w, c))`` (inside ``strategy.scope()``
    when distributing) creates the weights of both networks and copies the network into the
    EMA. ``fit`` builds it too if you forget, from the first batch.

    Args:
        network: the noise predictor (a Keras layer/model with ``get_config``; see the
            module docstring). Its class must rebuild it with ``from_config``.
        schedule: the ``NoiseSchedule`` to train with.
        ema_decay: d in [0, 1).
        ema_warmup: use d_eff = min(d, (1 + n) / (10 + n)) with n the optimizer's update
            count after the step (0.18 at the first update, d after ~9 / (1 - d) updates),
            so the EMA forgets the random init quickly. False: d_eff = d.
        seed: initial seed of the training draws; None lets Keras pick one (set
            ``keras.utils.set_random_seed`` for reproducibility).
        cond_dropout: probability in [0, 1] of dropping each condition in training.
        **kwargs: for ``keras.Model`` (name, dtype...).
    """

    def __init__(
        self,
        network,
        schedule: NoiseSchedule,
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        seed: int | None = None,
        cond_dropout: float = 0.1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"LatentDiffusion: ema_decay must be in [0, 1), got {ema_decay}")
        if not 0.0 <= cond_dropout <= 1.0:
            raise ValueError(f"LatentDiffusion: cond_dropout must be in [0, 1], got {cond_dropout}")
        self.cond_dropout = float(cond_dropout)
        self.network = network
        self.schedule = schedule
        self.ema_decay = float(ema_decay)
        self.ema_warmup = bool(ema_warmup)

        config = network.get_config()
        if "name" in config:  # distinct names keep weight paths and summaries readable
            config["name"] = f"{network.name}_ema"
        config.setdefault("dtype", network.dtype_policy)
        self.ema_network = network.__class__.from_config(config)
        self.ema_network.trainable = False  # updated by EMA only, never by the optimizer

        if seed is None:
            # Python's RNG, which keras.utils.set_random_seed seeds (as Keras' own default).
            seed = random.randint(1, 2**30)
        self.train_seed = self._seed_variable(int(seed), "train_seed")
        self.val_seed = self._seed_variable(int(seed) + 1, "val_seed")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self._ema_sampler = Sampler(self.ema_network, schedule)
        self._online_sampler = Sampler(self.network, schedule)

    def _seed_variable(self, seed: int, name: str):
        return self.add_weight(
            shape=(2,),
            dtype="int64",
            trainable=False,
            name=name,
            initializer=lambda shape, dtype: tf.constant([seed, 0], dtype),
            # Replicas read the same value and write the same increment.
            aggregation="only_first_replica",
        )

    # -- building ----------------------------------------------------------------------

    def build(self, input_shape):
        """Create both networks' weights for latents of ``input_shape`` (B, h, w, c); B is ignored.

        Runs eagerly (``tf.init_scope``) even when Keras calls it while tracing, then copies
        the network's weights into the EMA network (EMA = network at step 0).
        """
        shape = (1, *tuple(input_shape)[1:])
        with tf.init_scope():
            x, t = tf.zeros(shape), tf.zeros((1,), tf.int32)
            if not self.network.built:
                self.network(x, t, training=False)
            if not self.ema_network.built:
                self.ema_network(x, t, training=False)
            self.reset_ema()
        self.built = True

    def reset_ema(self) -> None:
        """Set every EMA weight to the network's current value (done once by ``build``)."""
        pairs = self._ema_pairs()
        for ema, w in pairs:
            ema.assign(w)

    def _ema_pairs(self):
        ema_w, online_w = self.ema_network.weights, self.network.weights
        if len(ema_w) != len(online_w) or any(
            tuple(a.shape) != tuple(b.shape) for a, b in zip(ema_w, online_w, strict=True)
        ):
            raise ValueError(
                "LatentDiffusion: the EMA clone's weights do not match the network's; "
                "does network.get_config() rebuild the same network?"
            )
        return list(zip(ema_w, online_w, strict=True))

    # -- Keras plumbing ----------------------------------------------------------------

    def call(self, x_t, t=None, training=None):
        """The online network's noise prediction for x_t (B, h, w, c) at indices t (default 0)."""
        if t is None:
            t = tf.zeros(tf.shape(x_t)[:1], tf.int32)
        return self.network(x_t, t, training=training)

    @property
    def metrics(self):
        # Listing the tracker here makes Keras reset it at every epoch and evaluate().
        return [self.loss_tracker]

    def _draws(self, data, seed_variable, dropout: float = 0.0):
        """(x0, t, eps, cond) for a batch: from the data if given, else drawn (see the class
        docstring); each condition dropped to unknown with probability `dropout`."""
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        if isinstance(x, dict):
            x0, t, noise, cond = x["latents"], x.get("t"), x.get("noise"), x.get("cond")
        else:
            x0, t, noise, cond = x, None, None, None
        x0 = tf.cast(x0, tf.float32)
        if not self.built:
            self.build(x0.shape)
        if t is None or noise is None or (cond is not None and dropout > 0):
            state = tf.convert_to_tensor(seed_variable)  # read before the increment below
            seed_variable.assign_add(tf.constant([0, 1], tf.int64))
            # Stateless ops want int32 seeds under XLA (Keras' random ops cast the same way).
            seed = tf.cast(tf.math.floormod(state, tf.int32.max - 1), tf.int32)
            seed = _fold(seed, _replica_id())
        if t is None:
            t = tf.random.stateless_uniform(
                tf.shape(x0)[:1],
                seed=_fold(seed, 0),
                minval=0,
                maxval=self.schedule.timesteps,
                dtype=tf.int32,
                alg=RNG_ALG,
            )
        if noise is None:
            noise = _normal(tf.shape(x0), _fold(seed, 1))
        if cond is not None:
            cond = tf.cast(cond, tf.float32)
            if dropout > 0:
                drop = tf.random.stateless_uniform(tf.shape(cond), seed=_fold(seed, 2), alg=RNG_ALG) < dropout
                cond = tf.where(drop, tf.constant(float("nan")), cond)
        return x0, tf.cast(t, tf.int32), tf.cast(noise, tf.float32), cond

    def train_step(self, data):
        """One optimizer step on the epsilon-MSE, then one EMA update; returns {"loss": running mean}."""
        x0, t, noise, cond = self._draws(data, self.train_seed, self.cond_dropout)
        with tf.GradientTape() as tape:
            loss = epsilon_mse(self.network, self.schedule, x0, t, noise, training=True, cond=cond)
            # The optimizer SUM-all-reduces gradients across replicas, so each replica
            # differentiates its local mean / num_replicas and the sum is the gradient of the
            # global-batch mean (Keras' own losses do the same). Then scale_loss multiplies by
            # the dynamic loss scale under mixed_float16 (LossScaleOptimizer), else by 1.
            scaled = self.optimizer.scale_loss(loss / _num_replicas())
        variables = self.trainable_variables
        grads = tape.gradient(scaled, variables)
        self.optimizer.apply_gradients(zip(grads, variables, strict=True))  # unscales, skips non-finite (fp16)
        self._update_ema()
        self.loss_tracker.update_state(loss)
        return self.replica_logs({"loss": self.loss_tracker.result()})

    def test_step(self, data):
        """The same loss, of the EMA network, without any update."""
        x0, t, noise, cond = self._draws(data, self.val_seed)
        self.loss_tracker.update_state(epsilon_mse(self.ema_network, self.schedule, x0, t, noise, cond=cond))
        return self.replica_logs({"loss": self.loss_tracker.result()})

    def ema_decay_now(self) -> tf.Tensor:
        """d_eff for the update that follows optimizer update number ``optimizer.iterations``."""
        d = tf.constant(self.ema_decay, tf.float32)
        if not self.ema_warmup:
            return d
        n = tf.cast(self.optimizer.iterations, tf.float32)
        return tf.minimum(d, (1.0 + n) / (10.0 + n))

    def _update_ema(self) -> None:
        """ema <- d ema + (1 - d) w for trainable weights; other weights are copied.

        Under tf.distribute the EMA variables are mirrored with no aggregation, so they can
        only be written from cross-replica context: merge_call gets there and
        ``extended.update`` writes each device's copy from that device's (identical)
        network weights, as Keras' optimizers do.
        """
        pairs = [(e.value, w.value, w.trainable) for e, w in self._ema_pairs()]

        def average(ema, w, d):
            return ema.assign(d * ema + (1.0 - d) * tf.cast(w, ema.dtype))

        def copy(ema, w, d):
            del d
            return ema.assign(w)

        def apply(strategy, d):
            for ema, w, trainable in pairs:
                strategy.extended.update(ema, average if trainable else copy, args=(w, d), group=False)

        d = self.ema_decay_now()
        ctx = tf.distribute.get_replica_context()
        if ctx is None:  # already in cross-replica context
            apply(tf.distribute.get_strategy(), d)
        else:
            ctx.merge_call(apply, args=(d,))

    # -- sampling ----------------------------------------------------------------------

    def sample(
        self,
        n: int,
        latent_shape,
        sampler: str = "ddim",
        steps: int = 50,
        eta: float = 0.0,
        seed: int = 0,
        num_intermediates: int = 0,
        clip_x0: float | None = None,
        use_ema: bool = True,
        initial_noise=None,
        cond=None,
        guidance: float = 1.0,
    ):
        """Generate ``n`` latents of ``latent_shape`` (h, w, c) with the EMA (or online) network.

        Args:
            n: batch size B.
            latent_shape: (h, w, c).
            sampler: one of ``SAMPLERS``: "ddim" (``steps``, ``eta`` apply), "dpmpp"
                (DPM-Solver++(2M), deterministic: ``steps`` applies, ``eta`` is ignored) or
                "ddpm" (all T steps; ``steps`` and ``eta`` are ignored).
            steps, eta, seed, num_intermediates, clip_x0, initial_noise: see
                ``Sampler.ddim``/``Sampler.dpmpp``/``Sampler.ddpm`` (initial_noise: x_T,
                (n, h, w, c), or None).
            use_ema: sample with ``ema_network`` (default) or ``network``.
            cond, guidance: (n, K) normalised conditions (NaN = unknown) and the
                classifier-free guidance weight; see ``Sampler.ddpm``.

        Returns:
            float32 (n, h, w, c) latents on the training scale (divide by the latent scale
            factor before decoding), or ``(latents, intermediates, timesteps)`` when
            ``num_intermediates`` > 0. Compiled once per settings; any seed reuses the trace.
        """
        if not self.built:
            raise ValueError(
                "LatentDiffusion.sample: build the model (model.build((None, h, w, c))) or load its weights first"
            )
        s = self._ema_sampler if use_ema else self._online_sampler
        shape = (int(n), *latent_shape)
        if sampler == "ddim":
            return s.ddim(
                shape,
                steps=steps,
                eta=eta,
                seed=seed,
                num_intermediates=num_intermediates,
                clip_x0=clip_x0,
                initial_noise=initial_noise,
                cond=cond,
                guidance=guidance,
            )
        if sampler == "dpmpp":
            return s.dpmpp(
                shape,
                steps=steps,
                seed=seed,
                num_intermediates=num_intermediates,
                clip_x0=clip_x0,
                initial_noise=initial_noise,
                cond=cond,
                guidance=guidance,
            )
        if sampler == "ddpm":
            return s.ddpm(
                shape,
                seed=seed,
                num_intermediates=num_intermediates,
                clip_x0=clip_x0,
                initial_noise=initial_noise,
                cond=cond,
                guidance=guidance,
            )
        raise ValueError(f"LatentDiffusion.sample: sampler must be one of {SAMPLERS}, got {sampler!r}")
