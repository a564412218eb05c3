"""Tests of modules.py and autoencoder.py: shapes, size errors, attention maths, dtypes, save/load, configs.

Networks are tiny (width 8, 4 groups) so the file runs in well under a minute on
2 CPU cores; only the parameter-count tests build the full-size seed models.
"""

import json
import warnings
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import modules
from autoencoder import AutoEncoder, MaskModulation, ResidualBlock, build_decoder, copy_weights
from config import load_config
from modules import (
    FullAttention,
    LinearAttention,
    OriginalUNet,
    ResnetBlock,
    SinusoidalTimeEmbedding,
    UNet,
)

TINY_UNET = dict(dim=8, dim_mults=(1, 2, 4), resnet_groups=4, attn_heads=2, attn_dim_head=8)
SMALL_UNET = {**TINY_UNET, "dim_mults": (1, 2)}  # where depth does not matter: faster
TINY_AE = dict(base_channels=8, channel_mults=(1, 2, 4))


def _images(shape, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype("float32")


def _timesteps(batch, seed=0):
    return np.random.default_rng(seed).integers(0, 200, batch).astype("int32")


# --------------------------------------------------------------------------- #
# UNet
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("size,channels", [((16, 16), 1), ((32, 32), 3), ((24, 40), 4)])
def test_unet_output_shape_dtype_and_time_dependence(size, channels):
    unet = UNet(channels=channels, **TINY_UNET)
    x = _images((2, *size, channels))
    eps_a = unet(x, np.array([0, 0], "int32"))
    eps_b = unet(x, np.array([150, 150], "int32"))
    assert tuple(eps_a.shape) == (2, *size, channels)
    assert eps_a.dtype == "float32"
    assert np.isfinite(eps_a.numpy()).all()
    # The timestep must reach the output through the scale-shift conditioning.
    assert np.abs(eps_a.numpy() - eps_b.numpy()).max() > 1e-4


@pytest.mark.parametrize(
    "shape,message",
    [
        ((1, 18, 16, 1), "height 18 is not divisible by 4"),
        ((1, 16, 20, 1), "width 20 is not divisible by 8"),
    ],
)
def test_unet_rejects_sizes_that_do_not_divide(shape, message):
    mults = (1, 2, 4) if "by 4" in message else (1, 2, 4, 8)
    unet = UNet(**{**TINY_UNET, "dim_mults": mults})
    with pytest.raises(ValueError, match=message):
        unet(np.zeros(shape, "float32"), np.zeros((1,), "int32"))


def test_unet_rejects_wrong_channel_count():
    unet = UNet(channels=1, **TINY_UNET)
    with pytest.raises(ValueError, match="expected 1 input channels, got 3"):
        unet(np.zeros((1, 16, 16, 3), "float32"), np.zeros((1,), "int32"))


def test_unet_dynamic_batch_graph_and_jit_match_eager():
    unet = UNet(**SMALL_UNET)
    x, t = _images((3, 16, 16, 1)), _timesteps(3)
    eager = unet(x, t).numpy()
    spec = [tf.TensorSpec((None, None, None, 1)), tf.TensorSpec((None,), tf.int32)]
    graph = tf.function(lambda a, b: unet(a, b), input_signature=spec)
    jit = tf.function(lambda a, b: unet(a, b), jit_compile=True)
    np.testing.assert_allclose(graph(x, t).numpy(), eager, atol=1e-4)
    np.testing.assert_allclose(graph(x[:1], t[:1]).numpy(), eager[:1], atol=1e-4)
    np.testing.assert_allclose(jit(x, t).numpy(), eager, atol=1e-4)


def test_unet_symbolic_call_gives_static_shape():
    unet = UNet(**SMALL_UNET)
    out = unet(keras.Input((16, 24, 1)), keras.Input((), dtype="int32"))
    assert tuple(out.shape) == (None, 16, 24, 1)


def test_unet_save_load_weights_gives_identical_outputs(tmp_path):
    x, t = _images((2, 16, 16, 1)), _timesteps(2)
    unet = UNet(**SMALL_UNET).build_for((16, 16, 1))
    path = str(tmp_path / "unet.weights.h5")
    unet.save_weights(path)
    keras.utils.set_random_seed(123)  # the fresh model starts from different weights
    fresh = UNet(**SMALL_UNET).build_for((16, 16, 1))
    assert np.abs(fresh(x, t).numpy() - unet(x, t).numpy()).max() > 1e-4
    fresh.load_weights(path)
    np.testing.assert_array_equal(fresh(x, t).numpy(), unet(x, t).numpy())


def test_unet_config_round_trip_rebuilds_same_architecture():
    unet = UNet(channels=3, **SMALL_UNET).build_for((16, 16, 3))
    config = json.loads(json.dumps(unet.get_config()))  # must survive JSON (config.json)
    clone = UNet.from_config(config).build_for((16, 16, 3))
    assert [tuple(w.shape) for w in clone.weights] == [tuple(w.shape) for w in unet.weights]
    clone.set_weights(unet.get_weights())
    x, t = _images((1, 16, 16, 3)), _timesteps(1)
    np.testing.assert_array_equal(clone(x, t).numpy(), unet(x, t).numpy())


@pytest.mark.parametrize("network", [UNet, modules.OriginalUNet])
def test_attn_from_level_leaves_the_levels_above_it_without_linear_attention(network):
    """attn_from_level=k: levels 0..k-1 (down and up) hold an identity where LinearAttention
    was; the levels from k on, and the middle's FullAttention, are unchanged; the default 0
    builds every level's attention (the weights of runs made before the option)."""
    kw = dict(SMALL_UNET, channels=1)
    x, t = _images((2, 16, 16, 1)), _timesteps(2)
    full = network(**kw).build_for((16, 16, 1))
    some = network(**kw, attn_from_level=1).build_for((16, 16, 1))
    assert some(x, t).shape == full(x, t).shape == (2, 16, 16, 1)

    def attentions(net):
        return {layer.name: type(layer).__name__ for layer in net._flatten_layers() if layer.name.endswith("_attn")}

    assert set(attentions(full).values()) == {"LinearAttention", "FullAttention"}
    assert attentions(some)["mid_attn"] == "FullAttention"
    for name, kind in attentions(some).items():
        if name != "mid_attn":  # "down0_attn" -> level 0
            assert kind == ("Identity" if name[name.index("_") - 1] == "0" else "LinearAttention"), name
    dropped = [w for layer in full._flatten_layers() if layer.name in ("down0_attn", "up0_attn") for w in layer.weights]
    assert some.count_params() == full.count_params() - sum(int(np.prod(w.shape)) for w in dropped)
    assert dropped
    none = network(**kw, attn_from_level=len(kw["dim_mults"])).build_for((16, 16, 1))
    assert "LinearAttention" not in attentions(none).values()
    assert network.from_config(json.loads(json.dumps(some.get_config()))).attn_from_level == 1


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_unet_mixed_precision_gives_float32_finite_output(policy):
    keras.config.set_dtype_policy(policy)
    unet = UNet(**SMALL_UNET)
    eps = unet(_images((2, 16, 16, 1)), _timesteps(2))
    assert eps.dtype == "float32"
    assert np.isfinite(eps.numpy()).all()
    assert {w.dtype for w in unet.weights} == {"float32"}


def test_seed_unet_parameter_count():
    unet = UNet(dim=64, dim_mults=(1, 2, 4, 8), channels=1).build_for((32, 32, 1))
    n = unet.count_params()
    print(f"seed UNet (dim 64, mults 1,2,4,8, 32x32x1): {n:,} parameters")
    assert 25e6 < n < 40e6


def _concatenations(monkeypatch, unet, x, t):
    """Shapes of the feature maps the UNet concatenates (skips joining the up path) in one call;
    the time embedding's 2-D concatenation is left out."""
    unet(x, t)  # build first: Keras' first call also runs a symbolic pass
    shapes, concatenate = [], modules.ops.concatenate

    def counting(tensors, axis=0):
        out = concatenate(tensors, axis=axis)
        if len(out.shape) == 4:
            shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(modules.ops, "concatenate", counting)
    out = unet(x, t)
    monkeypatch.undo()
    return out, shapes


@pytest.mark.parametrize(
    "mults,concats",
    [
        # dims [4, 8, 16]: down 4->8 (8x8), 8->16 (4x4, no downsampling); one up level at 4x4: 16 + 16 skip.
        ((1, 2), [(2, 4, 4, 32)]),
        # dims [4, 8, 16, 32]: the up levels join the 2x2 and 4x4 skips, never the 8x8 one.
        ((1, 2, 4), [(2, 2, 2, 64), (2, 4, 4, 32)]),
    ],
)
def test_original_unet_layout_structure(monkeypatch, mults, concats):
    unet = OriginalUNet(**{**SMALL_UNET, "dim_mults": mults})
    x = _images((2, 8, 8, 1))
    eps, shapes = _concatenations(monkeypatch, unet, x, _timesteps(2))
    assert tuple(eps.shape) == (2, 8, 8, 1) and eps.dtype == "float32"
    assert shapes == concats  # ONE skip per up level, deepest first
    assert unet.init_conv.filters == 8 // 3 * 2 == 4
    assert len(unet.down_levels) == len(mults) and len(unet.up_levels) == len(mults) - 1
    dims = [4] + [8 * m for m in mults]
    for i, level in enumerate(unet.down_levels):
        assert (level[0].in_channels, level[0].out_channels) == (dims[i], dims[i + 1])  # the width changes here
        downsampling = [layer for layer in level if isinstance(layer, keras.layers.Conv2D)]
        if i < len(mults) - 1:
            assert [(d.kernel_size, d.strides, d.filters) for d in downsampling] == [((4, 4), (2, 2), dims[i + 1])]
        else:
            assert downsampling == []  # the last level keeps its resolution
    for level, (dim_in, dim_out) in zip(
        unet.up_levels, reversed(list(zip(dims[1:-1], dims[2:], strict=True))), strict=True
    ):
        block1, block2, _, upsample = level
        assert (block1.in_channels, block1.out_channels, block2.in_channels) == (2 * dim_out, dim_in, dim_in)
        assert isinstance(upsample, keras.layers.Conv2DTranspose) and upsample.strides == (2, 2)
    # The project layout at the same sizes joins two skips per level plus the init residual.
    _, project_shapes = _concatenations(monkeypatch, UNet(**{**SMALL_UNET, "dim_mults": mults}), x, _timesteps(2))
    assert len(project_shapes) == 2 * len(mults) + 1


def test_original_unet_config_round_trip():
    unet = OriginalUNet(**SMALL_UNET).build_for((8, 8, 1))
    config = json.loads(json.dumps(unet.get_config()))
    assert "layout" not in config  # the class is the layout
    clone = OriginalUNet.from_config(config).build_for((8, 8, 1))
    assert clone.layout == "original" and clone.count_params() == unet.count_params()
    clone.set_weights(unet.get_weights())
    x, t = _images((1, 8, 8, 1)), _timesteps(1)
    np.testing.assert_array_equal(clone(x, t).numpy(), unet(x, t).numpy())
    # The same arguments build the project's wiring in UNet.
    project = UNet.from_config(config).build_for((8, 8, 1))
    assert project.layout == "project" and project.count_params() != unet.count_params()


def test_original_seed_unet_parameter_count():
    """The original's UNet at the seed preset's sizes: ~32 M (an independent re-implementation: 32.3 M)."""
    unet = OriginalUNet(dim=64, dim_mults=(1, 2, 4, 8), channels=1).build_for((16, 16, 1))
    n = unet.count_params()
    print(f"seed OriginalUNet (dim 64, mults 1,2,4,8): {n:,} parameters ({n / 32.3e6 - 1:+.2%} of 32.3 M)")
    assert abs(n / 32.3e6 - 1) < 0.02
    assert n == 32_282_613  # the figure in BENCHMARKS.md


SEED_RUN = Path(__file__).parent / "fixtures" / "seed_run"


def _fixture_unet():
    """OriginalUNet with the tiny seed run's arguments (tests/fixtures/seed_run/config.json), built."""
    kwargs = load_config(SEED_RUN / "config.json").unet_kwargs()
    return OriginalUNet(**kwargs, name="unet_ema").build_for((8, 8, kwargs["channels"]))


def test_original_unet_loads_weights_saved_before_the_split():
    """unet_ema.weights.h5 was written by UNet(layout="original") before OriginalUNet existed.

    Every stored array must land in a variable of the same shape (Keras keys the file by
    attribute names, class names and creation order), every variable must get one, and
    each layer's loaded weights must matter; the output on fixed inputs is the old class's.
    """
    x = np.random.default_rng(0).standard_normal((3, 8, 8, 1)).astype("float32")
    t = np.array([0, 7, 19], "int32")
    fresh = _fixture_unet()
    unet = _fixture_unet()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skipped or mismatched variable warns (or raises)
        unet.load_weights(SEED_RUN / "unet_ema.weights.h5")

    with h5py.File(SEED_RUN / "unet_ema.weights.h5") as f:
        stored = []
        f.visititems(lambda name, item: stored.append(item[()]) if isinstance(item, h5py.Dataset) else None)
    key = lambda a: (a.shape, float(np.sum(a, dtype="float64")))  # noqa: E731
    assert sorted(map(key, stored)) == sorted(key(w.numpy()) for w in unet.weights)

    eps = unet(x, t).numpy()
    assert np.isfinite(eps).all()
    # The old class's output on these inputs (max abs difference after the split: 0.0).
    np.testing.assert_allclose(eps[0, :2, :2, 0], [[1.6944690, 0.4937246], [-1.9665265, 0.0099639]], atol=1e-4)
    np.testing.assert_allclose(np.abs(eps).mean(), 1.9951299, rtol=1e-5)
    children = (model._flatten_layers(include_self=False, recursive=False) for model in (unet, fresh))
    for loaded, initial in ((a, b) for a, b in zip(*children, strict=True) if a.weights):
        kept = loaded.get_weights()
        loaded.set_weights(initial.get_weights())
        assert np.abs(unet(x, t).numpy() - eps).max() > 1e-4, f"{loaded.name}'s loaded weights do not matter"
        loaded.set_weights(kept)


@pytest.mark.parametrize("layer", ["resnet", "linear_attention", "full_attention"])
def test_explicit_builds_create_the_weights_a_traced_build_would(layer):
    """ResnetBlock and the attentions build their sublayers from the input shapes: the same
    weights, shapes and seeded initial values as Keras' default build, which traces call() on
    symbolic inputs first (the class with its build() removed)."""
    x, t = _images((2, 4, 4, 8)), np.ones((2, 16), "float32")
    cls, args, kwargs, inputs = {
        "resnet": (ResnetBlock, (8, 12), {"groups": 4}, (x, t)),
        "linear_attention": (LinearAttention, (8,), {"heads": 2, "dim_head": 4}, (x,)),
        "full_attention": (FullAttention, (8,), {"heads": 2, "dim_head": 4}, (x,)),
    }[layer]
    traced_cls = type("Traced", (cls,), {"build": keras.layers.Layer.build})  # Keras' default build
    weights = []
    for build_kind in (cls, traced_cls):
        keras.utils.set_random_seed(0)
        block = build_kind(*args, **kwargs)
        block(*inputs)
        weights.append([w.numpy() for w in block.weights])
    assert len(weights[0]) == len(weights[1]) > 4
    for ours, traced in zip(*weights, strict=True):
        np.testing.assert_array_equal(ours, traced)


def test_unets_build_in_one_eager_call_without_tracing(monkeypatch):
    """build_for runs the network once on zeros; no layer is built by Keras' symbolic trace of
    its call(), which would run the whole network once more (and each block once more again)."""
    from keras.src import backend

    traced = []
    original = backend.compute_output_spec

    def recording(fn, *args, **kwargs):
        traced.append(fn)
        return original(fn, *args, **kwargs)

    monkeypatch.setattr(backend, "compute_output_spec", recording)
    for cls in (UNet, OriginalUNet):
        unet = cls(**SMALL_UNET, cond_categories=(0,), mask_channels=4).build_for((8, 8, 1))
        assert unet.built and len(unet.weights) > 20
    assert traced == []


def test_resnet_block_groups_need_only_divide_the_normalised_width():
    """Both GroupNorms act on out_channels: the original layout's first block takes 42 channels to 64."""
    block = ResnetBlock(42, 64, groups=8)
    out = block(_images((1, 4, 4, 42)), _images((1, 16)))
    assert tuple(out.shape) == (1, 4, 4, 64)
    with pytest.raises(ValueError, match="output channel count 42 is not divisible by groups=8"):
        ResnetBlock(64, 42, groups=8)


def test_time_embedding_values():
    emb = SinusoidalTimeEmbedding(8)(np.array([0, 3], "int32")).numpy()
    assert emb.shape == (2, 8)
    np.testing.assert_allclose(emb[0], [0, 0, 0, 0, 1, 1, 1, 1], atol=1e-7)
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 3)
    np.testing.assert_allclose(emb[1], np.concatenate([np.sin(3 * freqs), np.cos(3 * freqs)]), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- #
# Attention against NumPy references
# --------------------------------------------------------------------------- #
def _heads(a, heads):
    """(B, h, w, heads*d) -> (B, heads, h*w, d) in float64."""
    b, hh, ww, c = a.shape
    return a.reshape(b, hh * ww, heads, c // heads).transpose(0, 2, 1, 3).astype("float64")


def _merge(a, height, width):
    b, heads, n, d = a.shape
    return a.transpose(0, 2, 1, 3).reshape(b, height, width, heads * d)


def _softmax(a, axis):
    a = a - a.max(axis=axis, keepdims=True)
    e = np.exp(a)
    return e / e.sum(axis=axis, keepdims=True)


def _attention_inputs(layer, x, logit_boost):
    layer(x)  # build
    kernel = layer.to_qkv.kernel
    kernel.assign(kernel.numpy() * logit_boost)  # large q, k: logits far beyond exp's range
    qkv = layer.to_qkv(layer.pre_norm(x)).numpy()
    return np.split(qkv, 3, axis=-1)


def test_full_attention_matches_numpy_softmax_even_for_huge_logits():
    """Logits beyond exp's float32 range stay finite (the max-subtraction); the softmax is then
    nearly one-hot, so the 1/sqrt(d) scale is checked at moderate logits below."""
    heads, dim_head = 2, 4
    layer = FullAttention(8, heads=heads, dim_head=dim_head)
    x = _images((2, 4, 4, 8))
    q, k, v = (_heads(a, heads) for a in _attention_inputs(layer, x, logit_boost=40.0))
    logits = np.einsum("bhid,bhjd->bhij", q, k) / np.sqrt(dim_head)
    assert np.abs(logits).max() > 200  # exp would overflow float32 without max-subtraction
    attended = _merge(np.einsum("bhij,bhjd->bhid", _softmax(logits, -1), v), 4, 4)
    expected = x + layer.to_out(attended.astype("float32")).numpy()
    out = layer(x).numpy()
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-3)


def _group_norm_1(a, gamma, beta, eps=1e-5):
    """GroupNormalization(groups=1): each example normalised over (h, w, C), then per-channel gamma, beta."""
    mean, var = a.mean(axis=(1, 2, 3), keepdims=True), a.var(axis=(1, 2, 3), keepdims=True)
    return (a - mean) / np.sqrt(var + eps) * gamma + beta


def _randomise(layer, x, qkv_std, seed=0):
    """Build ``layer`` on x and set every weight to a random value; returns them in float64 by name.

    Random norm scales/offsets and a non-zero output bias make every weight matter (Keras
    initialises gamma = 1, beta = bias = 0); qkv_std sets the size of q, k, v.
    """
    layer(x)
    rng = np.random.default_rng(seed)
    values = {}
    for sub, attr in (
        ("pre_norm", "gamma"),
        ("pre_norm", "beta"),
        ("to_qkv", "kernel"),
        ("to_out", "kernel"),
        ("to_out", "bias"),
        ("out_norm", "gamma"),
        ("out_norm", "beta"),
    ):
        if not hasattr(layer, sub):  # out_norm: LinearAttention only
            continue
        variable = getattr(getattr(layer, sub), attr)
        shape = tuple(variable.shape)
        if attr == "gamma":
            value = 1.0 + 0.2 * rng.standard_normal(shape)
        elif sub == "to_qkv":
            value = qkv_std * rng.standard_normal(shape)
        else:
            value = 0.3 * rng.standard_normal(shape)
        variable.assign(value.astype("float32"))
        values[f"{sub}.{attr}"] = value.astype("float32").astype("float64")
    return values


def _numpy_qkv(w, x, heads):
    """q, k, v (B, heads, n, d) in float64: pre-norm, then the 1x1 conv as a per-pixel matmul."""
    h = _group_norm_1(x.astype("float64"), w["pre_norm.gamma"], w["pre_norm.beta"])
    qkv = h @ w["to_qkv.kernel"][0, 0]
    return (_heads(a, heads) for a in np.split(qkv, 3, axis=-1))


def _numpy_full_attention(w, x, heads, dim_head, scale=True):
    """x + to_out(softmax(q k^T / sqrt(d)) v) in float64 (scale=False drops the 1/sqrt(d))."""
    q, k, v = _numpy_qkv(w, x, heads)
    logits = np.einsum("bhid,bhjd->bhij", q, k) / (np.sqrt(dim_head) if scale else 1.0)
    attended = _merge(np.einsum("bhij,bhjd->bhid", _softmax(logits, -1), v), *x.shape[1:3])
    return x + attended @ w["to_out.kernel"][0, 0] + w["to_out.bias"], logits


def _numpy_linear_attention(w, x, heads, dim_head, scale=True):
    """x + out_norm(to_out(softmax_d(q) / sqrt(d) (softmax_n(k)^T v))) in float64."""
    q, k, v = _numpy_qkv(w, x, heads)
    q = _softmax(q, -1) / (np.sqrt(dim_head) if scale else 1.0)  # over features
    k = _softmax(k, -2)  # over positions
    out_heads = np.einsum("bhnd,bhde->bhne", q, np.einsum("bhnd,bhne->bhde", k, v))
    projected = _merge(out_heads, *x.shape[1:3]) @ w["to_out.kernel"][0, 0] + w["to_out.bias"]
    return x + _group_norm_1(projected, w["out_norm.gamma"], w["out_norm.beta"])


def test_full_attention_matches_numpy_at_moderate_logits():
    """softmax(q k^T / sqrt(d)) v against a float64 NumPy forward pass from the layer's own weights.

    The logits are O(1) (std about 1.5), where the softmax is far from one-hot, so dropping
    the 1/sqrt(d) scale (a factor 2 here) moves the output by up to 0.8 (0.25 on average),
    far above the tolerance; 1e-5 allows float32 round-off on outputs of O(1) (seen: 4e-7).
    """
    heads, dim_head = 2, 4
    layer = FullAttention(8, heads=heads, dim_head=dim_head)
    x = _images((2, 4, 4, 8))
    w = _randomise(layer, x, qkv_std=0.4)
    expected, logits = _numpy_full_attention(w, x, heads, dim_head)
    assert 0.5 < logits.std() < 3.0
    assert _softmax(logits, -1).max(-1).mean() < 0.6  # many keys share the weight: not one-hot
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_linear_attention_matches_numpy_reference():
    """Linear attention against a float64 NumPy forward pass from the layer's own (random) weights.

    With Keras' zero-initialised output bias, out_norm (GroupNorm) cancels any global scale
    of q except through its epsilon, so a missing d ** -0.5 would move the output by only
    ~1e-3; with the random bias it moves it by up to 0.9. 1e-5 allows float32 round-off
    (seen: 4e-7).
    """
    heads, dim_head = 2, 4
    layer = LinearAttention(8, heads=heads, dim_head=dim_head)
    x = _images((2, 4, 6, 8))
    w = _randomise(layer, x, qkv_std=0.4)
    expected = _numpy_linear_attention(w, x, heads, dim_head)
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- #
# AutoEncoder
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "size,channels,norm",
    [
        ((16, 16), 1, "batch"),
        ((32, 32), 3, "group"),
        ((24, 40), 4, "batch"),
    ],
)
def test_autoencoder_shapes(size, channels, norm):
    ae = AutoEncoder(image_channels=channels, latent_channels=2, norm=norm, **TINY_AE)
    x = _images((2, *size, channels))
    z = ae.encoder(x)
    assert tuple(z.shape) == (2, size[0] // 4, size[1] // 4, 2)
    assert z.dtype == "float32"
    assert tuple(ae.decoder(z).shape) == (2, *size, channels)
    y = ae(x)
    assert tuple(y.shape) == x.shape and y.dtype == "float32"


def test_decoder_output_is_tanh_bounded():
    ae = AutoEncoder(**TINY_AE)
    z = 1000.0 * _images((2, 8, 8, 1))  # drive the last conv far into tanh's saturation
    y = ae.decoder(z).numpy()
    assert np.abs(y).max() <= 1.0
    assert np.abs(y).max() > 0.9  # saturation was reached, so the bound was really tested


@pytest.mark.parametrize(
    "shape,message",
    [
        ((1, 30, 32, 1), "height 30 is not divisible by 4"),
        ((1, 32, 18, 1), "width 18 is not divisible by 4"),
    ],
)
def test_autoencoder_rejects_sizes_that_do_not_divide(shape, message):
    ae = AutoEncoder(**TINY_AE)
    with pytest.raises(ValueError, match=message):
        ae(np.zeros(shape, "float32"))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(norm="layer"), "unknown norm 'layer'"),
        (dict(activation="softsign"), "unknown activation 'softsign'"),
    ],
)
def test_autoencoder_rejects_unknown_norm_or_activation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AutoEncoder(**TINY_AE, **kwargs)


