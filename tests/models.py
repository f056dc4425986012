"""The small models and data the test modules share."""

import keras
import numpy as np


def tiny_model(hidden=3, outputs=2, head_initializer="glorot_uniform"):
    """4 inputs, a tanh hidden layer, a linear head."""
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(hidden, activation="tanh"),
            keras.layers.Dense(outputs, kernel_initializer=head_initializer),
        ]
    )


def batches(count, size=4, seed=7):
    """`count` batches of `size` examples for tiny_model(): x, y."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, size, 4)).astype("float32")
    y = rng.normal(size=(count, size, 2)).astype("float32")
    return x, y
