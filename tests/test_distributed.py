"""Training under MirroredStrategy on 2 logical CPU devices, standing in for 2 GPUs.

The set-up costs a TensorFlow process of its own (logical devices are fixed when TensorFlow
starts), so one subprocess runs every check and prints its measurements as one JSON line;
each test asserts on its part:

* LatentDiffusion: the same batch gives the one-device loss, gradient step and EMA, and
  the replicas draw different noise;
* mixed_float16: a batch that overflows on one replica only skips the step on both
  (keras_fixes.LossScaleOptimizer), where Keras' own optimizer turns the weights to NaN,
  and a UNet trains with it over both replicas;
* validation SSIM/PSNR with an empty replica batch (a last batch of 1 image over 2
  replicas) stay finite and equal the one-device per-image mean;
* BatchNorm under a strategy of 2 replicas is synchronised: one training step gives the
  one-device weights.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

# One pytest-xdist worker runs this file (make test: --dist loadfile), so the subprocess runs once.

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import config as cfg
    import diffusion as D
    import hardware
    import metrics
    import modules
    import runs

    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    one_device = tf.distribute.get_strategy()
    result = {"replicas": mirrored.num_replicas_in_sync}

    def max_diff(a, b):
        return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b, strict=True))

    # -- LatentDiffusion: one device against two replicas, same batch, t and eps.
    unet_kw = dict(dim=8, dim_mults=(1,), channels=2, resnet_groups=4, attn_heads=2, attn_dim_head=8)
    schedule = D.make_schedule("linear", 20)

    def diffusion_model(strategy):
        with strategy.scope():
            model = D.LatentDiffusion(modules.UNet(**unet_kw), schedule, ema_decay=0.9, seed=1)
            model.build((None, 8, 8, 2))
            model.compile(optimizer=keras.optimizers.SGD(0.01))  # the update is the gradient itself
        return model

    keras.utils.set_random_seed(0)
    one, two = diffusion_model(one_device), diffusion_model(mirrored)
    two.set_weights(one.get_weights())
    start = [w.numpy() for w in one.network.weights]
    rng = np.random.default_rng(0)
    batch = {"latents": rng.standard_normal((4, 8, 8, 2)).astype(np.float32),
             "t": np.array([0, 6, 13, 19], np.int32),
             "noise": rng.standard_normal((4, 8, 8, 2)).astype(np.float32)}
    losses = []
    for model in (one, two):
        history = model.fit(tf.data.Dataset.from_tensors(batch).repeat(), epochs=1, steps_per_epoch=2, verbose=0)
        losses.append(history.history["loss"][0])
    result["diffusion"] = {
        "losses": losses,
        "weights_diff": max_diff(one.network.weights, two.network.weights),
        "ema_diff": max_diff(one.ema_network.weights, two.ema_network.weights),
        "moved": max_diff(one.network.weights, start),
    }
    draws = mirrored.run(tf.function(lambda: two._draws(tf.zeros((2, 8, 8, 2)), two.train_seed)[2]))
    replica0, replica1 = mirrored.experimental_local_results(draws)
    result["diffusion"]["replica_noise_diff"] = float(tf.reduce_max(tf.abs(replica0 - replica1)))
    result["diffusion"]["train_seed"] = two.train_seed.numpy().tolist()

    # -- mixed_float16: replica 1's half of the batch overflows float16 (max 65504), replica 0's does not.
    x = np.ones((2, 3), np.float32)
    x[1] = 1e5
    overflow = tf.data.Dataset.from_tensors((x, np.ones((2, 1), np.float32))).repeat()
    result["float16"] = {}
    for name in ("ours", "keras"):
        with hardware.dtype_policy("mixed_float16"), mirrored.scope():
            dense = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.Dense(1)])
            optimizer = runs.make_optimizer(0.1)
            if name == "keras":
                optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.1))
            dense.compile(optimizer=optimizer, loss="mse")
        before = [w.numpy().copy() for w in dense.trainable_weights]
        dense.fit(overflow, steps_per_epoch=1, epochs=1, verbose=0)
        per_replica = [
            [v.numpy() for v in mirrored.experimental_local_results(w.value)] for w in dense.trainable_weights
        ]
        result["float16"][name] = {
            "class": type(optimizer).__module__ + "." + type(optimizer).__name__,
            "finite": all(bool(np.isfinite(v).all()) for w in per_replica for v in w),
            "replicas_equal": all(bool((w[0] == w[1]).all()) for w in per_replica),
            "unchanged": max_diff([w[0] for w in per_replica], before) == 0.0,
            "loss_scale": float(optimizer.dynamic_scale.numpy()),
            "initial_scale": float(optimizer.initial_scale),
            "iterations": int(optimizer.iterations.numpy()),
        }

    # -- The UNet in mixed_float16 over two replicas (the loss-scaled optimizer's collectives
    # must run in the same order on both devices), as train.py compiles it.
    with hardware.dtype_policy("mixed_float16"), mirrored.scope():
        half = D.LatentDiffusion(modules.UNet(**unet_kw), schedule, ema_decay=0.9, seed=1)
        half.build((None, 8, 8, 2))
        half.compile(optimizer=runs.make_optimizer(1e-3))
    latents = tf.data.Dataset.from_tensors(batch["latents"]).repeat()
    history = half.fit(latents, epochs=2, steps_per_epoch=2, verbose=0)
    result["float16"]["unet"] = {
        "losses": history.history["loss"],
        "finite": all(bool(np.isfinite(w).all()) for w in half.get_weights()),
        "iterations": int(half.optimizer.iterations.numpy()),
        "loss_scale": float(half.optimizer.dynamic_scale.numpy()),
        "initial_scale": float(half.optimizer.initial_scale),
    }

    # -- The autoencoder: BatchNorm statistics and validation metrics over two replicas.
    config = cfg.preset("seed")
    config.data.image_size = 16
    config.autoencoder.ae_base_channels, config.autoencoder.ae_channel_mults = 4, (1, 2)
    config.train.steps_per_execution = 1
    images = np.random.default_rng(1).uniform(-1, 1, (4, 16, 16, 1)).astype(np.float32)
    pairs = tf.data.Dataset.from_tensors((images, images)).repeat()
    validation = tf.data.Dataset.from_tensor_slices((images[:3], images[:3])).batch(2)  # batches of 2, then 1
    ae = {}
    for name, strategy in (("one", one_device), ("two", mirrored)):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            autoencoder = runs.build_autoencoder(config)
            runs.compile_autoencoder(autoencoder, config)
        batch_norms = [
            layer for layer in autoencoder.encoder._flatten_layers()
            if isinstance(layer, keras.layers.BatchNormalization)
        ]
        if name == "two":
            autoencoder.set_weights(ae["one"]["initial"])
        initial = autoencoder.get_weights()
        autoencoder.fit(pairs, steps_per_epoch=1, epochs=1, verbose=0)
        scores = autoencoder.evaluate(validation, verbose=0, return_dict=True)
        ae[name] = {"initial": initial, "trained": autoencoder.get_weights(), "scores": scores,
                    "batch_norms": len(batch_norms), "synchronized": all(b.synchronized for b in batch_norms)}
        if name == "one":
            recon = autoencoder(images[:3], training=False)
            ae["per_image_ssim"] = float(np.mean(metrics.ssim(images[:3], recon).numpy()))
    result["autoencoder"] = {
        "batch_norms": ae["two"]["batch_norms"],
        "synchronized": [ae["one"]["synchronized"], ae["two"]["synchronized"]],
        "moved": max_diff(ae["one"]["trained"], ae["one"]["initial"]),
        "weights_diff": max_diff(ae["one"]["trained"], ae["two"]["trained"]),
        "scores": [ae["one"]["scores"], ae["two"]["scores"]],
        "per_image_ssim": ae["per_image_ssim"],
    }
    print("RESULT " + json.dumps(result))
""")


