"""Constructor validation: bad hyperparameters fail at once, with a message
that names the argument, shows the received value and says what is allowed.

A wrong value that slipped through would only show up steps later as a NaN
or a silently different optimizer (beta_1 = 1 freezes m, keep_num = 0
divides by an empty window), so every case is pinned here.
"""

import math
import re

import keras
import numpy as np
import pytest

from keras_adashift import AdaShift


def _pattern(*fragments):
    """A regex that matches a message containing every fragment."""
    return "(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments)


def _assert_rejected(argument, value, allowed, **other):
    kwargs = {argument: value, **other}
    expected = (f"`{argument}`", f"{argument}={value!r}", allowed)
    try:
        with pytest.raises(ValueError, match=_pattern(*expected)) as info:
            AdaShift(**kwargs)
    except BaseException as e:  # DID NOT RAISE, another type, or no match
        raise AssertionError(
            f"AdaShift(**{kwargs!r}) should raise ValueError mentioning "
            f"{expected}; got {type(e).__name__}: {e}") from e
    return info


def test_learning_rate():
    for value in (-1e-3, -1, math.nan, math.inf, -math.inf):
        _assert_rejected("learning_rate", value, ">= 0")


BAD_BETAS = [-0.1, -1, 1, 1.0, 1.5, "0.9", None, True, False, [0.9],
             1 - 1e-8]  # the last rounds to 1.0 in float32


def test_betas():
    for name in ("beta_1", "beta_2"):
        for value in BAD_BETAS:
            _assert_rejected(name, value, "[0, 1)")


def test_keep_num():
    for value in (0, -1, 2.5, 3.0, True, False, "3", None,
                  2**31 - 1, 2**31, 2**70):
        _assert_rejected("keep_num", value, "int in [1, 2**31 - 2]")


def test_epsilon():
    for value in (-1e-8, -1, math.nan, math.inf, "1e-8", True):
        _assert_rejected("epsilon", value, ">= 0")


def test_spatial_op():
    for value in ("sum", None, "MAX", "Mean", "", "min", 0):
        _assert_rejected("spatial_op", value, "'max', 'mean', 'none'")


def test_spatial_axes():
    allowed = "non-empty tuple of distinct ints"
    for value in ((), [], (0, 0), (1, 1, 2), (0.5,), 1.0, "0", ("a",),
                  (0, None), True, (True,), {0: 1}):
        _assert_rejected("spatial_axes", value, allowed, spatial_op="max")
    # With no blocks to reduce, any axes are a mistake.
    for value in (0, (0, 1, 2), -1, [0]):
        _assert_rejected("spatial_axes", value, "'max' or 'mean'",
                         spatial_op="none")


def test_window_dtype():
    allowed = "'bfloat16', 'float32', 'float64'"
    for value in ("int32", "foo", "int8", "bool", "complex64", "float8_e4m3fn",
                  "float16", "half", np.float16):
        _assert_rejected("window_dtype", value, allowed)
    # float16 overflows above 65504: the message says what to use instead.
    _assert_rejected("window_dtype", "float16", "use 'bfloat16'")


def test_valid_edge_values_are_accepted():
    opt = AdaShift(beta_1=0.0, beta_2=0.0, epsilon=0.0, keep_num=1)
    assert (opt.beta_1, opt.beta_2, opt.epsilon, opt.keep_num) == (
        0.0, 0.0, 0.0, 1)
    opt = AdaShift(beta_1=np.float32(0.5), keep_num=np.int64(3),
                   epsilon=np.float64(1e-7), learning_rate=0)
    assert opt.keep_num == 3 and type(opt.keep_num) is int
    assert type(opt.beta_1) is float and type(opt.epsilon) is float

    opt = AdaShift(learning_rate=1)
    lr = opt.get_config()["learning_rate"]
    assert isinstance(lr, float) and lr == 1.0
    assert keras.backend.standardize_dtype(opt.learning_rate.dtype) == (
        keras.config.floatx())

    assert AdaShift(spatial_axes=[0, 1]).spatial_axes == (0, 1)
    assert AdaShift(spatial_axes=-1).spatial_axes == (-1,)
    # Same axis for rank 2, distinct ints: resolved per variable, not here.
    assert AdaShift(spatial_axes=(1, -1)).spatial_axes == (1, -1)
    assert AdaShift(spatial_op="mean", spatial_axes=0).spatial_op == "mean"
    assert AdaShift(spatial_op="none").spatial_axes is None
    for dtype in ("bfloat16", "float32", "float64"):
        assert AdaShift(window_dtype=dtype).window_dtype == dtype
    assert AdaShift(keep_num=2**31 - 2).keep_num == 2**31 - 2


def test_schedule_and_callable_learning_rates_are_used():
    """Accepted and actually used: with keep_num 1, beta_1 0, element-wise
    v and epsilon 0, the second step moves θ by -lr * g_2 / |g_1|."""
    schedule = keras.optimizers.schedules.ExponentialDecay(
        0.5, decay_steps=1, decay_rate=0.5)
    for lr, expected_rate in ((schedule, 0.25), (lambda: 0.125, 0.125)):
        variable = keras.Variable(np.array([1.0, 1.0]), dtype="float32")
        opt = AdaShift(learning_rate=lr, keep_num=1, beta_1=0.0,
                       spatial_op="none", epsilon=0.0)
        opt.apply_gradients([(keras.ops.array([2.0, 4.0]), variable)])
        opt.apply_gradients([(keras.ops.array([1.0, -2.0]), variable)])
        # Step 2 is the first update: schedule(1) = 0.5 * 0.5.
        expected = np.array([1.0, 1.0]) - expected_rate * np.array(
            [1.0 / 2.0, -2.0 / 4.0])
        np.testing.assert_allclose(keras.ops.convert_to_numpy(variable),
                                   expected, rtol=1e-6)


@pytest.mark.parametrize("old, value, new", [
    ("lr", 1e-3, "learning_rate"), ("eps", 1e-8, "epsilon"),
    ("betas", (0.9, 0.999), "beta_1 and beta_2"), ("n", 10, "keep_num"),
    ("reduce_func", "max", "spatial_op"),
])
def test_names_from_other_optimizers_point_to_ours(old, value, new):
    _assert_rejected(old, value, f"use `{new}`")


@pytest.mark.parametrize("name", ["adashift", "keras_adashift>AdaShift"])
def test_string_identifiers(name):
    """`compile(optimizer="adashift")`, as for Keras's own optimizers."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=name, loss="mse")
    assert type(model.optimizer) is AdaShift
    assert model.optimizer.get_config() == AdaShift().get_config() | {
        "name": model.optimizer.name}
