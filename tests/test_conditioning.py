"""Tests of conditioning: conditioning.py (statistics, normalisation, requests), the UNet's
ConditionEmbedding, classifier-free guidance in the samplers and condition dropout in training.

The guidance tests use an analytic stand-in network whose conditional and unconditional
predictions are known, so eps_u + w (eps_c - eps_u) can be checked exactly.
"""

import argparse
import math
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import conditioning as C
import config as cfg
import diffusion as D
import modules
import samplers as S
from cli import UserError

LATENT = (4, 4, 2)
UNET_KW = dict(dim=8, dim_mults=(1,), channels=2, resnet_groups=4, attn_heads=2, attn_dim_head=8)
NAN = float("nan")


# --------------------------------------------------------------------------- conditioning.py


def test_parse_names_and_assignments():
    assert cfg.parse_condition_names("slice,age") == ("slice", "age")
    assert cfg.parse_condition_names(" slice , age ") == ("slice", "age")
    assert cfg.parse_condition_names("none") == cfg.parse_condition_names("") == ()
    with pytest.raises(argparse.ArgumentTypeError, match="'slice' is named twice"):
        cfg.parse_condition_names("slice,age,slice")
    assert C.parse_assignments(["slice=0.6", "age=80"]) == {"slice": 0.6, "age": 80.0}
    assert C.parse_assignments(None) == {}
    for bad in ("slice", "slice=", "=3", "slice=abc", "slice=nan"):
        with pytest.raises(UserError, match="expected NAME=NUMBER"):
            C.parse_assignments([bad])
    with pytest.raises(UserError, match="age is given twice"):
        C.parse_assignments(["age=1", "age=2"])


def stats_of(names=("slice", "sex", "cdr")):
    columns = ("slice", "age", "sex", "cdr")
    values = np.array(
        [
            [0.0, 20, 0, NAN],
            [0.5, 40, 1, 0.0],
            [1.0, 60, 1, 0.5],
            [0.25, NAN, 0, 1.0],
            [0.75, 80, 1, 2.0],
        ]
    )
    return C.condition_stats(names, columns, values)


def test_condition_stats_measure_known_values_and_detect_categories():
    stats = stats_of(("slice", "age", "sex", "cdr"))
    assert list(stats) == ["slice", "age", "sex", "cdr"]  # the order of --condition
    assert stats["slice"]["mean"] == pytest.approx(0.5)
    assert stats["slice"]["std"] == pytest.approx(np.std([0, 0.5, 1, 0.25, 0.75]))
    assert stats["age"]["known"] == 4 and stats["age"]["mean"] == pytest.approx(50.0)
    assert (stats["age"]["min"], stats["age"]["max"]) == (20.0, 80.0)
    # Only 0/1: categorical. CDR (0, 0.5, 1, 2) and age (4 integers here) stay continuous.
    assert stats["sex"]["categories"] == [0.0, 1.0]
    assert stats["cdr"]["categories"] is None and stats["age"]["categories"] is None
    constant = C.condition_stats(["c"], ["c"], np.array([[0.3], [0.3]]))
    assert constant["c"]["std"] == 1.0  # never a division by 0


def test_condition_stats_errors_name_the_variable():
    with pytest.raises(UserError, match=r"--condition mmse: no such label; the data's labels are slice, age"):
        C.condition_stats(["mmse"], ["slice", "age"], np.zeros((2, 2)))
    with pytest.raises(UserError, match="--condition age: no training image has a value"):
        C.condition_stats(["age"], ["age"], np.full((3, 1), np.nan))


def test_normalise_z_scores_categories_and_unknowns():
    stats = stats_of()
    raw = np.array([[0.5, 1, 0.5], [NAN, 0, NAN], [1.0, 7, 2.0]])
    out = C.normalise(stats, raw)
    assert out.dtype == np.float32 and out.shape == (3, 3)
    s = stats["slice"]
    assert out[0, 0] == pytest.approx((0.5 - s["mean"]) / s["std"])
    assert out[2, 0] == pytest.approx((1.0 - s["mean"]) / s["std"])
    assert out[0, 1] == 1.0 and out[1, 1] == 0.0  # the index among [0, 1]
    assert np.isnan(out[2, 1])  # a category never seen: unknown
    assert np.isnan(out[1, 0]) and np.isnan(out[1, 2])


