"""model.fit under MirroredStrategy over 2 logical CPUs, and on one device.

Usage: mirrored_fit.py RESULT_JSON
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


def train(strategy):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = rng.normal(size=(64, 2)).astype("float32")
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(3, activation="tanh"),
                keras.layers.Dense(2),
            ]
        )
        # No clipping: MirroredStrategy clips per replica before summing.
        model.compile(
            optimizer=AdaShift(learning_rate=0.01, keep_num=3), loss="mse"
        )
    initial = [w.tolist() for w in model.get_weights()]
    # 2 epochs of 4 steps: 5 updates after the 3-step warm-up.
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    opt = model.optimizer
    replica_copies_equal = all(
        all(
            np.array_equal(np.asarray(c), np.asarray(copies[0]))
            for c in copies
        )
        for copies in (
            strategy.experimental_local_results(v.value)
            for v in model.weights + opt.variables
        )
    )
    return {
        "initial": initial,
        "weights": [w.tolist() for w in model.get_weights()],
        "iterations": int(opt.iterations.numpy()),
        "replicas": strategy.num_replicas_in_sync,
        "replica_copies_equal": replica_copies_equal,
    }


def main(result_path):
    result = {
        "one": train(tf.distribute.OneDeviceStrategy("/cpu:0")),
        "mirrored": train(
            tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        ),
    }
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
