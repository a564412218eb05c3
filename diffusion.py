"""The diffusion process on latents: noise schedule, q(x_t | x_0), the loss, and the training model.

Everything here is independent of the network architecture (as in improved-diffusion):
the noise predictor is passed in as ``network`` and only has to honour the contract

    network(x_t, t, training=...) -> out                  (unconditional)
    network(x_t, t, cond, tissue=m, training=...) -> out  (conditional; cond and tissue
                                                           are passed only when given)
        x_t      (B, h, w, c) float32 latents at noise level t
        t        (B,) int32 schedule indices in [0, T)
        cond     (B, K) float32 normalised condition variables, NaN = unknown
        tissue   (B, h, w, M) float32 tissue mask per latent cell (masks.mask_input),
                 all zeros = unknown
        out      (B, h, w, c), any float dtype (cast to float32 here): the predicted noise
                 eps_hat, or, for a v-predicting model (``prediction="v"``), v_hat

Everything downstream (the loss, samplers.py) works with eps_hat: ``predict_eps`` turns a
v-predicting network's output into it (see "Parameterization" below).

Indexing convention (used everywhere, samplers.py included)
-----------------------------------------------------------
Schedule index t runs over 0..T-1 and index t holds beta_t, alpha_t = 1 - beta_t and
alpha_bar_t = prod_{s<=t} alpha_s. ``q_sample(x0, t)`` draws the latent after t + 1
noising steps, i.e. the paper's x_{t+1}, with no shift of alpha_bar by one step. So
alpha_bar_0 = 1 - beta_0 and a sampler's last step (index 0) returns the clean estimate.

Forward process (closed form, Ho et al. 2020, eq. 4):

    q(x_t | x_0) = N( sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I )
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,   eps ~ N(0, I)

Training minimises the epsilon-prediction MSE  E || eps - network(x_t, t) ||^2  with
t ~ U{0, ..., T-1}, optionally weighted per example by Min-SNR-γ (Hang et al. 2023,
"Efficient Diffusion Training via Min-SNR Weighting Strategy", eq. 10 for ε-prediction):
w_t = min(SNR_t, γ) / SNR_t with SNR_t = alpha_bar_t / (1 - alpha_bar_t), which takes
weight off the nearly clean steps (high SNR), whose gradients conflict with the rest.

Parameterization (Salimans & Ho 2022, "Progressive distillation", section 4): with
alpha_t = sqrt(alpha_bar_t) and sigma_t = sqrt(1 - alpha_bar_t), the network predicts either
eps (``prediction="eps"``) or the velocity v = alpha_t eps - sigma_t x_0 (``"v"``), from which

    eps_hat = sigma_t x_t + alpha_t v_hat,    x0_hat = alpha_t x_t - sigma_t v_hat.

So eps - eps_hat = alpha_t (v - v_hat), and the ε-MSE above, taken of a v-network, is the
v-MSE weighted by alpha_bar_t = SNR_t / (SNR_t + 1); with Min-SNR-γ it is the paper's
v-prediction loss min(SNR_t, γ) / (SNR_t + 1) ||v - v_hat||^2 (Hang et al. 2023, eq. 10):
one loss function serves both. What differs is the network's error near pure noise
(alpha_t -> 0): an ε-network's x0_hat = (x_t - sigma_t eps_hat) / alpha_t multiplies its error
by 1 / alpha_t (about 20,000 at the cosine schedule's last index), a v-network's
x0_hat ≈ -v_hat does not. (The samplers form x0_hat from eps_hat, so in float32 a
v-network's estimate there carries a rounding error of about 6e-8 / alpha_t of x_t's scale,
0.1 % at that index.)

For classifier-free guidance (Ho & Salimans 2022) a conditional network is trained with
each condition (each label variable, and the tissue mask as a whole) replaced by "unknown"
(NaN; a zero mask) with probability ``cond_dropout`` (the mask: ``mask_dropout``, by
default the same), and, with probability ``uncond_dropout``, all of them at once, so that
it also predicts eps_u = eps(x_t, t, unknown); samplers.py combines the two predictions.
(Independent drops alone leave the all-unknown case rare: with a label and a mask each
dropped at 0.1, one example in a hundred.)

``LatentDiffusion`` is a ``keras.Model`` with a custom ``train_step`` (in the spirit of the
keras.io DDIM example), so ``fit()`` gives callbacks, progress bars, ``tf.distribute``,
mixed precision and XLA; it keeps an exponential moving average (EMA) copy of the network,
the one samplers.py samples with. Latents are expected already multiplied by the latent
scale factor (unit std).

Random draws are stateless (``fold_seed``, ``normal``, Philox): a seed always gives the
same numbers, and a saved seed variable restores a training stream exactly.
"""

