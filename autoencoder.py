"""The image autoencoder of oasis-ldm: residual encoder and decoder (the latent UNets are modules.py's).

``build_mask_decoder(latent_channels, downsample_factor)``: latent -> tissue-mask logits at
the image's size, the other half of an image + mask pair.

``build_decoder(..., mask_classes=4)``: the SPADE decoder, the image decoder that is also
given the tissue mask, (latent, one-hot mask) -> image: every level's features modulated
by the mask (``MaskModulation``), so an image generated for a mask draws its tissue
boundaries where the mask has them (spade.py trains it from the run's decoder).

``AutoEncoder(image_channels=1, base_channels=64, channel_mults=(1, 2, 4), ..., layout="project")``
    ``encoder``: (B, H, W, image_channels) -> (B, H/f, W/f, latent_channels), float32;
    ``decoder``: back to (B, H, W, image_channels), float32 in [-1, 1]; f = 2 **
    (len(channel_mults) - 1). Functional models, built by the constructor. ``layout=
    "original"`` gives the original design's one-conv blocks.

Its layers: ``DivisibilityCheck``, ``ResidualBlock``, ``MaskModulation``. The conventions are modules.py's
(NHWC, images in [-1, 1], float32 outputs under a mixed policy; weights keyed by attribute
names and creation order, so renaming or reordering layers breaks existing runs' weights).
The classes are registered under the same Keras package as the UNets.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from config import AUTOENCODER_ACTIVATIONS, AUTOENCODER_NORMS, LAYOUTS
from keras_fixes import FitFixes
from modules import PACKAGE, check_divisible


@keras.saving.register_keras_serializable(package=PACKAGE)
class DivisibilityCheck(keras.layers.Layer):
    """Identity layer that raises a ValueError when H or W is not a multiple of ``factor``.

    Checked on the static shape at call time (a functional model's symbolic build
    has H = W = None and passes).
    """

    def __init__(self, factor, what="encoder", **kwargs):
        super().__init__(**kwargs)
        self.factor, self.what = factor, what
        self._build_at_init()

    def call(self, x):
        check_divisible(x, self.factor, self.what)
        return x

    def compute_output_shape(self, x_shape):
        return x_shape

    def get_config(self):
        return {**super().get_config(), "factor": self.factor, "what": self.what}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ResidualBlock(keras.layers.Layer):
    """Autoencoder residual block: (B, h, w, in) -> (B, h, w, out_channels).

    ``convs=2`` (the project layout's block)::

        h   = act(norm(conv3x3(x)))
        h   = norm(conv3x3(h))
        out = act(h + skip(x))     # skip = 1x1 conv when the channel count changes

    ``convs=1`` (the original design's block: one conv plus skip, then the norm)::

        out = act(norm(conv3x3(x) + skip(x)))

    ``norm`` is "batch" (BatchNormalization; ``synchronized``: its batch statistics are those
    of all replicas of a tf.distribute strategy together) or "group" (GroupNormalization with
    gcd(8, out_channels) groups, so the groups always divide the channels); ``activation``
    one of ``config.AUTOENCODER_ACTIVATIONS``. Both are checked here, for the whole
    autoencoder. The input channel count is read from the input at build time.
    """

    def __init__(self, out_channels, norm="batch", activation="relu", convs=2, synchronized=False, **kwargs):
        super().__init__(**kwargs)
        if norm not in AUTOENCODER_NORMS:
            raise ValueError(f"unknown norm {norm!r}; expected one of {AUTOENCODER_NORMS}")
        if activation not in AUTOENCODER_ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {AUTOENCODER_ACTIVATIONS}")
        if convs not in (1, 2):
            raise ValueError(f"ResidualBlock: convs must be 1 or 2, got {convs}")
        self.out_channels, self.norm, self.activation, self.convs = out_channels, norm, activation, convs
        self.synchronized = bool(synchronized)
        self.conv1 = keras.layers.Conv2D(out_channels, 3, padding="same", name="conv1")
        self.norm1 = self._make_norm("norm1")
        if convs == 2:
            self.conv2 = keras.layers.Conv2D(out_channels, 3, padding="same", name="conv2")
            self.norm2 = self._make_norm("norm2")
        self.act = keras.layers.Activation(activation, name="act")
        self.skip = None  # created in build() when the input channel count differs

    def _make_norm(self, name):
        if self.norm == "batch":
            return keras.layers.BatchNormalization(synchronized=self.synchronized, name=name)
        return keras.layers.GroupNormalization(math.gcd(8, self.out_channels), name=name)

    def build(self, input_shape):
        in_channels = input_shape[-1]
        if in_channels != self.out_channels:
            self.skip = keras.layers.Conv2D(self.out_channels, 1, name="skip")
            self.skip.build(input_shape)
        mid_shape = (*input_shape[:-1], self.out_channels)
        self.conv1.build(input_shape)
        for layer in (self.norm1, self.conv2, self.norm2) if self.convs == 2 else (self.norm1,):
            layer.build(mid_shape)

    def call(self, x, training=None):
        if self.convs == 1:
            return self.act(
                self.norm1(self.conv1(x) + (self.skip(x) if self.skip is not None else x), training=training)
            )
        h = self.act(self.norm1(self.conv1(x), training=training))
        h = self.norm2(self.conv2(h), training=training)
        return self.act(h + (self.skip(x) if self.skip is not None else x))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.out_channels)

    def get_config(self):
        return {
            **super().get_config(),
            "out_channels": self.out_channels,
            "norm": self.norm,
            "activation": self.activation,
            "convs": self.convs,
            "synchronized": self.synchronized,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class MaskModulation(keras.layers.Layer):
    """Spatially-adaptive modulation by a tissue mask (SPADE, Park et al. 2019, eq. 1, without
    its normalisation: the decoder's blocks normalise already).

    x (B, h, w, C), tissue (B, h·p, w·p, classes) float, the mask (one-hot, or class shares)
    -> (B, h, w, C):

        m     = AveragePool_p(tissue)            # the mask's class shares at x's resolution
        γ, β  = split(conv3x3(m), 2)             # each (B, h, w, C)
        out   = x · (1 + γ) + β

    The conv starts at zero, so a new modulation leaves x as it is: a SPADE decoder made from
    a trained decoder (its weights copied) decodes exactly as that decoder before training.
    ``pool`` p: how many mask pixels a side of one of x's cells holds. (The argument is not
    called ``mask``: Keras reserves that name for its own masking.)
    """

    def __init__(self, channels, pool, **kwargs):
        super().__init__(**kwargs)
        self.channels, self.pool = int(channels), int(pool)
        self.pooling = keras.layers.AveragePooling2D(self.pool, name="pool") if self.pool > 1 else None
        self.gamma_beta = keras.layers.Conv2D(
            2 * self.channels, 3, padding="same", kernel_initializer="zeros", name="gamma_beta"
        )

    def build(self, x_shape, tissue_shape):
        # From the shapes, not by a trace of call() (modules.ResnetBlock.build says why).
        self.gamma_beta.build((*x_shape[:-1], tissue_shape[-1]))

    def call(self, x, tissue):
        m = ops.cast(tissue, self.compute_dtype)
        if self.pooling is not None:
            m = self.pooling(m)
        gamma, beta = ops.split(self.gamma_beta(m), 2, axis=-1)
        return x * (1.0 + gamma) + beta

    def compute_output_shape(self, x_shape, tissue_shape):
        return x_shape

    def get_config(self):
        return {**super().get_config(), "channels": self.channels, "pool": self.pool}


def _is_original(layout):
    """True for the original design's layout, False for the project's; a ValueError otherwise."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    return layout == "original"


def build_encoder(
    image_channels,
    base_channels,
    channel_mults,
    blocks_per_level,
    latent_channels,
    norm,
    activation,
    layout,
    synchronized=False,
):
    """Functional encoder: (B, H, W, image_channels) -> (B, H/f, W/f, latent_channels).

    The arguments are ``AutoEncoder``'s; f = 2 ** (len(channel_mults) - 1). Layout
    "project": conv3x3 stem to base_channels; per level ``blocks_per_level`` residual
    blocks (two convs) at base_channels * mult (the first one widens, with a 1x1 skip)
    followed, except at the last level, by a stride-2 conv3x3; a final conv3x3 to
    ``latent_channels`` with no activation (the latent is scaled by 1/std later). The
    latent is float32 under any dtype policy.

    Layout "original" (the original design): no stem, every level at the widest width
    base_channels * channel_mults[-1] (256 for 64 × (1, 2, 4)), one-conv residual blocks
    (``ResidualBlock(convs=1)``: act(norm(conv3x3(x) + skip(x))); the first takes the
    image, with a 1x1 skip), the same stride-2 conv3x3 downsamplings and final conv3x3.
    """
    original = _is_original(layout)
    factor = 2 ** (len(channel_mults) - 1)
    x_in = keras.Input((None, None, image_channels), name="image")
    x = DivisibilityCheck(factor, "encoder", name="check_size")(x_in)
    if not original:
        x = keras.layers.Conv2D(base_channels, 3, padding="same", name="stem")(x)
    for level, mult in enumerate(channel_mults):
        width = base_channels * (channel_mults[-1] if original else mult)
        for b in range(blocks_per_level):
            x = ResidualBlock(
                width,
                norm,
                activation,
                convs=1 if original else 2,
                synchronized=synchronized,
                name=f"level{level}_block{b}",
            )(x)
        if level < len(channel_mults) - 1:
            x = keras.layers.Conv2D(width, 3, strides=2, padding="same", name=f"level{level}_downsample")(x)
    latent = keras.layers.Conv2D(latent_channels, 3, padding="same", dtype="float32", name="to_latent")(x)
    return keras.Model(x_in, latent, name="encoder")


def build_decoder(
    image_channels,
    base_channels,
    channel_mults,
    blocks_per_level,
    latent_channels,
    norm,
    activation,
    layout,
    synchronized=False,
    mask_classes=0,
):
    """Functional decoder mirroring ``build_encoder``: latent -> (B, H, W, image_channels).

    Layout "project": conv3x3 from the latent to the widest width; per level, widest
    first, ``blocks_per_level`` residual blocks (the first narrows to the level's width)
    followed, except at the last level, by a stride-2 Conv2DTranspose 4x4 (a kernel
    divisible by the stride avoids checkerboard artefacts); conv3x3 to
    ``image_channels`` and tanh. Output float32 in [-1, 1] under any dtype policy.
    With the defaults the widths go 256 -> 128 -> 64 -> 1.

    Layout "original": no conv from the latent (the first one-conv residual block takes
    it, with a 1x1 skip, as the encoder's first block takes the image), one-conv blocks
    (``ResidualBlock(convs=1)``) and stride-2 Conv2DTranspose 3x3, the original's; the
    same narrowing 256 -> 128 -> 64 (the first block of a level narrows, 1x1 skip), then
    conv3x3 to ``image_channels`` and tanh.

    ``mask_classes`` M > 0 makes the SPADE decoder: inputs [latent, mask (B, H, W, M)], and
    after each level's blocks a ``MaskModulation`` by the mask (``level{i}_modulation``).
    Every other layer has the plain decoder's name and shape, so its weights copy over
    (`copy_weights`).
    """
    original = _is_original(layout)
    z_in = keras.Input((None, None, latent_channels), name="latent")
    mask_in = keras.Input((None, None, mask_classes), name="tissue") if mask_classes else None
    x = z_in
    if not original:
        x = keras.layers.Conv2D(base_channels * channel_mults[-1], 3, padding="same", name="from_latent")(x)
    levels = list(reversed(list(enumerate(channel_mults))))
    for step, (level, mult) in enumerate(levels):
        width = base_channels * mult
        for b in range(blocks_per_level):
            x = ResidualBlock(
                width,
                norm,
                activation,
                convs=1 if original else 2,
                synchronized=synchronized,
                name=f"level{level}_block{b}",
            )(x)
        if mask_in is not None:  # level `level` works at 1 / 2**level of the image's side
            x = MaskModulation(width, 2**level, name=f"level{level}_modulation")(x, mask_in)
        if step < len(levels) - 1:
            x = keras.layers.Conv2DTranspose(
                width, 3 if original else 4, strides=2, padding="same", name=f"level{level}_upsample"
            )(x)
    x = keras.layers.Conv2D(image_channels, 3, padding="same", dtype="float32", name="to_image")(x)
    image = keras.layers.Activation("tanh", dtype="float32", name="tanh")(x)
    if mask_in is not None:
        return keras.Model([z_in, mask_in], image, name="spade_decoder")
    return keras.Model(z_in, image, name="decoder")


def copy_weights(source: keras.Model, target: keras.Model) -> None:
    """Copy every layer's weights of the functional model `source` into the layer of the same
    name in `target` (a SPADE decoder from its decoder); ValueError when `target` lacks one."""
    for layer in source.layers:
        if layer.weights:
            target.get_layer(layer.name).set_weights(layer.get_weights())


def build_mask_decoder(latent_channels, downsample_factor, classes=4, width=32, groups=8):
    """Functional mask decoder: latent (B, h, w, latent_channels) -> (B, h·f, w·f, classes)
    float32 logits of the tissue mask, f = ``downsample_factor`` (a power of 2).

    Beside the image decoder, it reads the tissue mask off the same (unscaled) latent, so a
    generated latent decodes to an image and its mask (DatasetGAN-style label synthesis:
    a small head trained on the latents of real images and their masks). conv3x3 to
    ``width``; per halving, a stride-2 Conv2DTranspose 4x4 then conv3x3, each followed by
    GroupNorm(``groups``) and SiLU; conv1x1 to ``classes`` (float32 under any dtype policy).
    """
    if downsample_factor < 1 or downsample_factor & (downsample_factor - 1):
        raise ValueError(f"build_mask_decoder: downsample_factor must be a power of 2, got {downsample_factor}")
    z_in = keras.Input((None, None, latent_channels), name="latent")
    x = keras.layers.Conv2D(width, 3, padding="same", name="from_latent")(z_in)
    for i in range(int(math.log2(downsample_factor))):
        for kind, layer in (
            ("upsample", keras.layers.Conv2DTranspose(width, 4, strides=2, padding="same", name=f"up{i}_upsample")),
            ("conv", keras.layers.Conv2D(width, 3, padding="same", name=f"up{i}_conv")),
        ):
            x = layer(x)
            x = keras.layers.GroupNormalization(groups, name=f"up{i}_{kind}_norm")(x)
            x = keras.layers.Activation("silu", name=f"up{i}_{kind}_silu")(x)
    logits = keras.layers.Conv2D(classes, 1, dtype="float32", name="to_logits")(x)
    return keras.Model(z_in, logits, name="mask_decoder")


@keras.saving.register_keras_serializable(package=PACKAGE)
class AutoEncoder(FitFixes, keras.Model):
    """Residual convolutional autoencoder: image -> latent -> reconstruction.

    ``encoder`` / ``decoder`` are the functional models of ``build_encoder`` /
    ``build_decoder`` (see there for shapes and the two layouts, "project" and
    "original"); ``autoencoder(x)`` = decoder(encoder(x)), (B, H, W, image_channels) ->
    same shape, float32 in [-1, 1]. H and W must be multiples of ``downsample_factor`` =
    2 ** (len(channel_mults) - 1) (4 by default). 3.5 M parameters at base 64 × (1, 2, 4)
    in the original layout with BatchNorm, 4.5 M in the project's.

    Built by the constructor, so ``load_weights`` works at once, and ``compile(optimizer,
    loss="mse"); fit(pairs)`` works on (x, x) pairs. ``synchronized``: BatchNorm layers
    average their batch statistics over the replicas of a tf.distribute strategy (build the
    model in its scope); it changes no weight.
    """

    def __init__(
        self,
        image_channels=1,
        base_channels=64,
        channel_mults=(1, 2, 4),
        blocks_per_level=1,
        latent_channels=1,
        norm="batch",
        activation="relu",
        layout="project",
        synchronized=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not channel_mults:
            raise ValueError("AutoEncoder: channel_mults must not be empty")
        self.arch = dict(
            image_channels=image_channels,
            base_channels=base_channels,
            channel_mults=tuple(channel_mults),
            blocks_per_level=blocks_per_level,
            latent_channels=latent_channels,
            norm=norm,
            activation=activation,
            layout=layout,
        )
        self.layout = layout
        self.downsample_factor = 2 ** (len(channel_mults) - 1)
        # synchronized is how the model trains, not what it is: not part of `arch` (get_config)
        self.encoder = build_encoder(**self.arch, synchronized=synchronized)  # checks layout, norm and activation
        self.decoder = build_decoder(**self.arch, synchronized=synchronized)
        self.build((None, None, None, image_channels))

    def build(self, input_shape):
        """Nothing to create: the functional encoder and decoder are built already."""

    def call(self, x, training=None):
        return self.decoder(self.encoder(x, training=training), training=training)

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            **self.arch,
            "channel_mults": list(self.arch["channel_mults"]),
        }
