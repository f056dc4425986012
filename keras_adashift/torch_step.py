"""AdaShift's step on the PyTorch backend, in torch's in-place kernels.

Keras runs the torch backend eagerly, so each `keras.ops` call in
`AdaShift.update_step` costs tens of microseconds of Python: about 1 ms per
variable, ten times Keras's own torch Adam on a small CNN. Keras's torch
optimizers (`keras/src/backend/torch/optimizers/`) use `_foreach` kernels for
the same reason. This is the update of `AdaShift.update_step`, step for step;
the test suite checks every backend against the same NumPy reference.
"""

import torch
from keras import ops

from keras_adashift import gradient_window


@torch.no_grad()
def update(optimizer, grads, variables, learning_rate):
    """Applies one AdaShift step to all `variables` at once."""
    n = optimizer.keep_num
    beta_1, beta_2 = optimizer.beta_1, optimizer.beta_2
    index = [optimizer._get_variable_index(v) for v in variables]
    ms = [optimizer._momentums[i].value for i in index]
    vs = [optimizer._velocities[i].value for i in index]
    grads = [g.to(m.dtype) for g, m in zip(grads, ms)]

    # A tensor, not a variable, under gradient accumulation.
    step = ops.convert_to_tensor(optimizer.iterations).long() + 1
    newest, oldest = step % (n + 1), (step - n) % (n + 1)
    if optimizer.spatial_op == "max":
        # max(g²) = max|g|²: one fused kernel for every variable, where
        # `_spatial` is several eager ops per variable.
        peaks = torch._foreach_norm(grads, float("inf"))
    oldest_grads, oldest_squares = [], []
    for k, (i, gradient, m) in enumerate(zip(index, grads, ms)):
        whole = optimizer._block_axes[i] is None
        window = optimizer._windows[i]
        gradient_window.write(optimizer, window, newest, gradient)
        oldest_grads.append(gradient_window.read(window, oldest).to(m.dtype))
        if optimizer.spatial_op != "none":
            squares = optimizer._square_windows[i]
            if optimizer.spatial_op == "max" and whole:
                phi = peaks[k].square().reshape(squares.shape[1:])
            else:
                phi = optimizer._spatial(gradient, i)
            gradient_window.write(optimizer, squares, newest, phi)
            oldest_squares.append(gradient_window.read(squares, oldest))
    if optimizer.spatial_op == "none":
        oldest_squares = torch._foreach_mul(oldest_grads, oldest_grads)

    # `m` holds W·m_t, as in `update_step`.
    weight_sum, oldest_weight = optimizer._momentum_weights()
    torch._foreach_add_(ms, oldest_grads, alpha=-oldest_weight)
    torch._foreach_mul_(ms, beta_1)
    torch._foreach_add_(ms, grads)
    torch._foreach_mul_(vs, beta_2)
    torch._foreach_add_(vs, oldest_squares, alpha=1 - beta_2)

    # As in `update_step`, the step is held until the window is full: a zero
    # rate, and 1 added to the block-sized denominator, which keeps it finite
    # with epsilon 0 and adds nothing once the window is full.
    age = step - n
    active = age > 0
    bias_correction = 1 - torch.pow(beta_2, age.clamp(min=1).double())
    lr = torch.where(active, learning_rate, 0).double() / weight_sum
    rates = torch._foreach_div(vs, bias_correction)
    torch._foreach_sqrt_(rates)
    torch._foreach_add_(rates, optimizer.epsilon + (~active).double())
    torch._foreach_reciprocal_(rates)
    torch._foreach_mul_(rates, lr)
    updates = torch._foreach_mul(ms, rates)
    torch._foreach_sub_([v.value for v in variables], updates)
