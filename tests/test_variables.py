"""Variables out of the ordinary: zero-size, integer (refused), overwritten
with their gradient (no slots), and gradients of the wrong shape.
"""

import re

import keras
import numpy as np
import pytest
from keras import ops

from conftest import BACKEND
from keras_adashift import AdaShift
from reference import adashift_trajectory


def _variable(value, name):
    return keras.Variable(np.asarray(value, "float32"), name=name)


def _numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def _optimizer_state(optimizer):
    """Every optimizer variable as a NumPy array, by path."""
    return {v.path: _numpy(v).copy() for v in optimizer.variables}


def _gradients(shape, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape).astype("float32") for _ in range(steps)]


# Zero-size variables train beside ordinary ones, as with Adam.

ZERO_SIZE_CASES = {
    "max": ("max", None),
    "mean": ("mean", None),
    "none": ("none", None),
    "max-axes1": ("max", 1),
    "mean-axes1": ("mean", 1),
}


@pytest.mark.parametrize("spatial_op, spatial_axes",
                         ZERO_SIZE_CASES.values(), ids=ZERO_SIZE_CASES.keys())
def test_zero_size_variables(spatial_op, spatial_axes):
    shapes = [(0,), (3, 0), (2, 2)]
    theta = np.array([[0.5, -1.0], [2.0, 0.25]], "float32")
    rng = np.random.default_rng(0)
    grads = [[rng.normal(size=s).astype("float32") for s in shapes]
             for _ in range(4)]

    def train(optimizer):
        variables = [_variable(np.ones(s), f"empty_{i}")
                     for i, s in enumerate(shapes[:2])]
        variables.append(_variable(theta, "ordinary"))
        for step in grads:
            optimizer.apply_gradients(
                zip([ops.convert_to_tensor(g) for g in step], variables))
        return variables

    adam = train(keras.optimizers.Adam(learning_rate=0.1))  # Keras copes
    assert not np.allclose(_numpy(adam[2]), theta)
    optimizer = AdaShift(learning_rate=0.1, keep_num=1,
                         spatial_op=spatial_op, spatial_axes=spatial_axes)
    variables = train(optimizer)
    for v, s in zip(variables, shapes):
        assert tuple(v.shape) == s
    expected = adashift_trajectory(
        theta, [step[2] for step in grads], learning_rate=0.1, keep_num=1,
        spatial_op=spatial_op,
        axes=None if spatial_axes is None else (spatial_axes,))[-1]
    assert not np.allclose(_numpy(variables[2]), theta)
    np.testing.assert_allclose(_numpy(variables[2]), expected, rtol=1e-5)
    for v in optimizer.variables:
        assert not np.any(np.isnan(_numpy(v))), v.path


# Integer variables have no gradient to keep: refused at build.


def test_integer_variable_rejected_at_build():
    # torch cannot make an integer tensor require a gradient.
    counter = keras.Variable(np.zeros(3, "int32"), dtype="int32",
                             name="int_counter",
                             trainable=BACKEND != "torch")
    with pytest.raises(ValueError,
                       match="(?s)(?=.*int_counter)(?=.*float)"):
        AdaShift().build([_variable(np.ones(2), "w"), counter])


# Variables that Keras overwrites with their gradient get no slots.


def test_overwrite_with_gradient_variables_get_no_slots():
    theta = np.array([0.5, -1.0, 2.0], "float32")
    normal = _variable(theta, "normal_kernel")
    special = _variable(np.zeros(2), "fp8_amax_history")
    special.overwrite_with_gradient = True
    optimizer = AdaShift(learning_rate=0.1, keep_num=1)
    optimizer.build([normal, special])
    for v in optimizer.variables:
        assert "fp8_amax_history" not in v.path, v.path
        assert "fp8_amax_history" not in v.name, v.name
    grads = _gradients(3, 3)
    for t, g in enumerate(grads):
        overwrite = np.array([t + 1.0, -2.0 * t], "float32")
        optimizer.apply_gradients([
            (ops.convert_to_tensor(g), normal),
            (ops.convert_to_tensor(overwrite), special),
        ])
        np.testing.assert_array_equal(_numpy(special), overwrite)
    expected = adashift_trajectory(theta, grads, learning_rate=0.1,
                                   keep_num=1)[-1]
    assert not np.allclose(_numpy(normal), theta)
    np.testing.assert_allclose(_numpy(normal), expected, rtol=1e-5)


# A gradient of another shape fails, naming the variable and both shapes,
# before it changes anything (it used to broadcast into the window).


@pytest.mark.parametrize("shape", [(1,), ()], ids=["length_1", "scalar"])
def test_gradient_shape_mismatch_rejected_without_side_effects(shape):
    w = _variable([0.5, -1.0, 2.0, 0.25], "mismatched_kernel")
    # Weight decay runs before the update step: the check must come first.
    optimizer = AdaShift(learning_rate=0.1, keep_num=1, weight_decay=0.1)
    for g in _gradients(4, 3):
        optimizer.apply_gradients([(ops.convert_to_tensor(g), w)])
    before, state = _numpy(w).copy(), _optimizer_state(optimizer)
    bad = ops.convert_to_tensor(np.full(shape, 0.5, "float32"))
    expected = ("mismatched_kernel", str(shape), "(4,)")
    with pytest.raises(
        ValueError,
        match="(?s)" + "".join(f"(?=.*{re.escape(e)})" for e in expected),
    ):
        optimizer.apply_gradients([(bad, w)])
    np.testing.assert_array_equal(_numpy(w), before)
    after = _optimizer_state(optimizer)
    assert after.keys() == state.keys()
    for path, value in state.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)