def test_autoencoder_trains_with_compile_fit_and_reloads_identically(tmp_path):
    x = _images((8, 16, 16, 1))
    ds = tf.data.Dataset.from_tensor_slices(x).map(lambda a: (a, a)).batch(4)
    ae = AutoEncoder(**TINY_AE)
    ae.compile(keras.optimizers.Adam(3e-3), loss="mse")
    history = ae.fit(ds, epochs=6, shuffle=False, verbose=0).history["loss"]
    assert history[-1] < history[0]

    path = str(tmp_path / "ae.weights.h5")
    ae.save_weights(path)
    fresh = AutoEncoder(**TINY_AE)  # built by the constructor: no dummy call needed
    fresh.load_weights(path)
    # BatchNorm moving statistics travel too, so inference outputs match exactly.
    np.testing.assert_array_equal(fresh(x, training=False).numpy(), ae(x, training=False).numpy())


def test_autoencoder_config_round_trip():
    ae = AutoEncoder(
        image_channels=3, blocks_per_level=2, latent_channels=4, norm="group", activation="silu", **TINY_AE
    )
    config = json.loads(json.dumps(ae.get_config()))
    clone = AutoEncoder.from_config(config)
    assert [tuple(w.shape) for w in clone.weights] == [tuple(w.shape) for w in ae.weights]
    clone.set_weights(ae.get_weights())
    x = _images((1, 16, 16, 3))
    np.testing.assert_array_equal(clone(x).numpy(), ae(x).numpy())


