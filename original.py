"""Re-implementations of the original design's approach: the baselines of bench.py, nothing else.

Each one re-implements how the original did a job, so bench.py can time it in the same
process as the project's way of doing it:

- `original_unet_step`: the diffusion training step, eager `GradientTape`, t and ε drawn in
  NumPy, float32 (the project's noise schedule and loss, `diffusion.epsilon_mse`).
- `original_unet` (and `PlainOriginalUNet`, the same graph behind the network call that
  `LatentDiffusion` trains): the original's UNet (lucidrains' early layout) as a plain
  functional Keras graph.
- `original_autoencoder_step`: the autoencoder training step, eager `GradientTape` on the
  pixel MSE, float32.
- `original_sampler`: DDPM sampling one image at a time, eager UNet calls at batch 1, NumPy
  arithmetic between them.
- `original_load_all`: decode and resize every PNG up front into one NumPy array.

`original_unet` is written apart from modules.py on purpose: tests/test_bench.py checks that,
with copied weights, it gives the output of modules' UNet of layout "original", which makes
the two independent implementations of one network.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from diffusion import epsilon_mse


def original_unet_step(unet, optimizer, schedule, x0: np.ndarray, rng: np.random.Generator) -> float:
    """The original's diffusion training step: eager, t and ε drawn in NumPy, float32.

    loss = mean (ε - unet(x_t, t))², x_t ~ q(x_t | x_0) (the project's q_sample and loss).
    """
    t = rng.integers(0, schedule.timesteps, size=len(x0))
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    with tf.GradientTape() as tape:
        loss = epsilon_mse(unet, schedule, x0, t, noise, training=True)
    grads = tape.gradient(loss, unet.trainable_variables)
    optimizer.apply_gradients(zip(grads, unet.trainable_variables, strict=True))
    return float(loss)


def original_unet(size, channels=1, dim=64, dim_mults=(1, 2, 4, 8), groups=8, heads=4, dim_head=32) -> keras.Model:
    """The original's UNet as a plain functional Keras graph:
    [x_t (B, size, size, channels), t (B,) int32] -> eps, float32.

    Init conv7x7 to dim // 3 * 2; per level two ResNet blocks (the first changes the width),
    linear attention, ONE skip, a stride-2 conv4x4 (not at the last level); middle block,
    full attention, block; per level but the first, deepest first, concat skip, two blocks,
    linear attention, stride-2 transposed conv4x4; a block and a 1x1 conv. The attention is
    keras.ops maths on the functional graph, so its sizes are fixed at `size`.
    """
    L, hidden = keras.layers, heads * dim_head
    x_in, t_in = keras.Input((size, size, channels), name="x_t"), keras.Input((), dtype="int32", name="t")
    half = dim // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / (half - 1)).astype("float32")
    angles = ops.cast(t_in, "float32")[:, None] * freqs
    emb = L.Dense(4 * dim, activation="gelu")(ops.concatenate([ops.sin(angles), ops.cos(angles)], axis=-1))
    emb = L.Dense(4 * dim)(emb)

    def resnet(x, width):  # conv-norm-(scale, shift from t)-silu, conv-norm-silu, + (1x1) skip
        scale, shift = ops.split(L.Dense(2 * width)(ops.silu(emb))[:, None, None, :], 2, axis=-1)
        h = L.GroupNormalization(groups, epsilon=1e-5)(L.Conv2D(width, 3, padding="same")(x))
        h = ops.silu(h * (1.0 + scale) + shift)
        h = ops.silu(L.GroupNormalization(groups, epsilon=1e-5)(L.Conv2D(width, 3, padding="same")(h)))
        return h + (L.Conv2D(width, 1)(x) if x.shape[-1] != width else x)

    def heads_of(x):  # pre-norm, 1x1 conv to q, k, v, each (B, heads, h*w, dim_head)
        qkv = L.Conv2D(3 * hidden, 1, use_bias=False)(L.GroupNormalization(1, epsilon=1e-5)(x))
        shape = (-1, x.shape[1] * x.shape[2], heads, dim_head)
        return [ops.transpose(ops.reshape(a, shape), (0, 2, 1, 3)) for a in ops.split(qkv, 3, axis=-1)]

    def merged(out, x):  # (B, heads, h*w, dim_head) -> (B, h, w, hidden)
        return ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (-1, x.shape[1], x.shape[2], hidden))

    def linear_attention(x):
        q, k, v = heads_of(x)
        q, k = ops.softmax(q, axis=-1) * dim_head**-0.5, ops.softmax(k, axis=-2)
        out = ops.einsum("bhnd,bhde->bhne", q, ops.einsum("bhnd,bhne->bhde", k, v))
        return x + L.GroupNormalization(1, epsilon=1e-5)(L.Conv2D(x.shape[-1], 1)(merged(out, x)))

    def full_attention(x):
        q, k, v = heads_of(x)
        weights = ops.softmax(ops.einsum("bhid,bhjd->bhij", q, k) * dim_head**-0.5, axis=-1)
        return x + L.Conv2D(x.shape[-1], 1)(merged(ops.einsum("bhij,bhjd->bhid", weights, v), x))

    dims = [dim // 3 * 2] + [dim * m for m in dim_mults]
    in_out = list(zip(dims[:-1], dims[1:], strict=True))
    x, skips = L.Conv2D(dims[0], 7, padding="same")(x_in), []
    for i, (_, dim_out) in enumerate(in_out):
        x = linear_attention(resnet(resnet(x, dim_out), dim_out))
        skips.append(x)
        if i < len(in_out) - 1:
            x = L.Conv2D(dim_out, 4, strides=2, padding="same")(x)
    x = resnet(full_attention(resnet(x, dims[-1])), dims[-1])
    for dim_in, _ in reversed(in_out[1:]):
        x = resnet(resnet(L.Concatenate()([x, skips.pop()]), dim_in), dim_in)
        x = L.Conv2DTranspose(dim_in, 4, strides=2, padding="same")(linear_attention(x))
    x = resnet(x, dim)
    eps = L.Conv2D(channels, 1, dtype="float32")(x)
    return keras.Model([x_in, t_in], eps, name="original_unet")


class PlainOriginalUNet(keras.Model):
    """`original_unet`'s graph behind the `network(x_t, t, training=...)` call and the `get_config`
    that `LatentDiffusion` needs (its EMA copy is rebuilt from the config), so the original's UNet
    trains in exactly the project's compiled train step."""

    def __init__(self, size, channels=1, dim=64, dim_mults=(1, 2, 4, 8), groups=8, heads=4, dim_head=32, **kwargs):
        super().__init__(**kwargs)
        self.arch = dict(
            size=size,
            channels=channels,
            dim=dim,
            dim_mults=tuple(dim_mults),
            groups=groups,
            heads=heads,
            dim_head=dim_head,
        )
        self.graph = original_unet(**self.arch)

    def call(self, x_t, t, training=None):
        return self.graph([x_t, t], training=training)

    def get_config(self):
        return {"name": self.name, **self.arch}


def original_autoencoder_step(autoencoder, optimizer, x: np.ndarray) -> float:
    """The original's autoencoder step: eager GradientTape on the pixel MSE, float32."""
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(x - autoencoder(x, training=True)))
    grads = tape.gradient(loss, autoencoder.trainable_variables)
    optimizer.apply_gradients(zip(grads, autoencoder.trainable_variables, strict=True))
    return float(loss)


