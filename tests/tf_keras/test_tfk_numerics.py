"""The tf_keras class pinned to the Keras 3 class and to tests/reference.py.

The same variables and the same gradient sequences (zero first gradients
for one variable, skipped steps for two others) go through
`keras_adashift.AdaShift` (Keras 3, TensorFlow backend) and
`keras_adashift.tf_keras.AdaShift` in this process, for every option. The
two trajectories must agree to rounding (they run the same step), and both
must match the float64 NumPy transcription of the authors' code.
"""

import functools
import zlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adashift
from keras_adashift import tf_keras as adashift_tf_keras
from reference import adashift_trajectory
from tfk_helpers import assert_trajectory_close

LR = 2.0**-6  # exact in float32: both classes' learning-rate variable
STEPS = 30
SHAPES = [(4, 3), (3,), (2, 2, 3)]
# Variable 0: its first two gradients are 0 (it must hold, not divide by
# ε); variable 1 gets no gradient every third step; variable 2 none on
# steps 5-7 (all 1-based). Other steps give every variable one.
ZERO_STEPS = {0: (1, 2)}
SKIPPED = {1: tuple(range(3, STEPS + 1, 3)), 2: (5, 6, 7)}


def _case(label, dtype="float64", **kwargs):
    kw = dict(keep_num=3, beta_1=0.9, beta_2=0.99, epsilon=1e-10,
              spatial_op="max", spatial_axes=None)
    kw.update(kwargs)
    return pytest.param(label, dtype, kw, id=label)


CASES = [
    _case("max-k3"),
    _case("mean-axes0-k3", spatial_op="mean", spatial_axes=0),
    _case("max-axes_minus1-k1", spatial_axes=-1, keep_num=1),
    _case("none-k3", spatial_op="none"),
    _case("none-k1-b1_0", spatial_op="none", keep_num=1, beta_1=0.0),
    _case("max-k3-b1_0", beta_1=0.0),
    _case("mean-k1-b1_0", spatial_op="mean", keep_num=1, beta_1=0.0),
    _case("max-axes0-bound", spatial_axes=0, step_bound=0.5),
    _case("none-bound", spatial_op="none", step_bound=1.0),
    _case("max-bf16window", dtype="float32", window_dtype="bfloat16"),
    _case("none-bf16window", dtype="float32", spatial_op="none",
          window_dtype="bfloat16"),
    _case("max-f32", dtype="float32"),
    _case("none-k1-f32", dtype="float32", spatial_op="none", keep_num=1),
    _case("mean-axes0-k3-b1_0-f32", dtype="float32", spatial_op="mean",
          spatial_axes=0, beta_1=0.0, epsilon=1e-3),
]


def _np_dtype(dtype):
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


@functools.cache
def _problem(label, dtype, bf16_gradients):
    """Initial values and gradients (None: skipped), float64 arrays whose
    values are exact in `dtype` (and in bfloat16 when the window is)."""
    rng = np.random.default_rng(zlib.crc32(label.encode()))
    exact = "bfloat16" if bf16_gradients else dtype

    def rounded(x):
        return x.astype(_np_dtype(exact)).astype(np.float64)

    thetas = [rounded(rng.normal(size=s)) for s in SHAPES]
    grads = []
    for i, s in enumerate(SHAPES):
        per_step = []
        for t in range(1, STEPS + 1):
            scale = 10.0 ** rng.uniform(-2, 2)
            g = rounded(rng.normal(size=s) * scale)
            if t in ZERO_STEPS.get(i, ()):
                g = np.zeros(s)
            per_step.append(None if t in SKIPPED.get(i, ()) else g)
        grads.append(per_step)
    return thetas, grads


def _run(optimizer, variables, grads, dtype):
    """The variables after each step, (steps, *shape) float64 arrays."""
    out = [np.empty((STEPS,) + s) for s in SHAPES]
    for t in range(STEPS):
        pairs = [(tf.constant(g[t], dtype), v)
                 for g, v in zip(grads, variables) if g[t] is not None]
        optimizer.apply_gradients(pairs)
        for i, v in enumerate(variables):
            out[i][t] = np.asarray(v.numpy(), np.float64)
    return out


