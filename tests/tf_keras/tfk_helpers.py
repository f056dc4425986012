"""What the tf_keras tests share: small models, data, trajectory checks."""

import numpy as np
import tf_keras


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


def assert_trajectory_close(actual, expected, theta0, rtol, what):
    """Every step within rtol of the largest |θ| seen so far (NaN fails)."""
    steps = len(expected)
    a = np.asarray(actual, np.float64).reshape(steps, -1)
    e = np.asarray(expected, np.float64).reshape(steps, -1)
    scale = np.maximum.accumulate(np.abs(e).max(axis=1))
    scale = np.maximum(scale, max(np.abs(theta0).max(), 1e-3))
    err = np.abs(a - e).max(axis=1)
    bad = np.flatnonzero(~(err <= rtol * scale))
    if bad.size:
        t = bad[0]
        raise AssertionError(
            f"{what}: {bad.size} of {steps} steps off, first at step {t + 1}:"
            f" max |error| {err[t]:.3g} > {rtol:g} * {scale[t]:.3g}"
            f"\n  got      {a[t][:6]}\n  expected {e[t][:6]}")
