"""A NumPy AdaShift written from the paper, independent of the package.

It keeps the gradient history as a list and computes m as the explicit
windowed sum (not the package's incremental form), in float64.
"""

import numpy as np


def reduce_square(gradient, spatial_op, axes):
    """φ(g²) with keepdims; `axes=None` reduces the whole array."""
    squared = np.square(gradient)
    if spatial_op == "none":
        return squared
    fn = np.max if spatial_op == "max" else np.mean
    if squared.ndim == 0:
        return squared
    return fn(squared, axis=axes, keepdims=True)


def adashift_trajectory(
    theta,
    gradients,
    learning_rate=0.01,
    keep_num=10,
    beta_1=0.9,
    beta_2=0.999,
    epsilon=1e-10,
    spatial_op="max",
    axes=None,
    weight_decay=None,
    step_bound=None,
):
    """The parameters after each step, one array per entry of `gradients`.

    The authors' released code, literally: no step counter; per block of v
    a flag z (the block moves) and the power b2p of its bias correction.
    A `None` gradient is a step that gives this variable no gradient: the
    variable and its state are left as they are, and its own history of
    gradients (the window) does not advance.

    `learning_rate` may be a function of the 0-based (global) step index.
    Weight decay is Keras's decoupled decay, applied on each step with a
    gradient before the AdaShift step (held steps included),
    `θ -= θ · wd · lr`. `step_bound` clips each element's step to
    `step_bound · |lr| / sqrt(1 - β2)`.
    """
    theta = np.asarray(theta, dtype=np.float64)
    weights = beta_1 ** np.arange(keep_num)  # for g_t, g_{t-1}, ...
    v, z, b2p = 0.0, 0.0, 1.0
    history = []
    out = []
    for t, g in enumerate(gradients, start=1):
        if g is None:
            out.append(theta.copy())
            continue
        lr = learning_rate(t - 1) if callable(learning_rate) else learning_rate
        if weight_decay is not None:
            theta = theta - theta * weight_decay * lr
        history.append(np.asarray(g, dtype=np.float64))
        recent = history[-keep_num:][::-1]
        m = sum(w * h for w, h in zip(weights, recent)) / weights.sum()
        # Before the window is full the gradient leaving it is a zero.
        shifted = (history[-keep_num - 1] if len(history) > keep_num
                   else np.zeros_like(history[-1]))
        v = beta_2 * v + (1 - beta_2) * reduce_square(shifted, spatial_op, axes)
        z = np.where((v > 0) | (z > 0), 1.0, 0.0)
        b2p = b2p * beta_2 * z + (1 - z)
        with np.errstate(divide="ignore", invalid="ignore"):
            step = m / (np.sqrt(v / np.maximum(1e-8, 1 - b2p)) + epsilon)
        step = lr * np.where(z > 0, step, 0.0)
        if step_bound is not None:
            limit = step_bound * abs(lr) / np.sqrt(1 - beta_2)
            step = np.clip(step, -limit, limit)
        theta = theta - step
        out.append(theta.copy())
    return out
