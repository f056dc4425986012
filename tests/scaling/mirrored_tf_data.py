"""A custom loop over a distributed, padded tf.data pipeline under
MirroredStrategy over 2 logical CPUs, and the same loop on one device.

Usage: mirrored_tf_data.py RESULT_JSON
"""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "tensorflow"

import tensorflow as tf  # noqa: E402

# Must run before anything initialises TensorFlow's devices.
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_adashift import AdaShift  # noqa: E402

FEATURES, BATCH = 4, 6


def dataset():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 7, size=24)
    xs = [rng.normal(size=(n, FEATURES)).astype("float32") for n in lengths]
    y = rng.integers(0, 2, size=24).astype("int32")
    ragged = tf.ragged.constant([s.tolist() for s in xs], ragged_rank=1,
                                dtype=tf.float32)
    return (tf.data.Dataset.from_tensor_slices((ragged, y)).batch(BATCH)
            .map(lambda x, y: (x.to_tensor(), y)).repeat(2)
            .prefetch(tf.data.AUTOTUNE))


def train(strategy):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((None, FEATURES)),
            keras.layers.Dense(5, activation="relu"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(2),
        ])
        # No clipping: MirroredStrategy clips per replica before summing.
        optimizer = AdaShift(learning_rate=0.05, keep_num=3, spatial_axes=0)
        optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None)
    initial = [w.tolist() for w in model.get_weights()]
    per_replica_batch = []

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(
                loss_fn(y, model(x, training=True)), global_batch_size=BATCH)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return tf.shape(x)[0]

    @tf.function
    def step(batch):
        return strategy.run(replica_step, args=batch)

    steps = 0
    for batch in strategy.experimental_distribute_dataset(dataset()):
        sizes = strategy.experimental_local_results(step(batch))
        if steps == 0:
            per_replica_batch = [int(s) for s in sizes]
        steps += 1
    replica_copies_equal = all(
        all(np.array_equal(np.asarray(c), np.asarray(copies[0]))
            for c in copies)
        for copies in (
            strategy.experimental_local_results(v.value)
            for v in model.weights + optimizer.variables
        )
    )
    return {
        "initial": initial,
        "weights": [w.tolist() for w in model.get_weights()],
        "steps": steps,
        "step_counts": optimizer._step_counts.numpy().tolist(),
        "replicas": strategy.num_replicas_in_sync,
        "per_replica_batch": per_replica_batch,
        "replica_copies_equal": replica_copies_equal,
    }


def main(result_path):
    result = {
        "one": train(tf.distribute.OneDeviceStrategy("/cpu:0")),
        "mirrored": train(
            tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])),
    }
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
