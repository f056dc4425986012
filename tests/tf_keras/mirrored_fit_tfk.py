"""tf_keras model.fit under MirroredStrategy over 2 logical CPUs, and on one
device, with keras_adashift.tf_keras.AdaShift. Run with TF_USE_LEGACY_KERAS=1.

Usage: mirrored_fit_tfk.py RESULT_JSON
"""

import json
import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"

import tensorflow as tf  # noqa: E402

# Must run before anything initialises TensorFlow's devices.
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import numpy as np  # noqa: E402
import tf_keras  # noqa: E402

from keras_adashift.tf_keras import AdaShift  # noqa: E402


def train(strategy, spatial_op):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = rng.normal(size=(64, 2)).astype("float32")
    init = tf_keras.initializers.GlorotUniform(seed=0)
    with strategy.scope():
        model = tf_keras.Sequential([
            tf_keras.Input((4,)),
            tf_keras.layers.Dense(3, activation="tanh",
                                  kernel_initializer=init),
            tf_keras.layers.Dense(2, kernel_initializer=init),
        ])
        # No clipping: MirroredStrategy clips per replica before summing.
        model.compile(optimizer=AdaShift(learning_rate=0.01, keep_num=3,
                                         spatial_op=spatial_op),
                      loss="mse")
    # 2 epochs of 4 steps: 5 updates after the 3-step warm-up.
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    opt = model.optimizer
    copies_equal = all(
        all(np.array_equal(np.asarray(c), np.asarray(copies[0]))
            for c in copies)
        for copies in (strategy.experimental_local_results(v)
                       for v in model.weights + opt.variables))
    return {
        "initial": [w.tolist() for w in
                    tf_keras.Sequential([
                        tf_keras.Input((4,)),
                        tf_keras.layers.Dense(3, kernel_initializer=init),
                        tf_keras.layers.Dense(2, kernel_initializer=init),
                    ]).get_weights()],
        "weights": [w.tolist() for w in model.get_weights()],
        "iterations": int(opt.iterations.numpy()),
        "step_counts": opt._step_counts.numpy().tolist(),
        "replicas": strategy.num_replicas_in_sync,
        "replica_copies_equal": copies_equal,
    }


def main(result_path):
    result = {}
    for op in ("max", "none"):
        result[op] = {
            "one": train(tf.distribute.OneDeviceStrategy("/cpu:0"), op),
            "mirrored": train(
                tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), op),
        }
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
