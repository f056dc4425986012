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
):
    """The parameters after each step, one array per gradient.

    `learning_rate` may be a function of the 0-based step index.
    Weight decay is Keras's decoupled decay, applied every step before the
    AdaShift step (warm-up steps included), `θ -= θ · wd · lr`.
    """
    theta = np.asarray(theta, dtype=np.float64)
    weights = beta_1 ** np.arange(keep_num)  # for g_t, g_{t-1}, ...
    v = 0.0
    history = []
    out = []
    for t, g in enumerate(gradients, start=1):
        lr = learning_rate(t - 1) if callable(learning_rate) else learning_rate
        if weight_decay is not None:
            theta = theta - theta * weight_decay * lr
        history.append(np.asarray(g, dtype=np.float64))
        if t > keep_num:
            recent = history[-keep_num:][::-1]
            m = sum(w * h for w, h in zip(weights, recent)) / weights.sum()
            shifted = history[-keep_num - 1]
            v = beta_2 * v + (1 - beta_2) * reduce_square(
                shifted, spatial_op, axes
            )
            v_hat = v / (1 - beta_2 ** (t - keep_num))
            theta = theta - lr * m / (np.sqrt(v_hat) + epsilon)
        out.append(theta.copy())
    return out
