"""The latent denoising UNets of oasis-ldm (the image autoencoder is autoencoder.py's).

Every class is a Keras 3 layer or model with a ``get_config``. Nothing here trains, loads
data or knows the noise schedule (``diffusion.py`` does); ``runs.py`` builds the networks
a run's config describes. Conventions:

* tensors are NHWC; images are float32 in [-1, 1]; timesteps are int32 of shape (B,);
* shapes are read from the tensor (``x.shape`` for the static checks, ``keras.ops.shape``
  where a size may be unknown until run time);
* under a mixed dtype policy (e.g. ``"mixed_bfloat16"``) layers compute in its compute
  dtype with float32 variables; the attention math and every network's output are float32.

``UNet(dim=64, dim_mults=(1, 2, 4, 8), channels=1, ...)``, ``OriginalUNet`` (same arguments)
    ``net(x_t, t)`` or, conditioned, ``net(x_t, t, cond, tissue=m)`` (cond (B, K) float32,
    NaN = unknown; m (B, h, w, mask_channels) float32 tissue mask at the latent's resolution,
    ``masks.mask_input``, all 0 = unknown)
    -> the predicted noise, float32 of x_t's shape. ``UNet`` is this project's
    wiring (two skips per level), ``OriginalUNet`` the original design's (one skip per
    level; the ``seed`` preset's). Subclassed: ``net.build_for((h, w, c))`` creates the
    weights, e.g. before ``load_weights``.

The UNets' layers: ``SinusoidalTimeEmbedding``, ``ConditionEmbedding``, ``ResnetBlock``,
``LinearAttention``, ``FullAttention``. Saved weights (``.weights.h5``) are keyed by attribute names and, for
layers held in lists, by class name and creation order: renaming, retyping or reordering
layers breaks the loading of existing runs.
"""

from __future__ import annotations

import math

import keras
from einops import rearrange
from keras import ops

PACKAGE = "oasis_ldm"


def check_divisible(x, factor, what):
    """Raise a ValueError when x's static height or width is not a multiple of factor.

    Sizes unknown at trace time (None) are not checked: a wrong size then fails
    later inside a concatenation with a less readable message.
    """
    for axis, name in ((1, "height"), (2, "width")):
        size = x.shape[axis]
        if size is not None and size % factor:
            raise ValueError(
                f"{what}: input {name} {size} is not divisible by {factor} "
                f"(= 2**{int(math.log2(factor))}, one halving per level transition)"
            )