@pytest.fixture(scope="session")  # not "module": xdist may interleave other modules' tests
def mirrored():
    # oneDNN's CPU convolution returns its input unchanged for an empty batch (shape (0, h, w,
    # c_in) instead of c_out), which breaks the empty-replica check before any metric; TensorFlow's
    # own kernels (what an AVX2 CPU runs) and GPUs give the right empty shape.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="0")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=500
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT ") :])
    assert result["replicas"] == 2
    return result


@pytest.mark.slow
def test_mirrored_diffusion_step_matches_one_device(mirrored):
    r = mirrored["diffusion"]
    # Same batch, same t and eps: the global-batch mean loss and its gradient match one device.
    assert r["losses"][1] == pytest.approx(r["losses"][0], rel=1e-5)
    # A wrong scaling (e.g. a per-replica mean not divided by the replica count) moves the
    # weights by a multiple of the update, far beyond the tolerance.
    assert r["moved"] > 1e-3
    assert r["weights_diff"] < 1e-3 * r["moved"] and r["ema_diff"] < 1e-3 * r["moved"]
    assert r["replica_noise_diff"] > 0.1
    assert r["train_seed"] == [1, 1]


@pytest.mark.slow
def test_float16_overflow_on_one_replica_skips_the_step_on_both(mirrored):
    ours, keras_own = mirrored["float16"]["ours"], mirrored["float16"]["keras"]
    assert ours["class"] == "keras_fixes.LossScaleOptimizer"
    assert ours["finite"] and ours["replicas_equal"] and ours["unchanged"]
    assert ours["iterations"] == 0  # no Adam step was taken
    assert ours["loss_scale"] == ours["initial_scale"] / 2  # and the scale backed off
    # Keras' own: replica 0 saw finite gradients and applied the sum, inf included.
    assert not keras_own["finite"] and keras_own["loss_scale"] == keras_own["initial_scale"]
    # A UNet trains 4 steps in mixed_float16 over both replicas: finite weights, and the steps
    # that overflowed at the initial scale (2^15) were skipped, each halving it.
    unet = mirrored["float16"]["unet"]
    assert unet["finite"] and all(0 < loss < 10 for loss in unet["losses"]) and 1 <= unet["iterations"] <= 4, unet
    assert unet["loss_scale"] == unet["initial_scale"] / 2 ** (4 - unet["iterations"])


@pytest.mark.slow
def test_validation_metrics_with_an_empty_replica_batch_are_the_per_image_mean(mirrored):
    r = mirrored["autoencoder"]
    one, two = r["scores"]
    for name in ("ssim", "psnr", "loss"):
        assert all(map(lambda v: v == v, (one[name], two[name]))), (one, two)  # not NaN
    # The Mean metric weights each of the 3 images once (batches of 2 and 1), as a plain mean does.
    assert one["ssim"] == pytest.approx(r["per_image_ssim"], abs=1e-6)
    assert two["ssim"] == pytest.approx(one["ssim"], abs=1e-4)
    assert two["psnr"] == pytest.approx(one["psnr"], abs=1e-3)


@pytest.mark.slow
def test_batch_norm_is_synchronised_over_replicas(mirrored):
    r = mirrored["autoencoder"]
    assert r["batch_norms"] > 0 and r["synchronized"] == [False, True]
    # Each replica normalising its own 2 images would give other gradients: one Adam step
    # moves the weights by ~lr = 1e-3 either way, so only the global-batch statistics agree.
    assert r["moved"] > 1e-4
    assert r["weights_diff"] < 1e-2 * r["moved"]