def _reference_axes(kwargs, shape):
    axes = kwargs["spatial_axes"]
    if axes is None or kwargs["spatial_op"] == "none":
        return None
    axes = (axes,) if isinstance(axes, int) else axes
    return tuple(sorted(a % len(shape) for a in axes))


@functools.cache
def _trajectories(label, dtype, items):
    kwargs = dict(items)
    thetas, grads = _problem(label, dtype,
                             kwargs.get("window_dtype") == "bfloat16")
    k3_vars = [keras.Variable(t.astype(dtype), dtype=dtype, name=f"v{i}")
               for i, t in enumerate(thetas)]
    k3 = _run(keras_adashift.AdaShift(learning_rate=LR, **kwargs), k3_vars,
              grads, dtype)
    tfk_vars = [tf.Variable(t.astype(dtype), name=f"v{i}")
                for i, t in enumerate(thetas)]
    tfk = _run(adashift_tf_keras.AdaShift(learning_rate=LR, **kwargs),
               tfk_vars, grads, dtype)
    refs = [
        np.stack(adashift_trajectory(
            thetas[i], grads[i], learning_rate=LR,
            keep_num=kwargs["keep_num"], beta_1=kwargs["beta_1"],
            beta_2=kwargs["beta_2"], epsilon=kwargs["epsilon"],
            spatial_op=kwargs["spatial_op"],
            axes=_reference_axes(kwargs, SHAPES[i]),
            step_bound=kwargs.get("step_bound")))
        for i in range(len(SHAPES))
    ]
    return thetas, k3, tfk, refs


@pytest.mark.parametrize("label, dtype, kwargs", CASES)
def test_tf_keras_class_equals_keras3_class(label, dtype, kwargs):
    thetas, k3, tfk, _ = _trajectories(label, dtype,
                                       tuple(sorted(kwargs.items())))
    for i in range(len(SHAPES)):
        if dtype == "float64":
            assert_trajectory_close(tfk[i], k3[i], thetas[i], 1e-12,
                                    f"[{label}] variable {i} tf_keras vs "
                                    "Keras 3")
        else:
            np.testing.assert_array_max_ulp(
                tfk[i].astype("float32"), k3[i].astype("float32"), maxulp=4)


@pytest.mark.parametrize("label, dtype, kwargs", CASES)
def test_both_classes_match_the_reference(label, dtype, kwargs):
    thetas, k3, tfk, refs = _trajectories(label, dtype,
                                          tuple(sorted(kwargs.items())))
    rtol = 1e-11 if dtype == "float64" else 2e-5
    for i in range(len(SHAPES)):
        for name, got in (("Keras 3", k3[i]), ("tf_keras", tfk[i])):
            assert_trajectory_close(got, refs[i], thetas[i], rtol,
                                    f"[{label}] variable {i} {name} vs "
                                    "reference.py")
    # The schedule of the test is what it claims: variable 0 held on its
    # zero gradients, the skipped steps left variables 1 and 2 untouched.
    for t in ZERO_STEPS[0]:
        np.testing.assert_array_equal(tfk[0][t - 1], thetas[0])
    for i, steps in SKIPPED.items():
        for t in steps:
            np.testing.assert_array_equal(tfk[i][t - 1], tfk[i][t - 2])


def test_the_pins_can_fail():
    # A different β2 in one class moves the trajectory far beyond the
    # tolerances above: the comparison is not vacuous.
    label, dtype, kwargs = CASES[0].values
    thetas, grads = _problem(label, dtype, False)
    tfk_vars = [tf.Variable(t) for t in thetas]
    other = dict(kwargs, beta_2=0.999)
    tfk = _run(adashift_tf_keras.AdaShift(learning_rate=LR, **other),
               tfk_vars, grads, dtype)
    _, k3, _, _ = _trajectories(label, dtype, tuple(sorted(kwargs.items())))
    with pytest.raises(AssertionError):
        assert_trajectory_close(tfk[0], k3[0], thetas[0], 1e-12, "differs")