# --------------------------------------------------------------------------- #
# The UNets and their layers
# --------------------------------------------------------------------------- #
@keras.saving.register_keras_serializable(package=PACKAGE)
class SinusoidalTimeEmbedding(keras.layers.Layer):
    """Transformer-style sinusoidal embedding of integer timesteps (no weights).

    t (B,) int -> (B, dim) in the compute dtype, with half = dim // 2 and
    freq_i = exp(-ln(10000) * i / (half - 1)), i = 0 .. half-1:
    emb = [sin(t * freq_0..half-1), cos(t * freq_0..half-1)] (computed in float32).
    """

    def __init__(self, dim, **kwargs):
        super().__init__(**kwargs)
        if dim < 4 or dim % 2:
            raise ValueError(f"time embedding dim must be even and >= 4, got {dim}")
        self.dim = dim

    def call(self, t):
        half = self.dim // 2
        freqs = ops.exp(ops.arange(half, dtype="float32") * (-math.log(10000.0) / (half - 1)))
        args = ops.cast(ops.reshape(t, (-1, 1)), "float32") * freqs[None, :]
        emb = ops.concatenate([ops.sin(args), ops.cos(args)], axis=-1)
        return ops.cast(emb, self.compute_dtype)

    def compute_output_shape(self, t_shape):
        return (t_shape[0], self.dim)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ConditionEmbedding(keras.layers.Layer):
    """Embedding of K condition variables, any of them unknown, summed into one vector.

    cond (B, K) float32 -> (B, dim) in the compute dtype. Column k holds variable k, already
    normalised (conditioning.normalise): a z-score for a continuous variable
    (``categories[k] == 0``), the category index for a categorical one; NaN = unknown.

        e_k = MLP_k(v_k)  = Dense(dim)(SiLU(Dense(dim)(v_k)))     continuous
        e_k = table_k[v_k]                                          categorical
        e_k = null_k            (a learned "unknown" vector)        where v_k is NaN
        out = sum_k e_k

    So a network trained with conditions dropped at random (classifier-free guidance) is
    conditional, partly conditional and unconditional at once: all-NaN is "no condition".
    NaNs are replaced before any arithmetic, so they never reach a gradient.
    """

    def __init__(self, categories, dim, **kwargs):
        super().__init__(**kwargs)
        self.categories, self.dim = tuple(int(c) for c in categories), int(dim)
        if not self.categories:
            raise ValueError("ConditionEmbedding needs at least one variable")
        self.encoders = []
        for k, count in enumerate(self.categories):
            if count:
                encoder = keras.layers.Embedding(count, dim, name=f"cond{k}_table")
            else:
                hidden = keras.layers.Dense(dim, activation="silu", name=f"cond{k}_dense1")
                encoder = keras.Sequential(
                    [hidden, keras.layers.Dense(dim, name=f"cond{k}_dense2")], name=f"cond{k}_mlp"
                )
            self.encoders.append(encoder)

    def build(self, cond_shape):
        self.null = self.add_weight(shape=(len(self.categories), self.dim), initializer="zeros", name="unknown")
        for count, encoder in zip(self.categories, self.encoders, strict=True):
            encoder.build((None,) if count else (None, 1))

    def call(self, cond):
        cond = ops.cast(cond, "float32")
        known = ops.logical_not(ops.isnan(cond))
        values = ops.where(known, cond, 0.0)
        total = 0.0
        for k, (count, encoder) in enumerate(zip(self.categories, self.encoders, strict=True)):
            if count:
                e = encoder(ops.clip(ops.cast(values[:, k], "int32"), 0, count - 1))
            else:
                e = encoder(ops.cast(values[:, k : k + 1], self.compute_dtype))
            null = ops.cast(self.null[k], e.dtype)[None, :]
            total = total + ops.where(known[:, k : k + 1], e, null)
        return ops.cast(total, self.compute_dtype)

    def compute_output_shape(self, cond_shape):
        return (cond_shape[0], self.dim)

    def get_config(self):
        return {**super().get_config(), "categories": list(self.categories), "dim": self.dim}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ResnetBlock(keras.layers.Layer):
    """Two conv-GroupNorm-SiLU blocks with a time-conditioned scale and shift, plus a skip.

    x (B, h, w, in_channels), time_emb (B, T) -> (B, h, w, out_channels):

        scale, shift = split(Dense(2 * out)(SiLU(time_emb)))
        h = SiLU(GroupNorm(conv3x3(x)) * (1 + scale) + shift)
        h = SiLU(GroupNorm(conv3x3(h)))
        out = h + skip(x)        # skip = 1x1 conv when in != out channels, else identity

    The 1 + scale form makes a zero time projection leave the features untouched.
    Both GroupNorms normalise out_channels features, so only out_channels must be a
    multiple of ``groups``; in_channels may be anything (OriginalUNet's first block
    takes its 42-wide init conv, not a multiple of 8, to 64).
    """

    def __init__(self, in_channels, out_channels, groups=8, **kwargs):
        super().__init__(**kwargs)
        if out_channels % groups:
            raise ValueError(f"ResnetBlock: output channel count {out_channels} is not divisible by groups={groups}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.time_scale_shift = keras.layers.Dense(2 * out_channels, name="time_scale_shift")
        self.conv1 = keras.layers.Conv2D(out_channels, 3, padding="same", name="conv1")
        self.norm1 = keras.layers.GroupNormalization(groups, epsilon=1e-5, name="norm1")
        self.conv2 = keras.layers.Conv2D(out_channels, 3, padding="same", name="conv2")
        self.norm2 = keras.layers.GroupNormalization(groups, epsilon=1e-5, name="norm2")
        self.skip = keras.layers.Conv2D(out_channels, 1, name="skip") if in_channels != out_channels else None

    def build(self, x_shape, time_emb_shape):
        # Every sublayer from the input shapes: without this method Keras would build the block by
        # tracing call() once more on symbolic inputs (the initial values are the same either way:
        # each initializer's seed is drawn when the sublayer is made, in __init__).
        out_shape = (*x_shape[:-1], self.out_channels)
        self.time_scale_shift.build(time_emb_shape)
        self.conv1.build(x_shape)
        self.norm1.build(out_shape)
        self.conv2.build(out_shape)
        self.norm2.build(out_shape)
        if self.skip is not None:
            self.skip.build(x_shape)

    def call(self, x, time_emb):
        scale_shift = self.time_scale_shift(ops.silu(time_emb))[:, None, None, :]
        scale, shift = ops.split(scale_shift, 2, axis=-1)
        h = self.norm1(self.conv1(x))
        h = ops.silu(h * (1.0 + scale) + shift)
        h = ops.silu(self.norm2(self.conv2(h)))
        return h + (self.skip(x) if self.skip is not None else x)

    def compute_output_shape(self, x_shape, time_emb_shape):
        return (*x_shape[:-1], self.out_channels)

    def get_config(self):
        return {
            **super().get_config(),
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "groups": self.groups,
        }


class _Attention(keras.layers.Layer):
    """What LinearAttention and FullAttention share: pre-norm, q, k, v per head, out conv.

    x (B, h, w, C) -> GroupNorm(1) -> 1x1 conv (no bias) -> q, k, v, each (B, heads, n, d)
    in float32, with n = h * w and d = dim_head; the subclass's ``attend(q, k, v)`` gives
    (B, heads, n, d), whose heads are merged back to (B, h, w, heads * d) in the compute
    dtype for ``to_out``, a 1x1 conv to C.
    """

    def __init__(self, channels, heads=4, dim_head=32, **kwargs):
        super().__init__(**kwargs)
        self.channels, self.heads, self.dim_head = channels, heads, dim_head
        self.pre_norm = keras.layers.GroupNormalization(1, epsilon=1e-5, name="pre_norm")
        self.to_qkv = keras.layers.Conv2D(3 * heads * dim_head, 1, use_bias=False, name="to_qkv")
        self.to_out = keras.layers.Conv2D(channels, 1, name="to_out")

    def build(self, x_shape):
        # From the shape, not by a trace of call() (see ResnetBlock.build).
        self.pre_norm.build(x_shape)
        self.to_qkv.build(x_shape)
        self.to_out.build((*x_shape[:-1], self.heads * self.dim_head))

    def _attended(self, x):
        """pre_norm, to_qkv, ``attend`` and the head merge: (B, h, w, heads * dim_head)."""
        height, width = ops.shape(x)[1], ops.shape(x)[2]
        qkv = ops.cast(self.to_qkv(self.pre_norm(x)), "float32")
        q, k, v = (rearrange(t, "b x y (h d) -> b h (x y) d", h=self.heads) for t in ops.split(qkv, 3, axis=-1))
        out = rearrange(self.attend(q, k, v), "b h (x y) d -> b x y (h d)", x=height, y=width)
        return ops.cast(out, self.compute_dtype)

    def compute_output_shape(self, x_shape):
        return x_shape

    def get_config(self):
        return {**super().get_config(), "channels": self.channels, "heads": self.heads, "dim_head": self.dim_head}


@keras.saving.register_keras_serializable(package=PACKAGE)
class LinearAttention(_Attention):
    """Residual, pre-normalised linear ("efficient") attention; O(n) in the pixel count n.

    x (B, h, w, C) -> (B, h, w, C). Per head, with q, k, v of shape (n, d) (see ``_Attention``):

        q' = softmax over the feature axis d of q, times d ** -0.5
        k' = softmax over the sequence axis n of k
        context = k'^T v                      (d, d)
        out     = q' context                  (n, d)

    then heads are merged, a 1x1 conv + GroupNorm(1) map back to C, and x is added.
    """

    def __init__(self, channels, heads=4, dim_head=32, **kwargs):
        super().__init__(channels, heads, dim_head, **kwargs)
        self.out_norm = keras.layers.GroupNormalization(1, epsilon=1e-5, name="out_norm")

    def build(self, x_shape):
        super().build(x_shape)
        self.out_norm.build(x_shape)

    def attend(self, q, k, v):
        q = ops.softmax(q, axis=-1) * self.dim_head**-0.5
        k = ops.softmax(k, axis=-2)
        context = ops.einsum("bhnd,bhne->bhde", k, v)
        return ops.einsum("bhnd,bhde->bhne", q, context)

    def call(self, x):
        return x + self.out_norm(self.to_out(self._attended(x)))


@keras.saving.register_keras_serializable(package=PACKAGE)
class FullAttention(_Attention):
    """Residual, pre-normalised multi-head softmax self-attention over all pixels; O(n^2).

    x (B, h, w, C) -> (B, h, w, C). Per head, with q, k, v of shape (n, d) (see ``_Attention``):

        out = softmax(q k^T * d ** -0.5, over keys) v

    then heads are merged, a 1x1 conv maps back to C, and x is added. The softmax
    subtracts the row maximum before exponentiating. Used at the bottleneck, where n is small.
    """

    def attend(self, q, k, v):
        logits = ops.einsum("bhid,bhjd->bhij", q, k) * self.dim_head**-0.5
        logits = logits - ops.stop_gradient(ops.max(logits, axis=-1, keepdims=True))
        weights = ops.exp(logits)
        weights = weights / ops.sum(weights, axis=-1, keepdims=True)
        return ops.einsum("bhij,bhjd->bhid", weights, v)

    def call(self, x):
        return x + self.to_out(self._attended(x))


class _UNetBase(keras.Model):
    """What UNet and OriginalUNet share: the arguments, the stem, the time embedding, the checks.

    ``dim``: the base width; ``dim_mults``: one width multiplier per level; ``channels``: the
    latent's; ``resnet_groups``: the ResnetBlocks' GroupNorm groups; ``attn_heads``,
    ``attn_dim_head``: the attention layers'; ``attn_from_level``: the first level (0: the
    input's resolution) whose blocks are followed by a LinearAttention; the levels above it
    have an identity there instead (their linear attentions cost about a third of a small
    UNet's step: BENCHMARKS.md); ``cond_categories``: per condition variable
    its category count, 0 for a continuous one (empty: unconditional); ``mask_channels``: M,
    the channels of the tissue mask the network is conditioned on (0: none). ``init_dim`` is
    the subclass's width after ``init_conv`` (a conv7x7).

    The time MLP, sinusoid(t, dim) -> Dense(4 dim, GELU) -> Dense(4 dim), conditions every
    ResnetBlock; with ``cond_categories`` a ``ConditionEmbedding`` of cond (B, K) is added
    to it, so every block sees the conditions too, and ``cond=None`` means all unknown.

    A tissue mask enters as the LDM paper's semantic synthesis does (Rombach et al. 2022,
    sec. 4.3.2: the map at latent resolution concatenated to z_t): ``tissue`` (B, h, w, M)
    is ``masks.mask_input``, per latent cell the classes of its image pixels (one-hot, M = 4
    f², or the classes' shares of the cell, M = 4), and init_conv sees [x_t, tissue] (c + M
    channels). A known mask sums to 1 in every cell, so all zeros is free to mean "unknown"
    (classifier-free guidance drops it to that); ``tissue=None`` is all zeros.
    """

    layout = None  # the subclass's config.unet.unet_layout: "project" or "original"

    def __init__(
        self,
        dim=64,
        dim_mults=(1, 2, 4, 8),
        channels=1,
        resnet_groups=8,
        attn_heads=4,
        attn_dim_head=32,
        attn_from_level=0,
        cond_categories=(),
        mask_channels=0,
        *,
        init_dim,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.dim, self.dim_mults, self.channels = dim, tuple(dim_mults), channels
        self.cond_categories = tuple(int(c) for c in cond_categories)
        self.mask_channels = int(mask_channels)
        self.resnet_groups = resnet_groups
        self.attn_heads, self.attn_dim_head = attn_heads, attn_dim_head
        self.attn_from_level = int(attn_from_level)
        if not self.dim_mults:
            raise ValueError(f"{type(self).__name__}: dim_mults must not be empty")
        self.downsample_factor = 2 ** (len(self.dim_mults) - 1)

        # Created first and in this order: the order of model.weights and of saved weights.
        self.init_conv = keras.layers.Conv2D(init_dim, 7, padding="same", name="init_conv")
        self.time_embedding = SinusoidalTimeEmbedding(dim, name="time_sinusoid")
        self.time_dense1 = keras.layers.Dense(4 * dim, activation="gelu", name="time_dense1")
        self.time_dense2 = keras.layers.Dense(4 * dim, name="time_dense2")
        self.cond_embedding = (
            ConditionEmbedding(self.cond_categories, 4 * dim, name="cond_embedding") if self.cond_categories else None
        )

    def _stem(self, x_t, t, cond, tissue):
        """Check the inputs; return init_conv([x_t, tissue]) and the time (+ condition) embedding (B, 4 dim)."""
        name = type(self).__name__
        check_divisible(x_t, self.downsample_factor, name)
        if x_t.shape[-1] is not None and x_t.shape[-1] != self.channels:
            raise ValueError(f"{name}: expected {self.channels} input channels, got {x_t.shape[-1]}")
        x = ops.cast(x_t, self.compute_dtype)
        if self.mask_channels:
            if tissue is None:  # no mask known: the unconditional model
                tissue = ops.zeros((*ops.shape(x_t)[:-1], self.mask_channels))
            elif tissue.shape[-1] is not None and tissue.shape[-1] != self.mask_channels:
                raise ValueError(
                    f"{name}: expected a tissue mask of {self.mask_channels} channels, got {tissue.shape[-1]}"
                )
            x = ops.concatenate([x, ops.cast(tissue, self.compute_dtype)], axis=-1)
        elif tissue is not None:
            raise ValueError(f"{name}: this network was built without a tissue-mask input (mask_channels=0)")
        x = self.init_conv(x)
        time_emb = self.time_dense2(self.time_dense1(self.time_embedding(t)))
        if self.cond_embedding is not None:
            if cond is None:  # nothing known: the unconditional model
                cond = ops.full((ops.shape(x_t)[0], len(self.cond_categories)), float("nan"))
            time_emb = time_emb + self.cond_embedding(cond)
        elif cond is not None:
            raise ValueError(f"{name}: this network was built without conditioning (cond_categories=())")
        return x, time_emb

    def _level_attention(self, level, width, name):
        """Level `level`'s LinearAttention at `width` channels, or an identity above `attn_from_level`."""
        if level < self.attn_from_level:
            return keras.layers.Identity(name=name)
        return LinearAttention(width, heads=self.attn_heads, dim_head=self.attn_dim_head, name=name)

    def build(self, x_t_shape, t_shape=None, cond_shape=None, tissue_shape=None):
        # Nothing of its own to create: every sublayer builds itself from its input's shape during
        # the first call (`build_for`). Without this method Keras would first trace call() on
        # symbolic inputs to build the network, and then run it.
        pass

    def build_for(self, latent_shape):
        """Create the weights by one call on zeros of shape (1, *latent_shape); returns self."""
        self(ops.zeros((1, *latent_shape)), ops.zeros((1,), dtype="int32"))
        return self

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dim": self.dim,
            "dim_mults": list(self.dim_mults),
            "channels": self.channels,
            "resnet_groups": self.resnet_groups,
            "attn_heads": self.attn_heads,
            "attn_dim_head": self.attn_dim_head,
            "attn_from_level": self.attn_from_level,
            "cond_categories": list(self.cond_categories),
            "mask_channels": self.mask_channels,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class UNet(_UNetBase):
    """This project's denoising UNet (lucidrains-style): predicts the noise eps in x_t.

    ``UNet(dim=64, dim_mults=(1, 2, 4, 8), channels=1, ...)`` (the arguments: ``_UNetBase``).
    ``unet(x_t, t, cond=None, tissue=None)``: x_t (B, h, w, channels), t (B,) int32, cond (B, K)
    float32 (NaN = unknown), tissue (B, h, w, mask_channels) float32 -> eps, float32 of x_t's
    shape; h and w must be multiples of 2 ** (len(dim_mults) - 1). With dims = [dim] +
    [dim * m for m in dim_mults], level i works at dims[i] and hands dims[i + 1] on; every
    ResnetBlock takes the time embedding:

        init    conv7x7 of [x_t, tissue] -> dim (kept as r for the final block)
        down i  ResnetBlock, ResnetBlock, LinearAttention (a skip saved after each
                block), then stride-2 conv3x3 to dims[i+1]; the last level keeps
                its resolution (conv3x3 to dims[i+1], stride 1)
        middle  ResnetBlock, FullAttention, ResnetBlock at dims[-1]
        up i    (reverse) concat skip -> ResnetBlock, concat skip -> ResnetBlock,
                LinearAttention, then stride-2 Conv2DTranspose 4x4 to dims[i]; the
                last (full-resolution) level uses a conv3x3 instead
        final   concat r -> ResnetBlock(2 dim -> dim) -> conv1x1 -> channels (float32)

    37.1 M parameters at dim 64 × (1, 2, 4, 8).
    """

    layout = "project"

    def __init__(self, dim=64, **kwargs):
        super().__init__(dim, init_dim=dim, **kwargs)
        dims = [dim] + [dim * m for m in self.dim_mults]
        levels = list(enumerate(zip(dims[:-1], dims[1:], strict=True)))  # i, (its width, the width it hands on)
        attn, block = dict(heads=self.attn_heads, dim_head=self.attn_dim_head), dict(groups=self.resnet_groups)

        self.down_levels = []
        for i, (width, next_width) in levels:
            name, stride = (f"down{i}_proj", 1) if i == len(levels) - 1 else (f"down{i}_downsample", 2)
            self.down_levels.append(
                [
                    ResnetBlock(width, width, **block, name=f"down{i}_block1"),
                    ResnetBlock(width, width, **block, name=f"down{i}_block2"),
                    self._level_attention(i, width, f"down{i}_attn"),
                    keras.layers.Conv2D(next_width, 3, strides=stride, padding="same", name=name),
                ]
            )

        mid = dims[-1]
        self.mid_block1 = ResnetBlock(mid, mid, **block, name="mid_block1")
        self.mid_attn = FullAttention(mid, **attn, name="mid_attn")
        self.mid_block2 = ResnetBlock(mid, mid, **block, name="mid_block2")

        self.up_levels = []
        for i, (width, next_width) in reversed(levels):
            self.up_levels.append(
                [
                    ResnetBlock(next_width + width, next_width, **block, name=f"up{i}_block1"),
                    ResnetBlock(next_width + width, next_width, **block, name=f"up{i}_block2"),
                    self._level_attention(i, next_width, f"up{i}_attn"),
                    keras.layers.Conv2D(width, 3, padding="same", name=f"up{i}_proj")
                    if i == 0  # full resolution: no upsampling
                    else keras.layers.Conv2DTranspose(width, 4, strides=2, padding="same", name=f"up{i}_upsample"),
                ]
            )

        self.final_block = ResnetBlock(2 * dim, dim, **block, name="final_block")
        self.final_conv = keras.layers.Conv2D(self.channels, 1, dtype="float32", name="final_conv")

    def call(self, x_t, t, cond=None, tissue=None, training=None):
        x, time_emb = self._stem(x_t, t, cond, tissue)
        residual = x

        skips = []
        for block1, block2, attn, resample in self.down_levels:
            x = block1(x, time_emb)
            skips.append(x)
            x = attn(block2(x, time_emb))
            skips.append(x)
            x = resample(x)

        x = self.mid_block2(self.mid_attn(self.mid_block1(x, time_emb)), time_emb)

        for block1, block2, attn, resample in self.up_levels:
            x = block1(ops.concatenate([x, skips.pop()], axis=-1), time_emb)
            x = block2(ops.concatenate([x, skips.pop()], axis=-1), time_emb)
            x = resample(attn(x))

        x = self.final_block(ops.concatenate([x, residual], axis=-1), time_emb)
        return self.final_conv(x)


@keras.saving.register_keras_serializable(package=PACKAGE)
class OriginalUNet(_UNetBase):
    """The original design's denoising UNet (the early lucidrains denoising-diffusion-pytorch
    one), which the ``seed`` preset builds. Arguments, call and contract: ``UNet``'s.

    With init_dim = dim // 3 * 2 and dims = [init_dim] + [dim * m for m in dim_mults],
    level i goes from dims[i] to dims[i + 1]; every ResnetBlock takes the time embedding:

        init    conv7x7 -> init_dim
        down i  ResnetBlock(dims[i] -> dims[i+1]), ResnetBlock, LinearAttention; ONE
                skip saved (after the attention); then stride-2 conv4x4 (same width),
                except at the last level
        middle  ResnetBlock, FullAttention, ResnetBlock at dims[-1]
        up i    the levels but the first, deepest first: concat the level's skip ->
                ResnetBlock(2 dims[i+1] -> dims[i]), ResnetBlock, LinearAttention,
                stride-2 Conv2DTranspose 4x4
        final   ResnetBlock(dims[1] -> dim) -> conv1x1 -> channels (float32)

    So level 0's full-resolution skip is saved but never used, as in the original (whose
    final block, unlike this one's, took no time embedding).
    32.3 M parameters at dim 64 × (1, 2, 4, 8).
    """

    layout = "original"

    def __init__(self, dim=64, **kwargs):
        super().__init__(dim, init_dim=dim // 3 * 2, **kwargs)
        dims = [dim // 3 * 2] + [dim * m for m in self.dim_mults]
        levels = list(enumerate(zip(dims[:-1], dims[1:], strict=True)))  # i, (dims[i], dims[i + 1])
        attn, block = dict(heads=self.attn_heads, dim_head=self.attn_dim_head), dict(groups=self.resnet_groups)

        self.down_levels = []
        for i, (dim_in, dim_out) in levels:
            level = [
                ResnetBlock(dim_in, dim_out, **block, name=f"down{i}_block1"),
                ResnetBlock(dim_out, dim_out, **block, name=f"down{i}_block2"),
                self._level_attention(i, dim_out, f"down{i}_attn"),
            ]
            if i < len(levels) - 1:  # the last level keeps its resolution (the original's Identity)
                level.append(keras.layers.Conv2D(dim_out, 4, strides=2, padding="same", name=f"down{i}_downsample"))
            self.down_levels.append(level)

        mid = dims[-1]
        self.mid_block1 = ResnetBlock(mid, mid, **block, name="mid_block1")
        self.mid_attn = FullAttention(mid, **attn, name="mid_attn")
        self.mid_block2 = ResnetBlock(mid, mid, **block, name="mid_block2")

        self.up_levels = []
        for i, (dim_in, dim_out) in reversed(levels[1:]):
            self.up_levels.append(
                [
                    ResnetBlock(2 * dim_out, dim_in, **block, name=f"up{i}_block1"),
                    ResnetBlock(dim_in, dim_in, **block, name=f"up{i}_block2"),
                    self._level_attention(i, dim_in, f"up{i}_attn"),
                    keras.layers.Conv2DTranspose(dim_in, 4, strides=2, padding="same", name=f"up{i}_upsample"),
                ]
            )

        self.final_block = ResnetBlock(dims[1], dim, **block, name="final_block")
        self.final_conv = keras.layers.Conv2D(self.channels, 1, dtype="float32", name="final_conv")

    def call(self, x_t, t, cond=None, tissue=None, training=None):
        x, time_emb = self._stem(x_t, t, cond, tissue)

        skips = []
        for block1, block2, attn, *downsample in self.down_levels:
            x = attn(block2(block1(x, time_emb), time_emb))
            skips.append(x)  # one skip per level; level 0's (full resolution) is never used
            for layer in downsample:
                x = layer(x)

        x = self.mid_block2(self.mid_attn(self.mid_block1(x, time_emb)), time_emb)

        for block1, block2, attn, upsample in self.up_levels:
            x = block1(ops.concatenate([x, skips.pop()], axis=-1), time_emb)
            x = upsample(attn(block2(x, time_emb)))

        return self.final_conv(self.final_block(x, time_emb))
