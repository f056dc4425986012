"""Inputs at the edges, each beside Keras's Adam or the NumPy reference.

What was tried (issue 21's sweep and this module's own), and what holds:

- ε = 0 once `v` has decayed to 0 (a coordinate whose old gradients went
  to zero): no step, never 0/0 = NaN (`second_moment`).
- A gradient whose square overflows (1e20 in float32): the variable turns
  NaN from the step that gradient reaches `v` (Adam's `v` overflows too:
  NaN on TF and JAX, a silently frozen coordinate on torch), instead of
  its block freezing silently forever.
- φ(g²) and `v` below the smallest normal number (1.2e-38 in float32)
  count as zero on every backend (TensorFlow and XLA flush them anyway):
  a block whose first `v`, (1 - β2)·φ(g²), is that small holds; above,
  it moves as the reference does.
- A negative learning rate (ascent) with `step_bound`: the clip stays
  symmetric, `|lr|`-scaled, and held blocks stay still.
- `step_bound` past float32's range is refused at construction; one whose
  limit overflows the step's dtype clips nothing, on torch too.
- Gradients given as NumPy arrays, lists, Python floats and other
  backends' tensors: taken as this backend's tensors on every backend
  (Keras's torch Adam refuses them); a gradient of another shape, a Python
  float for a vector variable included, raises a ValueError naming both
  shapes (Adam broadcasts it on TF and JAX, or fails deep in a kernel).
- Side by side with Adam (same outcome, pinned here): an optimizer reused
  for variables it was not built for raises Keras's "Unknown variable";
  `build` twice is a no-op; `apply([], [])` does nothing; only `None`
  gradients raise Keras's "No gradients provided"; an int variable raises
  a ValueError naming it (Adam fails in a kernel); a float64 gradient for
  a float32 variable is cast.

Elsewhere: unknown static shapes (tests/test_unknown_shapes.py), sparse
and ragged gradients (tests/test_sparse.py, tests/test_with_tf_data.py),
dtypes (tests/test_dtypes.py), state saved under other settings
(tests/test_serialization.py).
"""

import keras
import numpy as np
import pytest
from keras import ops

from conftest import BACKEND
from keras_adashift import AdaShift
from reference import adashift_trajectory


def _steps(optimizer, theta, grads, dtype="float32"):
    """θ after each step of `optimizer.apply` on one variable."""
    variable = keras.Variable(np.asarray(theta, dtype), dtype=dtype)
    out = []
    for g in grads:
        optimizer.apply([ops.convert_to_tensor(np.asarray(g, dtype))],
                        [variable])
        out.append(ops.convert_to_numpy(variable).astype(np.float64))
    return np.array(out)


