"""A MultiWorkerMirroredStrategy worker: custom loop, checkpoint, resume.

Usage: multiworker_loop.py RESULT_JSON CHECKPOINT_DIR STOP_AFTER_STEP

Runs as one worker of the cluster in TF_CONFIG, or alone without it. Trains
steps [restored iterations, STOP_AFTER_STEP) on a fixed global batch sequence,
then saves a checkpoint and writes the weights to RESULT_JSON.

Keras 3.15.1's model.fit fails under MultiWorkerMirroredStrategy on the
TensorFlow backend whatever the optimizer (`strategy.reduce` on the (x, y)
batch in `_maybe_symbolic_build`, then `reduce("MEAN", axis=0)` on the scalar
loss), so this uses the loop users of that strategy write.
"""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "tensorflow"

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_adashift import AdaShift  # noqa: E402

GLOBAL_BATCH = 8
TOTAL_STEPS = 10


def main(result_path, checkpoint_dir, stop_after):
    if "TF_CONFIG" in os.environ:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    else:
        strategy = tf.distribute.get_strategy()
        task = 0
    workers = strategy.num_replicas_in_sync  # one CPU replica per worker
    rng = np.random.default_rng(0)
    x = rng.normal(size=(TOTAL_STEPS * GLOBAL_BATCH, 4)).astype("float32")
    y = rng.normal(size=(TOTAL_STEPS * GLOBAL_BATCH, 2)).astype("float32")

    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(3, activation="tanh"),
                keras.layers.Dense(2),
            ]
        )
        optimizer = AdaShift(learning_rate=0.01, keep_num=3)
        # Keras 3.15.1 cannot create slots while tracing under a strategy
        # (keras issue 23085).
        optimizer.build(model.trainable_variables)
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    latest = tf.train.latest_checkpoint(checkpoint_dir)
    if latest:
        checkpoint.restore(latest).assert_consumed()

    @tf.function
    def train_step(x, y):
        def replica_step(x, y):
            with tf.GradientTape() as tape:
                error = model(x, training=True) - y
                # Scaled by the global batch: the all-reduce sums replicas.
                loss = tf.reduce_sum(tf.square(error)) / (2 * GLOBAL_BATCH)
            variables = model.trainable_variables
            grads = tape.gradient(loss, variables)
            optimizer.apply_gradients(zip(grads, variables))

        strategy.run(replica_step, args=(x, y))

    per_worker = GLOBAL_BATCH // workers
    start = int(optimizer.iterations.numpy())
    for step in range(start, stop_after):
        lo = step * GLOBAL_BATCH + task * per_worker
        train_step(x[lo:lo + per_worker], y[lo:lo + per_worker])

    # Every worker saves (the save is collective); each to its own directory.
    checkpoint.save(os.path.join(checkpoint_dir, "ckpt"))
    window = optimizer.variables[2]
    result = {
        "start": start,
        "iterations": int(optimizer.iterations.numpy()),
        "workers": workers,
        "weights": [w.tolist() for w in model.get_weights()],
        "window_name": window.name,
        "window": np.asarray(window.numpy()).tolist(),
    }
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