def test_requested_values_fill_unknowns_and_check_names_and_ranges():
    stats = stats_of()
    raw = C.requested_values(stats, {"cdr": 1.0}, 3)
    assert raw.shape == (3, 3) and np.all(raw[:, 2] == 1.0) and np.isnan(raw[:, :2]).all()
    per_sample = C.requested_values(stats, {"slice": [0.1, 0.2, 0.3]}, 3)
    np.testing.assert_array_equal(per_sample[:, 0], [0.1, 0.2, 0.3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # in range: no warning
        C.requested_values(stats, {"slice": 0.9, "sex": 1}, 2)
    with pytest.warns(UserWarning, match=r"condition slice=1.5 is outside the training range \[0, 1\]"):
        C.requested_values(stats, {"slice": 1.5}, 1)
    with pytest.raises(UserError, match=r"not conditioned on 'age'; its condition variables are slice, sex, cdr"):
        C.requested_values(stats, {"age": 30}, 1)
    with pytest.raises(UserError, match=r"sex=0.5: not one of the training values 0, 1"):
        C.requested_values(stats, {"sex": 0.5}, 1)
    with pytest.raises(UserError, match="expected one value or 3 values, got 2"):
        C.requested_values(stats, {"slice": [0.1, 0.2]}, 3)
    with pytest.raises(UserError, match="trained without conditioning; it cannot take slice"):
        C.requested_values(None, {"slice": 0.5}, 1)
    assert C.requested_values(None, {}, 4) is None


def test_sweep_values_cover_the_training_range():
    stats = stats_of()
    np.testing.assert_allclose(C.sweep_values(stats, "slice", 5), [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_array_equal(C.sweep_values(stats, "sex", 5), [0.0, 1.0])


# --------------------------------------------------------------------------- the network


def test_condition_embedding_uses_the_unknown_vector_for_nan_and_keeps_gradients_finite():
    layer = modules.ConditionEmbedding((0, 2), 6)
    cond = tf.constant([[0.3, 1.0], [NAN, 0.0], [NAN, NAN], [0.3, NAN]])
    out = layer(cond)
    assert out.shape == (4, 6)
    layer.null.assign(np.arange(12, dtype=np.float32).reshape(2, 6))
    with tf.GradientTape() as tape:
        out = layer(cond)
        loss = tf.reduce_sum(out**2)
    null = layer.null.numpy()
    np.testing.assert_allclose(out[2], null[0] + null[1], rtol=1e-6)  # nothing known
    table = layer.encoders[1].embeddings.numpy()
    np.testing.assert_allclose(out[1], null[0] + table[0], rtol=1e-6)
    np.testing.assert_allclose(out[0] - out[3], table[1] - null[1], rtol=1e-5, atol=1e-5)
    grads = tape.gradient(loss, layer.trainable_variables)
    assert all(np.isfinite(tf.convert_to_tensor(g).numpy()).all() for g in grads)


def test_conditional_unet_none_means_unknown_and_an_unconditional_one_refuses_cond():
    unet = modules.UNet(**UNET_KW, cond_categories=(0, 2))
    x, t = tf.random.normal((3, *LATENT), seed=1), tf.constant([0, 5, 9])
    unknown = unet(x, t, tf.fill((3, 2), NAN))
    np.testing.assert_array_equal(unet(x, t).numpy(), unknown.numpy())
    unet.cond_embedding.null.assign(tf.random.normal((2, 4 * UNET_KW["dim"]), seed=2))
    known = unet(x, t, tf.constant([[0.5, 1.0]] * 3))
    assert not np.allclose(known.numpy(), unet(x, t).numpy())
    clone = modules.UNet.from_config(unet.get_config())
    assert clone.cond_categories == (0, 2)
    plain = modules.UNet(**UNET_KW)
    plain(x, t)
    with pytest.raises(ValueError, match="built without conditioning"):
        plain(x, t, tf.zeros((3, 2)))


# --------------------------------------------------------------------------- guidance


class CondEcho(keras.layers.Layer):
    """eps_hat = c (the first condition, broadcast) where known, 0 where unknown: eps_c and eps_u are known."""

    def call(self, x_t, t, cond=None, training=None):
        if cond is None:
            return tf.zeros_like(x_t)
        c = tf.where(tf.math.is_nan(cond[:, :1]), 0.0, cond[:, :1])
        return tf.zeros_like(x_t) + c[:, :, None, None]


class Constant(keras.layers.Layer):
    """eps_hat = a fixed per-example value (B,), broadcast."""

    def __init__(self, values, **kwargs):
        super().__init__(**kwargs)
        self.values = tf.constant(values, tf.float32)

    def call(self, x_t, t, training=None):
        return tf.zeros_like(x_t) + self.values[:, None, None, None]


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp", "ddpm"])
def test_guided_sampling_is_eps_u_plus_w_times_the_difference(sampler):
    """With eps_c = c and eps_u = 0, guidance w must sample exactly as a network predicting w c."""
    schedule = D.make_schedule("linear", 20, 0.005, 0.2)
    cond = np.array([[0.5, 0.0], [-1.0, 0.0], [NAN, 0.0]], np.float32)
    w = 3.0
    guided = S.Sampler(CondEcho(), schedule)
    reference = S.Sampler(Constant([w * 0.5, w * -1.0, 0.0]), schedule)
    options = dict(seed=4) if sampler == "ddpm" else dict(steps=7, seed=4)
    got = getattr(guided, sampler)((3, *LATENT), cond=cond, guidance=w, **options)
    want = getattr(reference, sampler)((3, *LATENT), **options)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    # w = 1 is the conditional prediction alone, w = 0 the unconditional one.
    one = getattr(guided, sampler)((3, *LATENT), cond=cond, guidance=1.0, **options)
    np.testing.assert_allclose(
        one.numpy(), getattr(S.Sampler(Constant([0.5, -1.0, 0.0]), schedule), sampler)((3, *LATENT), **options), 1e-5
    )
    zero = getattr(guided, sampler)((3, *LATENT), cond=cond, guidance=0.0, **options)
    none = getattr(guided, sampler)((3, *LATENT), **options)
    np.testing.assert_allclose(zero.numpy(), none.numpy(), rtol=1e-5, atol=1e-5)


def test_new_conditions_and_weights_reuse_the_trace():
    schedule = D.make_schedule("linear", 20, 0.005, 0.2)
    s = S.Sampler(CondEcho(), schedule)
    for w, c in ((2.0, 0.1), (3.0, 0.4), (5.0, -0.2)):
        s.ddim((2, *LATENT), steps=5, cond=np.full((2, 1), c, np.float32), guidance=w)
    assert s._ddim_fn.experimental_get_tracing_count() == 1
    s.ddim((2, *LATENT), steps=5, cond=np.full((2, 1), 0.3, np.float32), guidance=1.0)  # no doubled batch
    assert s._ddim_fn.experimental_get_tracing_count() == 2
    with pytest.raises(ValueError, match=r"cond must be \(B=2, K\)"):
        s.ddim((2, *LATENT), steps=5, cond=np.zeros((3, 1), np.float32))


# --------------------------------------------------------------------------- training


def conditional_model(dropout, seed=3, mask_dropout=None, uncond_dropout=0.0):
    """A LatentDiffusion whose UNet takes one continuous condition and a tissue mask."""
    keras.utils.set_random_seed(0)
    unet = modules.UNet(**UNET_KW, cond_categories=(0,), mask_channels=MASK)
    schedule = D.make_schedule("linear", 20, 0.005, 0.2)
    model = D.LatentDiffusion(
        unet, schedule, seed=seed, cond_dropout=dropout, mask_dropout=mask_dropout, uncond_dropout=uncond_dropout
    )
    model.build((None, *LATENT))
    # Eager steps: the same train_step, without tracing a graph per model (3 tiny steps).
    model.compile(optimizer=keras.optimizers.Adam(1e-3), run_eagerly=True)
    return model


def fit(model, cond, steps=3, mask=None):
    x0 = np.random.default_rng(0).standard_normal((4, *LATENT)).astype(np.float32)
    batch = {"latents": x0, "cond": np.asarray(cond, np.float32)}
    if mask is not None:
        batch["tissue"] = np.asarray(mask, np.float32)
    data = tf.data.Dataset.from_tensors(batch).repeat()
    model.fit(data, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0)
    return [w.numpy() for w in model.network.weights]


def test_dropout_one_trains_exactly_the_unconditional_model_and_zero_does_not():
    """cond_dropout = 1 replaces every condition and every mask by unknown: the same updates as
    a batch whose conditions are all unknown and masks all zero (the t and eps draws do not
    depend on the dropout)."""
    known, mask = [[0.5], [-0.5], [1.0], [0.0]], tissue(1, n=4)
    dropped = fit(conditional_model(1.0), known, mask=mask)
    unknown = fit(conditional_model(0.0), [[NAN]] * 4, mask=np.zeros_like(mask))
    for a, b in zip(dropped, unknown, strict=True):
        np.testing.assert_array_equal(a, b)
    kept = fit(conditional_model(0.0), known, mask=mask)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(kept, unknown, strict=True)) > 0


def test_the_mask_drops_at_its_own_rate():
    """mask_dropout apart from cond_dropout: 1 and 0 zero every mask and keep every label, as a
    batch of zero masks; 0 and 1 keep every mask and drop every label. None: cond_dropout's."""
    known, mask = [[0.5], [-0.5], [1.0], [0.0]], tissue(1, n=4)
    masks_dropped = fit(conditional_model(0.0, mask_dropout=1.0), known, mask=mask)
    zero_masks = fit(conditional_model(0.0, mask_dropout=0.0), known, mask=np.zeros_like(mask))
    labels_dropped = fit(conditional_model(1.0, mask_dropout=0.0), known, mask=mask)
    unknown_labels = fit(conditional_model(0.0, mask_dropout=0.0), [[NAN]] * 4, mask=mask)
    for a, b in [*zip(masks_dropped, zero_masks, strict=True), *zip(labels_dropped, unknown_labels, strict=True)]:
        np.testing.assert_array_equal(a, b)
    assert conditional_model(0.3).mask_dropout == 0.3 and conditional_model(0.3, mask_dropout=0.5).mask_dropout == 0.5
    with pytest.raises(ValueError, match="mask_dropout must be in"):
        conditional_model(0.1, mask_dropout=1.5)


def test_uncond_dropout_drops_every_condition_and_the_mask_of_an_example_together():
    """uncond_dropout: an example keeps all its labels and its mask, or loses them all at once;
    1 trains exactly the unconditional model, as cond_dropout = 1 does."""
    model = conditional_model(0.0, uncond_dropout=0.5)
    n = 64
    cond = np.tile(np.float32([[0.5, -1.0]]), (n, 1))
    mask = np.full((n, *LATENT[:2], MASK), 1.0 / MASK, np.float32)
    x0 = np.zeros((n, *LATENT), np.float32)
    _, _, _, dropped_cond, dropped_mask = model._draws(
        {"latents": x0, "cond": cond, "tissue": mask}, model.train_seed, 0.0, 0.0, model.uncond_dropout
    )
    labels_gone = np.isnan(dropped_cond.numpy())
    mask_gone = (dropped_mask.numpy() == 0).all(axis=(1, 2, 3))
    assert (labels_gone.all(axis=1) | ~labels_gone.any(axis=1)).all()  # both labels, or neither
    np.testing.assert_array_equal(labels_gone[:, 0], mask_gone)  # the mask with them
    assert 0.3 < mask_gone.mean() < 0.7
    known, mask4 = [[0.5], [-0.5], [1.0], [0.0]], tissue(1, n=4)
    everything = fit(conditional_model(0.0, uncond_dropout=1.0), known, mask=mask4)
    unknown = fit(conditional_model(0.0), [[NAN]] * 4, mask=np.zeros_like(mask4))
    for a, b in zip(everything, unknown, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="uncond_dropout must be in"):
        conditional_model(0.1, uncond_dropout=-0.1)


def test_dropout_masks_come_from_the_saved_seed_stream():
    """The same seed gives the same masks (identical weights); another seed other masks."""
    cond = [[0.5], [-0.5], [1.0], [0.0]]
    model = conditional_model(0.5, seed=3)
    a, b = fit(model, cond), fit(conditional_model(0.5, seed=3), cond)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert model.train_seed.numpy()[1] == 3  # one counter step per train step covers t, eps and the masks
    assert math.isfinite(float(model.loss_tracker.result()))
    other = fit(conditional_model(0.5, seed=4), cond)
    assert max(float(np.max(np.abs(x - y))) for x, y in zip(a, other, strict=True)) > 0


def test_a_conditioned_fit_resumed_from_its_weights_continues_exactly(tmp_path):
    """3 steps, save, load into a fresh model, 3 more: the weights of 6 steps in one go, with
    conditions and tissue masks. The dropouts come from the saved seed counter like t and
    eps (train.py's checkpoints are these weight files; its resume is tested end to end in
    test_reliability.py)."""
    cond, mask = [[0.5], [NAN], [1.0], [0.0]], tissue(2, n=4)
    straight = conditional_model(0.5)
    fit(straight, cond, steps=6, mask=mask)
    first = conditional_model(0.5)
    fit(first, cond, steps=3, mask=mask)
    path = str(tmp_path / "checkpoint.weights.h5")
    first.save_weights(path)
    resumed = conditional_model(0.5)
    resumed.optimizer.build(resumed.trainable_variables)
    resumed.load_weights(path)
    fit(resumed, cond, steps=3, mask=mask)
    for a, b in zip(straight.get_weights(), resumed.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- tissue masks

MASK = 3  # mask classes of the tests' tissue-conditioned UNets


def tissue(seed=0, n=3):
    """(n, 4, 4, MASK) float32 class fractions per cell, each cell summing to 1."""
    raw = np.random.default_rng(seed).random((n, *LATENT[:2], MASK)).astype(np.float32)
    return raw / raw.sum(axis=-1, keepdims=True)


def test_mask_unet_none_means_a_zero_mask_and_a_mask_changes_the_prediction():
    unet = modules.UNet(**UNET_KW, mask_channels=MASK)
    x, t = tf.random.normal((3, *LATENT), seed=1), tf.constant([0, 5, 9])
    zero = unet(x, t, tissue=np.zeros((3, *LATENT[:2], MASK), np.float32))
    np.testing.assert_array_equal(unet(x, t).numpy(), zero.numpy())
    assert not np.allclose(unet(x, t, tissue=tissue()).numpy(), zero.numpy())
    # init_conv sees the latent's channels and the mask's.
    assert unet.init_conv.kernel.shape == (7, 7, LATENT[2] + MASK, UNET_KW["dim"])
    clone = modules.UNet.from_config(unet.get_config())
    assert clone.mask_channels == MASK
    with pytest.raises(ValueError, match="expected a tissue mask of 3 channels, got 4"):
        unet(x, t, tissue=np.zeros((3, *LATENT[:2], 4), np.float32))
    plain = modules.UNet(**UNET_KW)
    plain(x, t)
    with pytest.raises(ValueError, match="built without a tissue-mask input"):
        plain(x, t, tissue=tissue())
    assert (
        modules.UNet.from_config({k: v for k, v in plain.get_config().items() if k != "mask_channels"}).mask_channels
        == 0
    )


class TissueEcho(keras.layers.Layer):
    """eps_hat = the fraction of class 0 in each cell (0 for an unknown, all-zero mask)."""

    def call(self, x_t, t, tissue=None, training=None):
        if tissue is None:
            return tf.zeros_like(x_t)
        return tf.zeros_like(x_t) + tissue[..., :1]


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_guidance_with_a_mask_is_eps_u_plus_w_times_the_difference_and_zero_is_unconditional(sampler):
    schedule = D.make_schedule("linear", 20, 0.005, 0.2)
    mask = tissue(4)
    guided = S.Sampler(TissueEcho(), schedule)

    class Scaled(keras.layers.Layer):  # what w = 2.5 must amount to: 2.5 × the class-0 fraction
        def call(self, x_t, t, training=None):
            return tf.zeros_like(x_t) + 2.5 * mask[..., :1]

    got = getattr(guided, sampler)((3, *LATENT), steps=6, seed=2, tissue=mask, guidance=2.5)
    want = getattr(S.Sampler(Scaled(), schedule), sampler)((3, *LATENT), steps=6, seed=2)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    zero = getattr(guided, sampler)((3, *LATENT), steps=6, seed=2, tissue=mask, guidance=0.0)
    none = getattr(guided, sampler)((3, *LATENT), steps=6, seed=2)
    np.testing.assert_allclose(zero.numpy(), none.numpy(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"tissue must be \(B, h, w\) = \(3, 4, 4\)"):
        guided.ddim((3, *LATENT), steps=3, tissue=mask[:2])


def test_guidance_zero_with_a_mask_samples_the_unconditional_unet():
    """A real mask-conditioned UNet: w = 0 with a mask (one call on the doubled batch) gives the
    samples of the same network asked for nothing (its zero-mask half alone)."""
    unet = modules.UNet(**UNET_KW, cond_categories=(0,), mask_channels=MASK)
    sampler = S.Sampler(unet, D.make_schedule("linear", 20, 0.005, 0.2))
    with_mask = sampler.ddim((3, *LATENT), steps=4, seed=1, tissue=tissue(), cond=np.ones((3, 1)), guidance=0.0)
    unconditional = sampler.ddim((3, *LATENT), steps=4, seed=1)
    np.testing.assert_allclose(with_mask.numpy(), unconditional.numpy(), rtol=1e-5, atol=1e-5)
    guided = sampler.ddim((3, *LATENT), steps=4, seed=1, tissue=tissue(), guidance=3.0)
    assert not np.allclose(guided.numpy(), unconditional.numpy(), atol=1e-4)
