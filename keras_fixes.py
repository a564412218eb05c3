"""Workarounds for Keras 3 (3.15 here) behaviours, collected in one mixin for models that ``fit`` trains.

Each workaround names the upstream issue whose fix lets it be deleted; everywhere else the
mixin changes nothing. Used by ``modules.AutoEncoder`` and ``diffusion.LatentDiffusion``
(``class Model(FitFixes, keras.Model)``: the mixin must come first).
"""

from __future__ import annotations

import keras
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

    * before the first epoch Keras builds the model from one batch, which it gets with an
      eager ``strategy.reduce("MEAN", batch)`` of the distributed batch, and that fails
      ("Attempt to convert a value (PerReplica...)"): the build needs only shapes and
      dtypes, so this takes this worker's first replica's part of the batch;
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
