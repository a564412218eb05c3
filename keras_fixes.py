"""Workarounds for Keras 3 (3.15 here) behaviours: a mixin for models that ``fit`` trains, a
loss-scale optimizer whose replicas agree on skipping a step, and Adam as one fused op a weight.

Each workaround names the upstream issue whose fix lets it be deleted (or the cost it
removes); everywhere else it changes nothing. `FitFixes` is used by ``autoencoder.AutoEncoder``
and ``diffusion.LatentDiffusion`` (``class Model(FitFixes, keras.Model)``: the mixin must come
first); `LossScaleOptimizer` by ``runs.make_optimizer`` under mixed_float16; `FusedAdam` by
``runs.make_optimizer`` and ``oracle.fit_steps``.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops


class FitFixes:
    """Mixin for a ``keras.Model`` trained with ``fit``.

    * ``compile`` builds the optimizer's slots (Adam's moments) for a built model. Without a
      distribution strategy Keras creates them inside the first traced train step, and a
      ``tf.function`` that creates variables is traced twice, once to create them and once
      without (tensorflow/tensorflow#48851): building them first saves one trace of the
      train step, the largest part of a fit's start-up on a CPU (BENCHMARKS.md).

    Under ``MultiWorkerMirroredStrategy`` Keras assumes two things that the strategy does
    not allow (keras-team/keras#20585):

    * before the first epoch, and before every validation, Keras builds the model from one
      batch, which it gets with an eager ``strategy.reduce("MEAN", batch)`` of the
      distributed batch, and that fails ("Attempt to convert a value (PerReplica...)"): the
      build needs only shapes and dtypes, so this takes this worker's first replica's part
      of the batch. It restarts the epoch iterator first: from the second epoch on, the
      cached validation iterator is the one the last validation ran to its end, and a
      batch taken from it raises StopIteration;
    * Keras reduces each step's logs across workers with ``reduce("MEAN", v, axis=0)``,
      which fails for the scalars a train step returns ("Invalid reduction dimension 0"):
      `replica_logs` gives them shape (1,), so that the reduction is the mean over the
      replicas and the callbacks receive scalars as usual.
    """

    def compile(self, *args, **kwargs):
        super().compile(*args, **kwargs)
        if self.built and self.optimizer is not None:
            self.optimizer.build(self.trainable_variables)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = getattr(self, "_distribute_strategy", None)
        if strategy is None or iterator is None:
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        iterator.reset()  # Keras resets it again after the build, before the epoch
        for _, _, batches in iterator:
            batch = next(batches)
            break
        first = keras.tree.map_structure(lambda v: strategy.experimental_local_results(v)[0], batch)
        with strategy.scope():
            self._symbolic_build(data_batch=first)

    def replica_logs(self, logs: dict) -> dict:
        """`logs` (name -> scalar), each as shape (1,) in a cluster of several workers."""
        resolver = getattr(self.distribute_strategy, "cluster_resolver", None)
        cluster = resolver.cluster_spec().as_dict() if resolver is not None else {}
        if len(cluster.get("chief", [])) + len(cluster.get("worker", [])) <= 1:
            return logs
        return {name: ops.reshape(value, (1,)) for name, value in logs.items()}

    def train_step(self, data):
        return self.replica_logs(super().train_step(data))

    def test_step(self, data):
        return self.replica_logs(super().test_step(data))


class LossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """Keras' dynamic loss scaling (mixed_float16), with the skip decision taken by all replicas.

    Keras decides from each replica's local gradients, before the inner optimizer sums them
    across replicas: when one replica overflows and another does not, the other applies the
    sum, inf included, so Adam's moments become inf and every weight NaN (under a merge-call
    strategy Keras takes the first replica's decision for all, with the same effect). Here a
    step is applied only if every replica's gradients are finite, and skipped (loss scale
    halved) on all of them otherwise. Not reported upstream as such; keras-team/keras#20585
    is the nearest (fit under MWMS).

    The agreement is a sum of the replicas' overflow flags that the skip decision depends
    on, so it runs before the gradients' all-reduce on every device (collectives must run
    in the same order everywhere): in replica context (strategies without merge_call)
    inside `check_finite`; under merge_call (MirroredStrategy on CPUs, ...) in `_tf_apply`,
    by `strategy.reduce` in cross-replica context.
    """

    def check_finite(self, grads):
        finite = super().check_finite(grads)
        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1 or not _no_merge_call():
            return finite
        return ops.equal(context.all_reduce(tf.distribute.ReduceOp.SUM, _overflow(finite)), 0.0)

    def _tf_apply(self, grads, trainable_variables=None):
        if _no_merge_call() or tf.distribute.get_replica_context().num_replicas_in_sync == 1:
            return super()._tf_apply(grads, trainable_variables)

        def cross_replica(strategy, grads, trainable_variables):
            local = strategy.extended.call_for_each_replica(self.check_finite, args=(grads,))
            overflowed = strategy.reduce(
                tf.distribute.ReduceOp.SUM, strategy.extended.call_for_each_replica(_overflow, args=(local,)), axis=None
            )

            def apply():
                strategy.extended.call_for_each_replica(
                    self._stateful_handle_finite_grads, args=(grads, trainable_variables)
                )

            # In cross-replica context: a cond whose branch calls merge_call may not run in a replica's.
            ops.cond(ops.equal(overflowed, 0.0), apply, self._stateful_handle_non_finite_grads)

        tf.distribute.get_replica_context().merge_call(cross_replica, args=(grads, trainable_variables))


class FusedAdam(keras.optimizers.Adam):
    """``keras.optimizers.Adam`` whose update of each weight is TensorFlow's fused
    ``ResourceApplyAdam``: the same update (Kingma & Ba 2015, algorithm 1 with the bias
    corrections folded into the rate, as Keras does), with t = iterations + 1:

        m <- m + (1 - b1)(g - m);  v <- v + (1 - b2)(g² - v)
        w <- w - lr sqrt(1 - b2^t) / (1 - b1^t) · m / (sqrt(v) + eps)

    Keras writes that as about 15 graph ops a weight, each created in Python when the train
    step is traced (the largest part of tracing the demo UNet's step, with its ~200 weights),
    and XLA then compiles them all. One op a weight makes the first step of every `fit`
    cheaper (BENCHMARKS.md, "Tracing the train steps"); TensorFlow has the op on CPUs and
    GPUs and in XLA. Not upstream: Keras' optimizers are written once for every backend.
    Everything else (schedules, clipping, weight decay, loss scaling, distribution) is
    Keras'; amsgrad, and the sparse gradients of an embedding (which Keras applies row by
    row, not as the dense update above), take Keras' own update. `oracle.fit_steps` uses it
    directly, not through `runs.make_optimizer`: its float32 networks need no loss scaling
    in a mixed_float16 run.
    """

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad or isinstance(gradient, tf.IndexedSlices):  # an embedding's rows: Keras' sparse update
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        index = self._get_variable_index(variable)
        t = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.constant(self.beta_1, dtype), tf.constant(self.beta_2, dtype)
        # `.value.handle`: under tf.distribute, inside `extended.update`, the handle of this device's copy.
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle,
            m=self._momentums[index].value.handle,
            v=self._velocities[index].value.handle,
            beta1_power=tf.pow(beta_1, t),
            beta2_power=tf.pow(beta_2, t),
            lr=tf.cast(learning_rate, dtype),
            beta1=beta_1,
            beta2=beta_2,
            epsilon=tf.constant(self.epsilon, dtype),
            grad=tf.cast(gradient, dtype),
        )


def _no_merge_call() -> bool:
    return tf.__internal__.distribute.strategy_supports_no_merge_call()


def _overflow(finite):
    """1.0 where a replica's gradients were not all finite, else 0.0: summed over the replicas."""
    return 1.0 - tf.cast(finite, tf.float32)