@pytest.mark.parametrize("spatial_op", ["none", "max"])
def test_epsilon_zero_after_v_decays_to_zero_takes_no_step(spatial_op):
    # β2 = 0.1: v = 0.1^k of its last non-zero value underflows float32
    # within ~40 steps of the gradients going to zero.
    grads = [[1.0, 1.0]] * 3 + [[0.0, 1.0 if spatial_op == "none" else 0.0]
                                ] * 60
    optimizer = AdaShift(0.1, keep_num=1, beta_1=0.0, beta_2=0.1,
                         epsilon=0.0, spatial_op=spatial_op)
    theta = _steps(optimizer, [1.0, 2.0], grads)
    assert np.all(np.isfinite(theta)), np.argwhere(~np.isfinite(theta))[:3]
    # m = g_t = 0 from step 4 on: the first coordinate stays put.
    np.testing.assert_array_equal(theta[3:, 0], theta[3, 0])
    if spatial_op == "none":
        expected = adashift_trajectory(
            [1.0, 2.0], grads, learning_rate=0.1, keep_num=1, beta_1=0.0,
            beta_2=0.1, epsilon=0.0, spatial_op="none")
        np.testing.assert_allclose(theta[:, 1], np.array(expected)[:, 1],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spatial_op", ["max", "none"])
def test_a_gradient_whose_square_overflows_turns_the_variable_nan(
        spatial_op):
    grads = [[1.0, 1.0]] * 3 + [[1e20, 1.0]] + [[1.0, 1.0]] * 5
    optimizer = AdaShift(0.1, keep_num=1, beta_1=0.0, beta_2=0.9,
                         spatial_op=spatial_op)
    theta = _steps(optimizer, [0.0, 0.0], grads)
    # g_4 reaches v at step 5 (keep_num 1): NaN from there, not a freeze.
    assert np.all(np.isfinite(theta[:4]))
    assert np.all(np.isnan(theta[4:, 0]))
    if spatial_op == "none":  # element-wise v: the other coordinate moves
        assert np.all(np.isfinite(theta[:, 1]))
        assert theta[-1, 1] < theta[3, 1]


def test_negative_learning_rate_with_step_bound_climbs_within_the_bound():
    rng = np.random.default_rng(3)
    grads = rng.normal(size=(12, 2)) * 10.0 ** rng.uniform(-3, 3, (12, 1))
    expected = np.array(adashift_trajectory(
        [1.0, 1.0], grads, learning_rate=-0.1, keep_num=2, step_bound=1.0))
    for set_after in (False, True):
        optimizer = AdaShift(keep_num=2, step_bound=1.0,
                             learning_rate=0.1 if set_after else
                             (lambda: -0.1))
        if set_after:
            optimizer.learning_rate = -0.1
        theta = _steps(optimizer, [1.0, 1.0], grads)
        np.testing.assert_array_equal(theta[:2], 1.0)  # held
        limit = 0.1 / np.sqrt(1 - 0.999)
        assert np.all(np.abs(np.diff(theta, axis=0)) <= limit * (1 + 1e-6))
        np.testing.assert_allclose(theta, expected, rtol=1e-5)


# v = (1 - β2)·g² at the first step: 1e-3·1e-36 is below float32's
# smallest normal, 1e-3·1e-32 above it.
@pytest.mark.parametrize("size, moves", [(1e-18, False), (1e-16, True)])
def test_squares_below_the_smallest_normal_count_as_zero(size, moves):
    grads = [[size, -size]] * 6
    optimizer = AdaShift(0.1, keep_num=1, beta_1=0.0, epsilon=0.0,
                         spatial_op="none")
    theta = _steps(optimizer, [1.0, 1.0], grads)
    if not moves:
        np.testing.assert_array_equal(theta, 1.0)
    else:
        expected = adashift_trajectory(
            [1.0, 1.0], grads, learning_rate=0.1, keep_num=1, beta_1=0.0,
            epsilon=0.0, spatial_op="none")
        np.testing.assert_allclose(theta, expected, rtol=1e-5)
        assert np.all(theta[-1] != 1.0)


def test_a_step_bound_whose_limit_overflows_float32_clips_nothing():
    rng = np.random.default_rng(4)
    grads = rng.normal(size=(6, 3))
    # 3e38 · 1 / sqrt(1e-3) is past float32's range.
    bounded = _steps(AdaShift(1.0, keep_num=1, step_bound=3e38),
                     np.zeros(3), grads)
    plain = _steps(AdaShift(1.0, keep_num=1), np.zeros(3), grads)
    np.testing.assert_array_equal(bounded, plain)


def _other_kinds():
    kinds = {"numpy": lambda g: g, "list": lambda g: g.tolist()}
    for module, make in (("tensorflow", lambda tf, g: tf.constant(g)),
                         ("jax.numpy", lambda jnp, g: jnp.asarray(g)),
                         ("torch", lambda torch, g: torch.tensor(g))):
        try:
            lib = __import__(module, fromlist=["_"])
        except ImportError:
            continue
        kinds[module] = lambda g, lib=lib, make=make: make(lib, g)
    return kinds


OTHER_KINDS = _other_kinds()


@pytest.mark.parametrize("kind", list(OTHER_KINDS))
def test_gradients_of_other_kinds_are_taken_as_tensors(kind):
    rng = np.random.default_rng(5)
    grads = rng.normal(size=(5, 2)).astype("float32")
    results = []
    for convert in (OTHER_KINDS[kind], ops.convert_to_tensor):
        variable = keras.Variable(np.ones(2, "float32"))
        optimizer = AdaShift(0.1, keep_num=2)
        for g in grads:
            optimizer.apply([convert(g)], [variable])
        results.append(ops.convert_to_numpy(variable))
    np.testing.assert_array_equal(results[0], results[1])
    assert np.all(results[0] != 1.0)


def test_a_python_float_for_a_vector_variable_names_both_shapes():
    variable = keras.Variable(np.ones(2, "float32"))
    with pytest.raises(ValueError, match=r"shape \(\), the variable \(2,\)"):
        AdaShift().apply([1.0], [variable])
    scalar = keras.Variable(np.float32(1.0))
    optimizer = AdaShift(0.1, keep_num=1)
    for _ in range(2):
        optimizer.apply([1.0], [scalar])
    assert float(ops.convert_to_numpy(scalar)) < 1.0


@pytest.mark.parametrize("optimizer_class", [keras.optimizers.Adam,
                                             AdaShift])
def test_misuse_fails_as_under_adam(optimizer_class):
    variable = keras.Variable(np.ones(2, "float32"))
    other = keras.Variable(np.ones(2, "float32"))
    grad = ops.ones((2,))
    optimizer = optimizer_class()
    optimizer.build([variable])
    optimizer.build([variable])  # a no-op
    optimizer.apply([], [])
    with pytest.raises(ValueError, match="No gradients provided"):
        optimizer.apply([None], [variable])
    optimizer.apply([grad], [variable])
    with pytest.raises(ValueError, match="Unknown variable"):
        optimizer.apply([grad], [other])


@pytest.mark.skipif(BACKEND == "jax", reason="JAX: float64 disabled")
def test_a_float64_gradient_for_a_float32_variable_is_cast():
    rng = np.random.default_rng(6)
    grads = rng.normal(size=(4, 2))
    runs = []
    for dtype in ("float64", "float32"):
        variable = keras.Variable(np.ones(2, "float32"))
        optimizer = AdaShift(0.1, keep_num=1)
        for g in grads:
            optimizer.apply([ops.convert_to_tensor(g.astype(dtype))],
                            [variable])
        runs.append(ops.convert_to_numpy(variable))
    assert runs[0].dtype == np.float32
    np.testing.assert_array_equal(runs[0], runs[1])
