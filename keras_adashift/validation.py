"""AdaShift's argument checks, shared by the Keras 3 and tf_keras classes.

Each raises a `ValueError` that names the argument, the value received and
what is allowed, at construction (or at `build` / `apply` for what depends
on the variables), before any state exists or is touched.
"""

import math
import numbers

import keras
import numpy as np

from keras_adashift import gradient_window

SPATIAL_OPS = ("max", "mean", "none")
WINDOW_DTYPES = ("bfloat16", "float32", "float64")


def variable_name(variable):
    return getattr(variable, "path", None) or variable.name


def check_float_variable(variable):
    dtype = keras.backend.standardize_dtype(variable.dtype)
    if not keras.backend.is_float_dtype(dtype):
        raise ValueError(
            f"AdaShift can only train float variables. Variable "
            f"{variable_name(variable)} has dtype {dtype}; make it "
            "non-trainable or give it a float dtype."
        )


def check_gradient_shape(gradient, variable):
    """A gradient must have its variable's shape (or be its row slices)."""
    if gradient is None or not hasattr(gradient, "shape"):
        return
    expected = tuple(variable.shape)
    if tuple(gradient.shape) == expected:
        return
    got = gradient_window.static_shape(gradient)
    if got is None:
        return
    if len(got) != len(expected) or any(
        g is not None and g != e for g, e in zip(got, expected)
    ):
        raise ValueError(
            f"The gradient of variable {variable_name(variable)} has shape "
            f"{got}, the variable {expected}. AdaShift keeps a window of "
            "past gradients per variable, so each gradient must have its "
            "variable's shape."
        )


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_learning_rate(learning_rate):
    if not _is_real(learning_rate):
        return learning_rate  # a schedule or a callable: Keras checks these
    if not math.isfinite(learning_rate) or learning_rate < 0:
        raise ValueError(
            "Argument `learning_rate` must be a finite float >= 0, a "
            "LearningRateSchedule or a callable. "
            f"Received: learning_rate={learning_rate!r}"
        )
    return float(learning_rate)


# Names users bring from other optimizers (tf.keras 1, torch, the paper).
RENAMED_ARGUMENTS = {"lr": "learning_rate", "eps": "epsilon",
                     "betas": "beta_1 and beta_2", "n": "keep_num",
                     "reduce_func": "spatial_op"}


def check_renamed_arguments(kwargs):
    for old, new in RENAMED_ARGUMENTS.items():
        if old in kwargs:
            raise ValueError(
                f"Argument `{old}` is not an AdaShift argument: use "
                f"`{new}`. Received: {old}={kwargs[old]!r}"
            )


def check_gradient_accumulation_steps(steps):
    if steps is None:
        return
    if not _is_int(steps) or steps < 2:
        raise ValueError(
            "Argument `gradient_accumulation_steps` must be None or an int "
            f">= 2. Received: gradient_accumulation_steps={steps!r}"
        )


# Slot indices are int32 on JAX (and in the window writes).
MAX_KEEP_NUM = 2**31 - 2


def check_keep_num(keep_num):
    if not _is_int(keep_num) or not 1 <= keep_num <= MAX_KEEP_NUM:
        raise ValueError(
            "Argument `keep_num` must be an int in [1, 2**31 - 2] (the "
            f"number of gradients in the window). Received: "
            f"keep_num={keep_num!r}"
        )
    return int(keep_num)


def check_beta(name, beta):
    # Below 1 in float32 too: β2 = 1 in float32 makes v̂ 0/0.
    if not _is_real(beta) or not 0 <= beta < 1 or np.float32(beta) >= 1:
        raise ValueError(
            f"Argument `{name}` must be a float in [0, 1) that stays below "
            f"1 in float32 (at most 1 - 2**-24). Received: {name}={beta!r}"
        )
    return float(beta)


def check_epsilon(epsilon):
    if not _is_real(epsilon) or not math.isfinite(epsilon) or epsilon < 0:
        raise ValueError(
            "Argument `epsilon` must be a finite float >= 0. "
            f"Received: epsilon={epsilon!r}"
        )
    return float(epsilon)


def check_spatial_op(spatial_op):
    if spatial_op not in SPATIAL_OPS:
        raise ValueError(
            f"Argument `spatial_op` must be one of {SPATIAL_OPS}. "
            f"Received: spatial_op={spatial_op!r}"
        )
    return spatial_op


def check_spatial_axes(spatial_axes, spatial_op):
    if spatial_axes is None:
        return None
    axes = (spatial_axes,) if _is_int(spatial_axes) else spatial_axes
    if (
        not isinstance(axes, (tuple, list))
        or not axes
        or not all(_is_int(a) for a in axes)
        or len(set(axes)) != len(axes)
    ):
        raise ValueError(
            "Argument `spatial_axes` must be None, an int or a non-empty "
            "tuple of distinct ints (the axes one block spans). "
            f"Received: spatial_axes={spatial_axes!r}"
        )
    if spatial_op == "none":
        raise ValueError(
            "Argument `spatial_axes` needs a reducing `spatial_op` "
            f"('max' or 'mean'); spatial_op='none' has no blocks. "
            f"Received: spatial_axes={spatial_axes!r}"
        )
    return tuple(int(a) for a in axes)


def check_step_bound(step_bound):
    if step_bound is None:
        return None
    # Finite in float32 too: the limit is a float32 number in float32 steps.
    if (not _is_real(step_bound) or not math.isfinite(step_bound)
            or not 0 < step_bound <= float(np.finfo(np.float32).max)):
        raise ValueError(
            "Argument `step_bound` must be None (off) or a float in "
            "(0, 3.4e38] (finite in float32; a multiple of "
            "learning_rate / sqrt(1 - beta_2)). "
            f"Received: step_bound={step_bound!r}"
        )
    return float(step_bound)


def check_window_dtype(window_dtype):
    if window_dtype is None:
        return None
    try:
        dtype = keras.backend.standardize_dtype(window_dtype)
    except ValueError:
        dtype = None
    if dtype == "float16":
        raise ValueError(
            "Argument `window_dtype` cannot be 'float16': gradients above "
            "65504 overflow to inf and tiny ones lose their digits; use "
            "'bfloat16' (float32's range) to halve the window's memory. "
            f"Allowed: None or one of {WINDOW_DTYPES}. "
            f"Received: window_dtype={window_dtype!r}"
        )
    if dtype not in WINDOW_DTYPES:
        raise ValueError(
            f"Argument `window_dtype` must be None or one of {WINDOW_DTYPES}."
            f" Received: window_dtype={window_dtype!r}"
        )
    return dtype