def test_autoencoder_mixed_bfloat16_gives_float32():
    keras.config.set_dtype_policy("mixed_bfloat16")
    ae = AutoEncoder(**TINY_AE)
    x = _images((2, 16, 16, 1))
    z, y = ae.encoder(x), ae(x)
    assert z.dtype == "float32" and y.dtype == "float32"
    assert np.isfinite(y.numpy()).all()


def test_seed_autoencoder_parameter_count():
    ae = AutoEncoder(image_channels=1, base_channels=64, channel_mults=(1, 2, 4))
    widest = max(layer.filters for layer in ae.decoder.layers if hasattr(layer, "filters"))
    n = ae.count_params()
    print(
        f"seed AutoEncoder (base 64, mults 1,2,4, widest {widest}): {n:,} parameters "
        f"(encoder {ae.encoder.count_params():,}, decoder {ae.decoder.count_params():,})"
    )
    assert widest == 256
    assert tuple(ae.encoder(np.zeros((1, 128, 128, 1), "float32")).shape) == (1, 32, 32, 1)


TINY_ORIGINAL_AE = dict(base_channels=8, channel_mults=(1, 2, 4), activation="silu", layout="original")


def test_original_autoencoder_shapes_widths_and_blocks():
    ae = AutoEncoder(**TINY_ORIGINAL_AE)
    x = _images((2, 16, 16, 1))
    z = ae.encoder(x)
    assert tuple(z.shape) == (2, 4, 4, 1) and z.dtype == "float32"
    y = ae.decoder(z)
    assert tuple(y.shape) == (2, 16, 16, 1) and y.dtype == "float32" and np.abs(y.numpy()).max() <= 1.0
    blocks = [layer for layer in ae.encoder.layers if isinstance(layer, ResidualBlock)]
    assert [b.out_channels for b in blocks] == [32, 32, 32]  # the widest width throughout
    assert all(b.convs == 1 and not hasattr(b, "conv2") for b in blocks)
    assert blocks[0].skip is not None and blocks[1].skip is None  # 1x1 skip only where the width changes
    assert "stem" not in [layer.name for layer in ae.encoder.layers]
    decoder_blocks = [layer for layer in ae.decoder.layers if isinstance(layer, ResidualBlock)]
    assert [b.out_channels for b in decoder_blocks] == [32, 16, 8]
    upsampling = [layer for layer in ae.decoder.layers if isinstance(layer, keras.layers.Conv2DTranspose)]
    assert [(u.kernel_size, u.strides) for u in upsampling] == [((3, 3), (2, 2))] * 2
    assert all(isinstance(b.norm1, keras.layers.BatchNormalization) for b in blocks + decoder_blocks)