from __future__ import annotations

import dataclasses
import math
import random

import keras
import numpy as np
import tensorflow as tf

from config import PREDICTIONS, SCHEDULES
from keras_fixes import FitFixes

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
        raise ValueError(f"make_schedule: kind must be one of {SCHEDULES}, got {kind!r}")

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


def predict_eps(
    network,
    x_t,
    t,
    cond=None,
    training: bool = False,
    tissue=None,
    prediction: str = "eps",
    schedule: NoiseSchedule | None = None,
) -> tf.Tensor:
    """eps_hat (B, h, w, c) float32 from network(x_t, t[, cond][, tissue=tissue]): cond and tissue
    are passed only when given (see the module docstring), so unconditional networks keep the
    two-argument contract. `prediction`: what the network predicts (`config.PREDICTIONS`); "v"
    needs its `schedule`, and eps_hat = sigma_t x_t + alpha_t v_hat (module docstring)."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    args = () if cond is None else (cond,)
    kwargs = {} if tissue is None else {"tissue": tissue}
    out = tf.cast(network(x_t, t, *args, training=training, **kwargs), tf.float32)
    if prediction == "eps":
        return out
    if schedule is None:
        raise ValueError("a v-predicting network needs its noise schedule to give eps_hat")
    x_t = tf.cast(x_t, tf.float32)
    sigma_t = _per_example(schedule.sqrt_one_minus_alphas_cumprod, t, x_t)
    return sigma_t * x_t + _per_example(schedule.sqrt_alphas_cumprod, t, x_t) * out


def epsilon_mse(
    network,
    schedule: NoiseSchedule,
    x0: tf.Tensor,
    t: tf.Tensor,
    noise: tf.Tensor,
    training: bool = False,
    cond: tf.Tensor | None = None,
    min_snr_gamma: float = 0.0,
    tissue: tf.Tensor | None = None,
    prediction: str = "eps",
) -> tf.Tensor:
    """The epsilon-prediction loss  mean over all elements of (noise - eps_hat(x_t, t))^2,
    each example's share × min(SNR_t, γ) / SNR_t when `min_snr_gamma` γ > 0 (module docstring).
    For a v-predicting network (`prediction="v"`) eps_hat is `predict_eps`'s, and the loss is
    the v-MSE weighted by min(SNR_t, γ) / (SNR_t + 1) (module docstring, "Parameterization").

    Args:
        network: the noise predictor, called as ``network(x_t, t, training=training)``.
        schedule: the noise schedule.
        x0: (B, h, w, c) float32 clean latents.
        t: (B,) int32 schedule indices.
        noise: (B, h, w, c) float32 eps used to make x_t.
        training: passed to the network.
        cond: (B, K) float32 conditions (NaN = unknown) for a conditional network, or None.
        min_snr_gamma: γ of the Min-SNR weighting; 0: unweighted.
        tissue: (B, h, w, M) float32 tissue mask (masks.mask_input; zeros = unknown) for a
            mask-conditioned network, or None.
        prediction: what the network predicts, "eps" or "v" (`config.PREDICTIONS`).

    Returns:
        A float32 scalar: the mean over this batch (no cross-replica scaling).
    """
    t = tf.convert_to_tensor(t, tf.int32)
    x_t = q_sample(schedule, x0, t, noise)
    eps_hat = predict_eps(
        network, x_t, t, cond, training=training, tissue=tissue, prediction=prediction, schedule=schedule
    )
    per_example = tf.reduce_mean(tf.square(tf.cast(noise, tf.float32) - eps_hat), axis=[1, 2, 3])
    if min_snr_gamma > 0:
        alpha_bar = tf.gather(schedule.alphas_cumprod, t)
        snr = alpha_bar / (1.0 - alpha_bar)
        per_example *= tf.minimum(snr, min_snr_gamma) / snr
    return tf.reduce_mean(per_example)


# --------------------------------------------------------------------------- stateless random draws


def fold_seed(seed: tf.Tensor, data) -> tf.Tensor:
    """A new (2,) stateless seed derived from ``seed`` and an integer."""
    return tf.random.experimental.stateless_fold_in(seed, data, alg=RNG_ALG)


def normal(shape, seed: tf.Tensor) -> tf.Tensor:
    """float32 N(0, 1) of ``shape`` from a (2,) stateless seed."""
    return tf.random.stateless_normal(shape, seed=seed, alg=RNG_ALG)


# --------------------------------------------------------------------------- training model


def _replica_id() -> tf.Tensor | int:
    """This replica's index in its sync group (0 outside tf.distribute or in cross-replica context)."""
    ctx = tf.distribute.get_replica_context()
    return 0 if ctx is None else ctx.replica_id_in_sync_group


