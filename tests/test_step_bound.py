"""`step_bound`: the opt-in per-element bound on the step, against the
NumPy reference, and off by default."""

import keras
import numpy as np
import pytest
from keras import ops

from conftest import BACKEND
from keras_adashift import AdaShift
from reference import adashift_trajectory

# Exact in float32, as Keras stores the learning rate: sqrt(1 - β2) = 1/2.
LR, BETA_2 = 2.0**-7, 0.75
# JAX runs float32 (x64 is off); elsewhere float64 pins the arithmetic.
DTYPE = "float32" if BACKEND == "jax" else "float64"
RTOL = 1e-5 if DTYPE == "float32" else 1e-12


def _gradients(shape, steps, seed):
    """Gradients that grow 10x every 5 steps: the recent ones are far
    larger than those `v` is built from, so unbounded steps exceed Adam's
    bound lr / sqrt(1 - β2) and the clip binds."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** (np.arange(steps) / 5.0)
    return [s * rng.normal(size=shape) for s in scale]


def _run(optimizer, theta, grads, compiled):
    variable = keras.Variable(theta.astype(DTYPE))
    optimizer.build([variable])

    def apply(gradient):
        optimizer.apply([gradient], [variable])

    if compiled:
        import tensorflow as tf

        apply = tf.function(apply, jit_compile=compiled == "xla")
    out = []
    for g in grads:
        apply(ops.convert_to_tensor(g.astype(DTYPE)))
        out.append(ops.convert_to_numpy(variable).astype("float64"))
    return out


CASES = {
    "max": dict(keep_num=3, beta_1=0.9, spatial_op="max"),
    "none": dict(keep_num=3, beta_1=0.9, spatial_op="none"),
    "none_beta_1_zero": dict(keep_num=2, beta_1=0.0, spatial_op="none"),
    "per_unit": dict(keep_num=4, beta_1=0.5, spatial_op="mean",
                     spatial_axes=0),
}
MODES = [None] + (["graph", "xla"] if BACKEND == "tensorflow" else [])


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m or "eager")
@pytest.mark.parametrize("name", CASES)
def test_bounded_steps_match_the_reference(name, mode):
    kwargs = CASES[name]
    rng = np.random.default_rng(0)
    theta = rng.normal(size=(4, 3))
    grads = _gradients(theta.shape, 40, seed=1)
    bound = 0.25
    actual = _run(AdaShift(LR, beta_2=BETA_2, step_bound=bound, **kwargs),
                  theta, grads, mode)
    axes = 0 if "spatial_axes" in kwargs else None
    reference_kwargs = {k: v for k, v in kwargs.items()
                        if k != "spatial_axes"}
    expected = adashift_trajectory(theta, grads, LR, beta_2=BETA_2,
                                   axes=axes, step_bound=bound,
                                   **reference_kwargs)
    unbounded = adashift_trajectory(theta, grads, LR, beta_2=BETA_2,
                                    axes=axes, **reference_kwargs)
    limit = bound * LR / np.sqrt(1 - BETA_2)
    steps = np.abs(np.diff([theta] + unbounded, axis=0))
    assert steps.max() > 2 * limit, "the case must make the bound bind"
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=RTOL * limit)
    taken = np.abs(np.diff([theta] + actual, axis=0))
    assert taken.max() <= limit * (1 + 1e-6)


def test_off_by_default_and_in_the_config():
    assert AdaShift().step_bound is None
    optimizer = AdaShift(step_bound=2)
    config = optimizer.get_config()
    assert config["step_bound"] == 2.0
    assert AdaShift.from_config(config).step_bound == 2.0


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), float("nan"),
                                   "1", True, 1e40, 3.5e38])
def test_bad_step_bound_is_refused_at_construction(value):
    with pytest.raises(ValueError, match="Argument `step_bound` must be.*"
                       r"\(0, 3.4e38\]"):
        AdaShift(step_bound=value)


def test_the_bound_clips_a_step_adashift_would_take():
    # v comes from g_1 = 1e-3, so AdaShift's step on g_2 = 1 is
    # lr·g_2/|g_1| = 100; the bound clips it to
    # step_bound·lr/sqrt(1 - β2) = 1.
    steps = {}
    for label, bound in (("plain", None), ("bounded", 1.0)):
        variable = keras.Variable(np.zeros(2, "float32"))
        optimizer = AdaShift(0.1, keep_num=1, beta_1=0.0, spatial_op="none",
                             beta_2=0.99, epsilon=0.0, step_bound=bound)
        for gradient in (1e-3, 1.0):
            optimizer.apply([ops.full((2,), gradient)], [variable])
        steps[label] = -ops.convert_to_numpy(variable)
    np.testing.assert_allclose(steps["plain"], 100.0, rtol=1e-4)
    np.testing.assert_allclose(steps["bounded"], 1.0, rtol=1e-4)