def test_one_conv_residual_block_normalises_the_sum_then_activates():
    """convs=1: silu(BN(conv3x3(x) + skip(x))); inference BN from random moving statistics, in NumPy."""
    block = ResidualBlock(6, norm="batch", activation="silu", convs=1)
    x = _images((2, 5, 5, 3))
    block(x, training=False)
    rng = np.random.default_rng(1)
    bn = block.norm1
    stats = [rng.uniform(0.5, 1.5, 6), rng.normal(0, 0.3, 6), rng.normal(0, 0.3, 6), rng.uniform(0.5, 2.0, 6)]
    for variable, value in zip((bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance), stats, strict=True):
        variable.assign(value.astype("float32"))
    gamma, beta, mean, var = stats
    h = block.conv1(x).numpy() + block.skip(x).numpy()
    normed = (h - mean) / np.sqrt(var + bn.epsilon) * gamma + beta
    expected = normed / (1.0 + np.exp(-normed))
    np.testing.assert_allclose(block(x, training=False).numpy(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="convs must be 1 or 2, got 3"):
        ResidualBlock(6, convs=3)


def test_original_autoencoder_config_round_trip_and_default_layout():
    ae = AutoEncoder(**TINY_ORIGINAL_AE)
    config = json.loads(json.dumps(ae.get_config()))
    assert config["layout"] == "original"
    clone = AutoEncoder.from_config(config)
    assert clone.layout == "original" and clone.count_params() == ae.count_params()
    clone.set_weights(ae.get_weights())
    x = _images((1, 16, 16, 1))
    np.testing.assert_array_equal(clone(x, training=False).numpy(), ae(x, training=False).numpy())
    del config["layout"]  # a config saved before the option existed
    assert AutoEncoder.from_config(config).layout == "project"
    with pytest.raises(ValueError, match="unknown layout 'lucid'"):
        AutoEncoder(**{**TINY_ORIGINAL_AE, "layout": "lucid"})


def test_original_layouts_under_mixed_bfloat16_give_float32():
    keras.config.set_dtype_policy("mixed_bfloat16")
    eps = OriginalUNet(**SMALL_UNET)(_images((2, 8, 8, 1)), _timesteps(2))
    y = AutoEncoder(**TINY_ORIGINAL_AE)(_images((2, 16, 16, 1)))
    assert eps.dtype == y.dtype == "float32"
    assert np.isfinite(eps.numpy()).all() and np.isfinite(y.numpy()).all()


def test_original_seed_autoencoder_parameter_count():
    ae = AutoEncoder(
        image_channels=1, base_channels=64, channel_mults=(1, 2, 4), norm="batch", activation="silu", layout="original"
    )
    n = ae.count_params()
    print(
        f"seed AutoEncoder, layout original: {n:,} parameters "
        f"(encoder {ae.encoder.count_params():,}, decoder {ae.decoder.count_params():,})"
    )
    encoder_widths = [layer.filters for layer in ae.encoder.layers if hasattr(layer, "filters")]
    encoder_widths += [layer.out_channels for layer in ae.encoder.layers if isinstance(layer, ResidualBlock)]
    assert sorted(encoder_widths) == [1] + [256] * 5  # to_latent, then 3 blocks and 2 downsamplings at 256
    decoder_widths = [getattr(layer, "filters", getattr(layer, "out_channels", None)) for layer in ae.decoder.layers]
    assert [w for w in decoder_widths if w] == [256, 256, 128, 128, 64, 1]  # 256 -> 128 -> 64 -> 1
    blocks = [layer for layer in ae.encoder.layers + ae.decoder.layers if isinstance(layer, ResidualBlock)]
    assert len(blocks) == 6 and all(isinstance(b.norm1, keras.layers.BatchNormalization) for b in blocks)
    assert n == 3_521_858  # BatchNorm statistics included (README: 3.5 M)
    assert tuple(ae.encoder(np.zeros((1, 128, 128, 1), "float32")).shape) == (1, 32, 32, 1)


# --------------------------------------------------------------------------- the SPADE decoder


def test_mask_modulation_scales_and_shifts_by_the_pooled_mask():
    """out = x (1 + γ) + β with γ, β a conv3x3 of the mask average-pooled to x's cells: with
    only the centre tap set (γ = 2 × class-1 share, β = −1 × class-0 share), a known answer."""
    layer = MaskModulation(1, 2)
    x = np.full((1, 2, 2, 1), 3.0, np.float32)
    tissue = np.zeros((1, 4, 4, 2), np.float32)
    tissue[..., 0] = 1.0
    tissue[0, :2, :2] = [0.0, 1.0]  # the top-left cell: all class 1
    tissue[0, 2, 2] = [0.0, 1.0]  # the bottom-right cell: a quarter class 1
    assert np.array_equal(layer(x, tissue), x)  # the conv starts at zero: x unchanged
    kernel = np.zeros((3, 3, 2, 2), np.float32)
    kernel[1, 1, 1, 0], kernel[1, 1, 0, 1] = 2.0, -1.0  # γ from class 1, β from class 0
    layer.gamma_beta.set_weights([kernel, np.zeros(2, np.float32)])
    share = np.array([[1.0, 0.0], [0.0, 0.25]])
    expected = 3.0 * (1.0 + 2.0 * share) - (1.0 - share)
    np.testing.assert_allclose(layer(x, tissue)[0, ..., 0], expected, rtol=1e-6)


def test_a_spade_decoder_made_from_a_decoder_decodes_as_it_until_its_modulations_learn():
    arch = dict(
        image_channels=1, base_channels=8, channel_mults=(1, 2, 4), blocks_per_level=1, latent_channels=2,
        norm="group", activation="relu", layout="project",
    )  # fmt: skip
    decoder = build_decoder(**arch)
    spade = build_decoder(**arch, mask_classes=4)
    assert [layer.name for layer in spade.layers if isinstance(layer, MaskModulation)] == [
        "level2_modulation",
        "level1_modulation",
        "level0_modulation",
    ]
    assert [layer.pool for layer in spade.layers if isinstance(layer, MaskModulation)] == [4, 2, 1]
    copy_weights(decoder, spade)
    rng = np.random.default_rng(0)
    z = tf.constant(rng.normal(size=(2, 4, 4, 2)), tf.float32)
    masks = tf.one_hot(rng.integers(0, 4, size=(2, 16, 16)), 4)
    np.testing.assert_array_equal(spade([z, masks]), decoder(z))
    # Once a modulation is not zero, the same latent decodes differently for another mask.
    modulation = spade.get_layer("level0_modulation").gamma_beta
    modulation.set_weights([rng.normal(scale=0.1, size=w.shape) for w in modulation.get_weights()])
    other = tf.one_hot(rng.integers(0, 4, size=(2, 16, 16)), 4)
    assert not np.allclose(spade([z, masks]), spade([z, other]))
    assert not np.allclose(spade([z, masks]), decoder(z))
