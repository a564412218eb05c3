"""keras_fixes.FusedAdam: Keras' Adam update, as one TensorFlow op a weight.

(FitFixes and LossScaleOptimizer are tested where they matter: test_diffusion.py's single
trace, test_distributed.py's replicas.)"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_fixes

# A tiny regression: an embedding (IndexedSlices gradients), a bias-free dense and a biased one.
INPUTS = np.array([[0, 1], [2, 0], [1, 1], [2, 2]], np.int32)
TARGETS = np.random.default_rng(0).standard_normal((4, 1)).astype(np.float32)


def trained_weights(optimizer, steps: int = 4, jit_compile: bool = False) -> list[np.ndarray]:
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((2,), dtype="int32"),
            keras.layers.Embedding(3, 4),
            keras.layers.Flatten(),
            keras.layers.Dense(5, use_bias=False, activation="tanh"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    batches = tf.data.Dataset.from_tensors((INPUTS, TARGETS)).repeat()
    model.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0)
    assert int(model.optimizer.iterations) == steps
    return [w.numpy() for w in model.weights]


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize(
    "rate", [lambda: 0.05, lambda: keras.optimizers.schedules.CosineDecay(0.05, 4)], ids=["constant", "cosine"]
)
def test_fused_adam_takes_kerass_adam_steps(rate, jit_compile):
    ours = trained_weights(keras_fixes.FusedAdam(rate(), epsilon=1e-6), jit_compile=jit_compile)
    keras_adam = trained_weights(keras.optimizers.Adam(rate(), epsilon=1e-6), jit_compile=jit_compile)
    untrained = trained_weights(keras.optimizers.SGD(0.0), steps=1)
    for w, k, w0 in zip(ours, keras_adam, untrained, strict=True):
        assert np.max(np.abs(k - w0)) > 0.05  # four steps of 0.05 moved every weight
        np.testing.assert_allclose(w, k, rtol=1e-5, atol=1e-6)


def test_fused_adam_is_one_op_a_weight_and_amsgrad_is_kerass():
    variables = [tf.Variable(np.ones((3, 2), np.float32)), tf.Variable(np.zeros(2, np.float32))]
    grads = [tf.fill((3, 2), 0.5), tf.constant([1.0, -2.0])]

    def graph_ops(optimizer) -> list[str]:
        optimizer.build(variables)
        step = tf.function(lambda: optimizer.apply(grads, variables))
        return [op.type for op in step.get_concrete_function().graph.get_operations()]

    fused, keras_ops = graph_ops(keras_fixes.FusedAdam(0.1)), graph_ops(keras.optimizers.Adam(0.1))
    assert fused.count("ResourceApplyAdam") == len(variables)
    assert "ResourceApplyAdam" not in keras_ops and len(fused) < len(keras_ops)
    assert "ResourceApplyAdam" not in graph_ops(keras_fixes.FusedAdam(0.1, amsgrad=True))
    grads[0] = tf.IndexedSlices(tf.constant([[0.5, 0.5], [1.0, 1.0]]), tf.constant([2, 2]), tf.constant([3, 2]))
    assert graph_ops(keras_fixes.FusedAdam(0.1)).count("ResourceApplyAdam") == 1  # the embedding's: Keras' update
