"""Samplers of a trained noise predictor: DDPM, DDIM and DPM-Solver++(2M), with classifier-free guidance.

All three run their whole reverse process in one compiled ``tf.function`` holding one
``tf.while_loop`` (``Sampler._loop``), batched, seeded with stateless RNG so that a seed
always gives the same latents; they differ only in the update rule of a step. The network
contract and the schedule's indexing convention are diffusion.py's (index t in [0, T)
holds alpha_bar_t; ``network(x_t, t[, cond])`` predicts eps). Each step forms

    x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t)      (optionally clipped)

and the last one, at index 0, returns x0_hat:

* DDPM ancestral sampling (Ho et al. 2020, algorithm 2): x_{t-1} ~ q(x_{t-1} | x_t, x0_hat),
  the Gaussian posterior with mean c1_t x0_hat + c2_t x_t and the "fixed small" variance
  beta~_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t); no noise at the last step.
* DDIM (Song et al. 2021, eq. 12) on S <= T evenly spaced indices; eta = 0 is
  deterministic, eta = 1 with S = T is exactly DDPM.
* DPM-Solver++(2M) (Lu et al. 2022), deterministic, on the same S indices: with
  alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), lambda_t = log(alpha_t / sigma_t)
  and h = lambda_next - lambda_t, one step is the exponential integrator of the probability
  flow ODE in data-prediction form,
      x_next = (sigma_next / sigma_t) x_t - alpha_next (exp(-h) - 1) D,
  with D = x0_hat (first order) or the multistep second-order
  D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_prev, r = h_prev / h (see ``Sampler.dpmpp``).

Classifier-free guidance (Ho & Salimans 2022): given a cond and/or a tissue mask and a
weight w != 1, eps_hat = eps_u + w (eps_c - eps_u), both halves from one network call on a
doubled batch whose second half has every condition unknown (NaN) and a zero mask.

``Sampler.sample(shape, options)`` runs the sampler a ``config.SamplingOptions`` names;
``ddpm``, ``ddim`` and ``dpmpp`` take their settings one by one. Latents are on the
training scale (multiplied by the latent scale factor): divide by it before decoding.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from config import PREDICTIONS, SAMPLERS, SamplingOptions
from diffusion import NoiseSchedule, fold_seed, normal, predict_eps

# The settings each sampler takes from SamplingOptions (besides the seed and the guidance weight).
SAMPLER_SETTINGS = {"ddim": ("steps", "eta"), "dpmpp": ("steps",), "ddpm": ()}


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
    per network to profit from that (``runs.Run`` holds the EMA network's).

    Randomness: the initial noise x_T uses ``fold_in(seed, 0)`` (unless ``initial_noise``
    is given) and loop step j (j = 0 is the noisiest) uses ``fold_in(seed, j + 1)``, all
    stateless Philox: the same
    seed gives the same latents on every call with the same ``jit_compile`` (XLA draws
    other numbers from a seed than TF's kernels do).

    Args:
        network: the noise predictor (see the module docstring); built on first use.
        schedule: the schedule it was trained with.
        jit_compile: compile the loops with XLA (works on CPU; may pay off on GPU).
        prediction: what the network predicts, "eps" or "v" (`diffusion.predict_eps` turns v
            into eps_hat, so the update rules below see eps_hat either way).
    """

    def __init__(self, network, schedule: NoiseSchedule, jit_compile: bool = False, prediction: str = "eps"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.network = network
        self.schedule = schedule
        self.prediction = prediction
        # autograph=False: the graphs branch on Python values only (the loop is an explicit
        # tf.while_loop), so AutoGraph's source conversion would only add to every trace.
        self._ddpm_fn = tf.function(self._ddpm_graph, jit_compile=jit_compile, autograph=False)
        self._ddim_fn = tf.function(self._ddim_graph, jit_compile=jit_compile, autograph=False)
        self._dpmpp_fn = tf.function(self._dpmpp_graph, jit_compile=jit_compile, autograph=False)

    def sample(
        self,
        shape,
        options: SamplingOptions,
        num_intermediates: int = 0,
        clip_x0: float | None = None,
        initial_noise=None,
        cond=None,
        tissue=None,
    ):
        """The sampler `options.sampler` names, with the settings of `options` it takes
        (`SAMPLER_SETTINGS`: DDIM steps and eta, DPM-Solver++ steps; DDPM runs all T), its
        seed and its guidance weight. The other arguments and the result: see ``ddpm``."""
        if options.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {options.sampler!r}")
        options = options.resolved(self.schedule.timesteps)
        settings = {name: getattr(options, name) for name in SAMPLER_SETTINGS[options.sampler]}
        return getattr(self, options.sampler)(
            shape,
            seed=options.seed,
            num_intermediates=num_intermediates,
            clip_x0=clip_x0,
            initial_noise=initial_noise,
            cond=cond,
            tissue=tissue,
            guidance=options.guidance,
            **settings,
        )

    def ddpm(
        self,
        shape,
        seed: int = 0,
        num_intermediates: int = 0,
        clip_x0: float | None = None,
        initial_noise=None,
        cond=None,
        guidance: float = 1.0,
        tissue=None,
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
            guidance: classifier-free guidance weight w, used when ``cond`` or ``tissue`` is
                given: eps_hat = eps_u + w (eps_c - eps_u); w = 1 (the default) makes one
                plain conditional call per step, any other w one call on the doubled batch.
            tissue: (B, h, w, M) float32 tissue mask per latent cell (masks.mask_input)
                for a mask-conditioned network, or None (the
                network then sees the mask as unknown).

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
            tissue=tissue,
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
        tissue=None,
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
            seed, num_intermediates, clip_x0, initial_noise, cond, guidance, tissue: as in
                ``ddpm`` (K up to S + 1).

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
            tissue=tissue,
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
        tissue=None,
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
            seed, num_intermediates, clip_x0, initial_noise, cond, guidance, tissue: as in
                ``ddpm`` (K up to S + 1). The seed only draws the initial noise: with ``initial_noise`` the result
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
            tissue=tissue,
            guidance=guidance,
        )

    # The graphs share the loop; only the update rule (and its extra state) differs.

    def _run(
        self, fn, shape, visited, seed, num_intermediates, clip_x0, initial_noise, cond, tissue, guidance, **options
    ):
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
        if tissue is not None:
            tissue = tf.cast(tissue, tf.float32)
            if tissue.shape.rank != 4 or tuple(tissue.shape[:3]) != shape[:3]:
                raise ValueError(f"tissue must be (B, h, w) = {shape[:3]} + (M,), got {tuple(tissue.shape)}")
        record = _recorded_states(len(visited), num_intermediates)
        _ensure_built(self.network, shape)
        clip = None if clip_x0 is None else float(clip_x0)
        latents, intermediates = fn(
            _seed_tensor(seed),
            initial_noise,
            cond,
            tissue,
            tf.constant(guidance, tf.float32),  # a tensor: a new weight does not retrace
            guided=(cond is not None or tissue is not None) and float(guidance) != 1.0,
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

    def _ddpm_graph(self, seed, initial_noise, cond, tissue, guidance, guided, shape, visited, record, clip_x0):
        s = self.schedule

        def update(i, t, x, eps_hat, z):
            del i  # DDPM visits every index; t is all it needs
            x0_hat = _predict_x0(s, t, x, eps_hat, clip_x0)
            mean = s.posterior_mean_coef1[t] * x0_hat + s.posterior_mean_coef2[t] * x
            # beta~_0 is 0 already; the explicit mask documents (and guarantees) that the last
            # step adds no noise, the original sampler's bug.
            std = tf.where(t > 0, tf.sqrt(s.posterior_variance[t]), 0.0)
            return mean + std * z

        return self._loop(seed, initial_noise, (cond, tissue, guidance, guided), shape, visited, record, update)

    def _ddim_graph(self, seed, initial_noise, cond, tissue, guidance, guided, shape, visited, record, eta, clip_x0):
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

        return self._loop(seed, initial_noise, (cond, tissue, guidance, guided), shape, visited, record, update)

    def _dpmpp_graph(self, seed, initial_noise, cond, tissue, guidance, guided, shape, visited, record, clip_x0):
        s = self.schedule
        coef = tf.constant(_dpmpp_coefficients(s, visited), tf.float32)

        def update(i, t, x, eps_hat, z, x0_prev):
            del z  # deterministic
            c_x, c_d, w, w_prev = tf.unstack(coef[i])
            x0_hat = _predict_x0(s, t, x, eps_hat, clip_x0)
            return c_x * x + c_d * (w * x0_hat + w_prev * x0_prev), x0_hat

        # The previous x0_hat is loop state; its weight is 0 at the first step.
        return self._loop(
            seed, initial_noise, (cond, tissue, guidance, guided), shape, visited, record, update, carry=tf.zeros(shape)
        )

    def _eps(self, x, t, cond, tissue):
        return predict_eps(self.network, x, t, cond, tissue=tissue, prediction=self.prediction, schedule=self.schedule)

    def _guided_eps(self, x, t, cond, tissue, guidance, guided):
        """eps_hat for x (B, h, w, c) at index t: unconditional (cond and tissue None), conditional,
        or guided, eps_u + w (eps_c - eps_u) from one call on the batch doubled with unknown
        conditions (NaN) and unknown masks (zeros)."""
        batch = x.shape[0]
        if not guided:
            return self._eps(x, tf.fill([batch], t), cond, tissue)
        if cond is not None:
            cond = tf.concat([cond, tf.fill(tf.shape(cond), float("nan"))], 0)
        if tissue is not None:
            tissue = tf.concat([tissue, tf.zeros_like(tissue)], 0)
        both = self._eps(tf.concat([x, x], 0), tf.fill([2 * batch], t), cond, tissue)
        eps_c, eps_u = both[:batch], both[batch:]
        return eps_u + guidance * (eps_c - eps_u)

    def _loop(self, seed, initial_noise, conditioning, shape, visited, record, update, carry=None):
        """Run ``update`` from ``initial_noise`` (None: fresh noise from ``seed``) over ``visited``
        (noisiest first); return (x, intermediates). ``conditioning`` = (cond, tissue, guidance, guided),
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

        x = normal(shape, fold_seed(seed, 0)) if initial_noise is None else initial_noise
        inter = tf.zeros((len(record),) + shape, tf.float32)
        if record:
            inter = remember(inter, 0, x)

        def body(j, x, inter, carry):
            i = n - 1 - j  # position in visited: loop step j = 0 is the noisiest index
            t = visited_t[i]
            eps_hat = self._guided_eps(x, t, *conditioning)
            z = normal(shape, fold_seed(seed, j + 1))
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
