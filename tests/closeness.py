"""The trajectory comparison both test suites use (Keras 3 and tf_keras)."""

import numpy as np


def assert_trajectory_close(actual, expected, theta0, rtol, what):
    """Every step within rtol of the largest |θ| seen so far (a NaN
    anywhere fails)."""
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