def original_sampler(unet, decoder, schedule, latent_shape, steps: int, rng: np.random.Generator) -> np.ndarray:
    """The original's sampler for ONE image: eager UNet calls at batch 1, NumPy arithmetic.

    x_{t-1} = (x_t - β_t / sqrt(1 - ᾱ_t) ε̂) / sqrt(α_t) + σ_t z, for t = T-1 … T-steps
    (all T steps when steps = T), then the decoder. Returns the image (1, H, W, 1).
    """
    x = rng.standard_normal((1, *latent_shape)).astype(np.float32)
    betas, alphas = np.asarray(schedule.betas), np.asarray(schedule.alphas)
    sqrt_one_minus = np.asarray(schedule.sqrt_one_minus_alphas_cumprod)
    sigmas = np.sqrt(np.asarray(schedule.posterior_variance))
    for t in range(schedule.timesteps - 1, schedule.timesteps - 1 - steps, -1):
        eps = unet(x, np.array([t], np.int32), training=False).numpy()
        x = (x - betas[t] / sqrt_one_minus[t] * eps) / np.sqrt(alphas[t])
        if t > 0:
            x = (x + sigmas[t] * rng.standard_normal(x.shape)).astype(np.float32)
    return decoder(x, training=False).numpy()


def original_load_all(paths: list[str], image_size: int) -> np.ndarray:
    """The original's data loading: decode and resize every PNG up front into one float32
    array (N, size, size, 1) in [-1, 1] (the original used [0, 1]; same size in memory)."""
    from PIL import Image

    images = []
    for path in paths:
        with Image.open(path) as image:
            pixels = image.convert("L").resize((image_size, image_size), Image.BILINEAR)
        images.append(np.asarray(pixels, np.float32) / 127.5 - 1.0)
    return np.stack(images)[..., None]
