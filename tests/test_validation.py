"""Constructor arguments: bad values fail at once with a message naming the
argument, the value and what is allowed; edge values and aliases.

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
from reference import adashift_trajectory


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


BAD_BETAS = [-0.1, -1, 1, 1.0, 1.5, "0.9", None, True, False, [0.9],
             1 - 1e-8]  # the last rounds to 1.0 in float32
SPATIAL_AXES = "non-empty tuple of distinct ints"
WINDOW_DTYPES = "'bfloat16', 'float32', 'float64'"

# (argument, value, what the message says is allowed, other arguments)
REJECTED = [
    *[("learning_rate", v, ">= 0", {})
      for v in (-1e-3, -1, math.nan, math.inf, -math.inf)],
    *[(name, v, "[0, 1)", {})
      for name in ("beta_1", "beta_2") for v in BAD_BETAS],
    *[("keep_num", v, "int in [1, 2**31 - 2]", {})
      for v in (0, -1, 2.5, 3.0, True, False, "3", None,
                2**31 - 1, 2**31, 2**70)],
    *[("epsilon", v, ">= 0", {})
      for v in (-1e-8, -1, math.nan, math.inf, "1e-8", True)],
    *[("spatial_op", v, "'max', 'mean', 'none'", {})
      for v in ("sum", None, "MAX", "Mean", "", "min", 0)],
    *[("spatial_axes", v, SPATIAL_AXES, dict(spatial_op="max"))
      for v in ((), [], (0, 0), (1, 1, 2), (0.5,), 1.0, "0", ("a",),
                (0, None), True, (True,), {0: 1})],
    # With no blocks to reduce, any axes are a mistake.
    *[("spatial_axes", v, "'max' or 'mean'", dict(spatial_op="none"))
      for v in (0, (0, 1, 2), -1, [0])],
    *[("window_dtype", v, WINDOW_DTYPES, {})
      for v in ("int32", "foo", "int8", "bool", "complex64",
                "float8_e4m3fn", "float16", "half", np.float16)],
    # float16 overflows above 65504: the message says what to use instead.
    ("window_dtype", "float16", "use 'bfloat16'", {}),
]


def _rejected_id(argument, value, allowed, other):
    return f"{argument}-{value!r}" + "".join(
        f"-{k}-{v}" for k, v in other.items()) + (
        "-hint" if allowed.startswith("use") else "")


@pytest.mark.parametrize("argument, value, allowed, other", REJECTED,
                         ids=[_rejected_id(*case) for case in REJECTED])
def test_bad_value_rejected(argument, value, allowed, other):
    _assert_rejected(argument, value, allowed, **other)


# gradient_accumulation_steps must be an int >= 2 (Keras lets 2.5 through
# and takes 0 for None).


@pytest.mark.parametrize(
    "steps", [2.5, 1, 0, True, "2"],
    ids=["fraction", "one", "zero", "bool", "string"],
)
def test_gradient_accumulation_steps_rejected(steps):
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        AdaShift(gradient_accumulation_steps=steps)


@pytest.mark.parametrize("steps", [2, 3])
def test_gradient_accumulation_steps_accepted(steps):
    assert AdaShift(gradient_accumulation_steps=steps) \
        .gradient_accumulation_steps == steps


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


def test_beta_2_just_below_one_in_float32_trains():
    # The largest float32 below 1 is a valid beta_2 and trains like the
    # float64 reference (closer to 1 rounds to 1 and is refused above).
    beta_2 = 1 - 2**-24
    assert np.float32(beta_2) < 1
    theta = np.array([0.5, -1.0, 2.0], "float32")
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=3).astype("float32") for _ in range(6)]
    w = keras.Variable(theta, name="w")
    optimizer = AdaShift(learning_rate=0.1, keep_num=2, beta_2=beta_2)
    for g in grads:
        optimizer.apply_gradients([(keras.ops.convert_to_tensor(g), w)])
    expected = adashift_trajectory(theta, grads, learning_rate=0.1,
                                   keep_num=2, beta_2=beta_2)[-1]
    actual = keras.ops.convert_to_numpy(w)
    assert np.all(np.isfinite(actual))
    assert not np.allclose(actual, theta)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("old, value, new", [
    ("lr", 1e-3, "learning_rate"), ("eps", 1e-8, "epsilon"),
    ("betas", (0.9, 0.999), "beta_1 and beta_2"), ("n", 10, "keep_num"),
    ("reduce_func", "max", "spatial_op"),
])
def test_names_from_other_optimizers_point_to_ours(old, value, new):
    _assert_rejected(old, value, f"use `{new}`")


@pytest.mark.parametrize("name",
                         ["adashift", "AdaShift", "keras_adashift>AdaShift"])
def test_string_identifiers(name):
    """`compile(optimizer="adashift")` or `"AdaShift"`, as for Keras's own
    optimizers (`"adam"` and `"Adam"`)."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=name, loss="mse")
    assert type(model.optimizer) is AdaShift
    assert model.optimizer.get_config() == AdaShift().get_config() | {
        "name": model.optimizer.name}


@pytest.mark.parametrize("name", ["adashift", "AdaShift"])
def test_optimizers_get_and_deserialize_take_the_names(name):
    assert type(keras.optimizers.get(name)) is AdaShift
    optimizer = keras.optimizers.deserialize(
        {"class_name": name, "config": {"keep_num": 3}})
    assert type(optimizer) is AdaShift and optimizer.keep_num == 3
