"""What the tf_keras tests share: small models, data, trajectory checks."""

import numpy as np
import tf_keras

from closeness import assert_trajectory_close  # noqa: F401 (re-exported)


def tiny_model(hidden=3, outputs=2, seed=0):
    """4 inputs, a tanh hidden layer, a linear head (tf_keras)."""
    init = tf_keras.initializers.GlorotUniform(seed=seed)
    return tf_keras.Sequential([
        tf_keras.Input((4,)),
        tf_keras.layers.Dense(hidden, activation="tanh",
                              kernel_initializer=init),
        tf_keras.layers.Dense(outputs, kernel_initializer=init),
    ])


def data(samples=64, seed=7):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, 4)).astype("float32")
    y = rng.normal(size=(samples, 2)).astype("float32")
    return x, y
