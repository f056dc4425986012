"""A kernel and a bias (float32) stepped by hand, against tests/reference.py.

The helpers of the modules that test Keras's base optimizer arguments,
learning rates and loss scaling through `optimizer.apply`.
"""

import keras
import numpy as np
from keras import ops

from reference import adashift_trajectory

# float32 optimizer against a float64 reference; a wrong step is ~lr (1e-2).
TOL = dict(rtol=1e-5, atol=1e-5)
BASE = dict(learning_rate=0.05, keep_num=3, beta_1=0.5, beta_2=0.9)
SHAPES = {"kernel": (3, 2), "bias": (2,)}


def gradients(steps, seed=0):
    """Per step, one gradient per variable, at scales spanning 100x.

    AdaShift with φ = max is nearly invariant to a common scale of all
    gradients; varying the scale per step lets clipping and unscaling show.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        scale = 10.0 ** rng.uniform(-1, 1)
        out.append(
            {
                name: (rng.normal(size=shape) * scale).astype("float32")
                for name, shape in SHAPES.items()
            }
        )
    return out


def initial(seed=1):
    rng = np.random.default_rng(seed)
    return {
        name: rng.normal(size=shape).astype("float32")
        for name, shape in SHAPES.items()
    }


def variables(values):
    return {
        name: keras.Variable(value, name=name)
        for name, value in values.items()
    }


def run(optimizer, variables, gradients):
    """Applies each step's gradients; the values of the variables after each."""
    names = list(variables)
    out = []
    for step in gradients:
        optimizer.apply(
            [ops.convert_to_tensor(step[n]) for n in names],
            [variables[n] for n in names],
        )
        out.append({n: ops.convert_to_numpy(variables[n]) for n in names})
    return out


def reference(initial, gradients, **kwargs):
    return {
        name: adashift_trajectory(
            initial[name], [g[name] for g in gradients], **kwargs
        )
        for name in initial
    }


def assert_trajectory(actual, expected, **tol):
    tol = tol or TOL
    for t, step in enumerate(actual):
        for name, value in step.items():
            np.testing.assert_allclose(
                value,
                expected[name][t],
                err_msg=f"{name} after step {t + 1}",
                **tol,
            )