def _num_replicas() -> int:
    return tf.distribute.get_strategy().num_replicas_in_sync


class LatentDiffusion(FitFixes, keras.Model):
    """Diffusion on (scaled) latents, trained on the ε-MSE, with an EMA copy of the network.

    ``fit(latents)`` trains ``network``; after every optimizer step ``ema_network`` moves
    toward it (``ema <- d ema + (1 - d) w``). Sampling uses the EMA network by default.

    Data: each batch is x0, float32 latents (B, h, w, c) already multiplied by the latent
    scale factor; or a dict ``{"latents": x0, "cond": c, "tissue": m, "t": t, "noise": eps}``,
    every key but "latents" optional: c (B, K) float32 conditions of a conditional network
    (NaN = unknown), m (B, h, w, M) float32 tissue mask (masks.mask_input) of a mask-conditioned one
    (zeros = unknown), t (B,) int32 and eps like x0 fix the draws (for tests and debugging). Otherwise, per step,
    t ~ U{0, ..., T-1} and eps ~ N(0, I) are drawn with stateless TF ops (XLA-friendly)
    from the seed in ``train_seed``, folded with the replica id so that replicas of a
    ``tf.distribute`` strategy draw different noise.

    Classifier-free guidance training: in ``train_step`` each condition of each example is
    replaced by unknown (NaN) with probability ``cond_dropout``, and each example's tissue
    mask as a whole (by zeros, an independent draw) with probability ``mask_dropout``, and
    every condition and the mask together with probability ``uncond_dropout``, drawn
    from the same seed as t and eps
    (so the dropouts are part of the saved random stream); ``test_step`` keeps them.

    ``train_seed`` / ``val_seed`` are int64 (2,) model variables [seed, counter]; each
    step uses the current value and increments the counter. They are ordinary weights,
    so ``save_weights``/``load_weights`` (and ``BackupAndRestore``) restore the random
    stream exactly. (A ``keras.random.SeedGenerator`` would not do: ``.weights.h5`` files
    do not store its state.)

    Loss: the mean over the global batch of (eps - eps_hat(x_t, t))^2 (Min-SNR-weighted
    when ``min_snr_gamma`` > 0), reported as ``loss``. ``test_step`` reports the same loss
    of the EMA network (the one that samples), with draws from ``val_seed`` so validation
    does not move the training stream.

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
        mask_dropout: probability in [0, 1] of dropping the tissue mask in training; None:
            ``cond_dropout``.
        uncond_dropout: probability in [0, 1] of dropping every condition and the mask of an
            example together (on top of the drops above).
        min_snr_gamma: γ ≥ 0 of the Min-SNR loss weighting (`epsilon_mse`); 0: plain ε-MSE.
        prediction: what ``network`` predicts, "eps" or "v" (module docstring,
            "Parameterization"); samplers must be given the same.
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
        min_snr_gamma: float = 0.0,
        mask_dropout: float | None = None,
        uncond_dropout: float = 0.0,
        prediction: str = "eps",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if prediction not in PREDICTIONS:
            raise ValueError(f"LatentDiffusion: prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.prediction = prediction
        if min_snr_gamma < 0:
            raise ValueError(f"LatentDiffusion: min_snr_gamma must be >= 0, got {min_snr_gamma}")
        self.min_snr_gamma = float(min_snr_gamma)
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"LatentDiffusion: ema_decay must be in [0, 1), got {ema_decay}")
        if not 0.0 <= cond_dropout <= 1.0:
            raise ValueError(f"LatentDiffusion: cond_dropout must be in [0, 1], got {cond_dropout}")
        self.cond_dropout = float(cond_dropout)
        self.mask_dropout = self.cond_dropout if mask_dropout is None else float(mask_dropout)
        if not 0.0 <= self.mask_dropout <= 1.0:
            raise ValueError(f"LatentDiffusion: mask_dropout must be in [0, 1], got {mask_dropout}")
        if not 0.0 <= uncond_dropout <= 1.0:
            raise ValueError(f"LatentDiffusion: uncond_dropout must be in [0, 1], got {uncond_dropout}")
        self.uncond_dropout = float(uncond_dropout)
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
        """The online network's output for x_t (B, h, w, c) at indices t (default 0): eps_hat, or
        v_hat for ``prediction="v"`` (``predict_eps`` turns either into eps_hat)."""
        if t is None:
            t = tf.zeros(tf.shape(x_t)[:1], tf.int32)
        return self.network(x_t, t, training=training)

    @property
    def metrics(self):
        # Listing the tracker here makes Keras reset it at every epoch and evaluate().
        return [self.loss_tracker]

    def _draws(self, data, seed_variable, dropout: float = 0.0, mask_dropout: float = 0.0, uncond: float = 0.0):
        """(x0, t, eps, cond, tissue) for a batch: from the data if given, else drawn (see the
        class docstring); each condition dropped to unknown with probability `dropout`, each
        tissue mask with probability `mask_dropout`, independently, and every condition and
        the mask of an example together with probability `uncond`."""
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        if isinstance(x, dict):
            x0, t, noise, cond, tissue = x["latents"], x.get("t"), x.get("noise"), x.get("cond"), x.get("tissue")
        else:
            x0, t, noise, cond, tissue = x, None, None, None, None
        x0 = tf.cast(x0, tf.float32)
        if not self.built:
            self.build(x0.shape)
        conditioned = cond is not None or tissue is not None
        if t is None or noise is None or (conditioned and max(dropout, mask_dropout, uncond) > 0):
            state = tf.convert_to_tensor(seed_variable)  # read before the increment below
            seed_variable.assign_add(tf.constant([0, 1], tf.int64))
            # Stateless ops want int32 seeds under XLA (Keras' random ops cast the same way).
            seed = tf.cast(tf.math.floormod(state, tf.int32.max - 1), tf.int32)
            seed = fold_seed(seed, _replica_id())
        if t is None:
            t = tf.random.stateless_uniform(
                tf.shape(x0)[:1],
                seed=fold_seed(seed, 0),
                minval=0,
                maxval=self.schedule.timesteps,
                dtype=tf.int32,
                alg=RNG_ALG,
            )
        if noise is None:
            noise = normal(tf.shape(x0), fold_seed(seed, 1))
        everything = None  # (B,) bool: examples whose conditions and mask all become unknown
        if conditioned and uncond > 0:
            everything = tf.random.stateless_uniform(tf.shape(x0)[:1], seed=fold_seed(seed, 4), alg=RNG_ALG) < uncond
        if cond is not None:
            cond = tf.cast(cond, tf.float32)
            if dropout > 0:
                drop = tf.random.stateless_uniform(tf.shape(cond), seed=fold_seed(seed, 2), alg=RNG_ALG) < dropout
                cond = tf.where(drop, tf.constant(float("nan")), cond)
            if everything is not None:
                cond = tf.where(everything[:, None], tf.constant(float("nan")), cond)
        if tissue is not None:
            tissue = tf.cast(tissue, tf.float32)
            if mask_dropout > 0:
                drop = tf.random.stateless_uniform(tf.shape(tissue)[:1], seed=fold_seed(seed, 3), alg=RNG_ALG)
                drop = drop < mask_dropout
                tissue = tf.where(drop[:, None, None, None], 0.0, tissue)
            if everything is not None:
                tissue = tf.where(everything[:, None, None, None], 0.0, tissue)
        return x0, tf.cast(t, tf.int32), tf.cast(noise, tf.float32), cond, tissue

    def train_step(self, data):
        """One optimizer step on the epsilon-MSE, then one EMA update; returns {"loss": running mean}."""
        x0, t, noise, cond, tissue = self._draws(
            data, self.train_seed, self.cond_dropout, self.mask_dropout, self.uncond_dropout
        )
        with tf.GradientTape() as tape:
            loss = epsilon_mse(
                self.network,
                self.schedule,
                x0,
                t,
                noise,
                training=True,
                cond=cond,
                min_snr_gamma=self.min_snr_gamma,
                tissue=tissue,
                prediction=self.prediction,
            )
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
        x0, t, noise, cond, tissue = self._draws(data, self.val_seed)
        loss = epsilon_mse(
            self.ema_network,
            self.schedule,
            x0,
            t,
            noise,
            cond=cond,
            min_snr_gamma=self.min_snr_gamma,
            tissue=tissue,
            prediction=self.prediction,
        )
        self.loss_tracker.update_state(loss)
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
