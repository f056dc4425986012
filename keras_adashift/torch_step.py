"""AdaShift's step on the PyTorch backend, in torch's in-place kernels.

Keras runs the torch backend eagerly, so each `keras.ops` call in
`AdaShift.update_step` costs tens of microseconds of Python: about 1 ms per
variable, ten times Keras's own torch Adam on a small CNN. Keras's torch
optimizers (`keras/src/backend/torch/optimizers/`) use `_foreach` kernels for
the same reason. This is the update of `AdaShift.update_step`, step for step;
the test suite checks it against `update_step` and the NumPy reference.

It runs outside `torch.compile` (`jit_compile=True`): the per-variable slot
indices are data, which dynamo would split into many graphs, with warnings.
"""

import torch
from keras import ops

from keras_adashift import gradient_window


@torch.compiler.disable
@torch.no_grad()
def update(optimizer, states, grads, variables, learning_rate):
    """Applies one AdaShift step to `variables`, whose `VariableState`s are
    `states`."""
    n = optimizer.keep_num
    beta_1, beta_2 = optimizer.beta_1, optimizer.beta_2
    vs = [s.velocity.value for s in states]
    cs = [s.bias_correction.value for s in states]
    grads = [g.to(v.dtype) for g, v in zip(grads, vs)]

    counts = [s.iterations.value for s in states]
    torch._foreach_add_(counts, 1)
    steps = torch.stack(counts)
    newest, oldest = steps % (n + 1), (steps + 1) % (n + 1)
    whole_max = optimizer.spatial_op == "max" and all(
        s.axes is None for s in states)
    if whole_max:
        # max(g²) = max|g|²: one fused kernel for every variable, where
        # `_spatial` is several eager ops per variable.
        # An empty gradient has no inf-norm: its φ is 0 (held), as in
        # `_spatial`.
        peaks = torch._foreach_norm(
            [g if g.numel() else g.new_zeros(()) for g in grads],
            float("inf"))
    oldest_grads, oldest_squares, stored = [], [], []
    for k, (s, gradient) in enumerate(zip(states, grads)):
        if s.window is not None:
            narrow = gradient.to(s.window.value.dtype)
            gradient_window.write(optimizer, s.window, newest[k], narrow)
            stored.append(narrow.to(gradient.dtype))
            oldest_grads.append(
                gradient_window.read(s.window, oldest[k]).to(gradient.dtype))
        if s.square_window is not None:
            if whole_max:
                phi = peaks[k].square().reshape(s.velocity.shape)
            else:
                phi = optimizer._spatial(gradient, s)
            gradient_window.write(optimizer, s.square_window, newest[k], phi)
            oldest_squares.append(
                gradient_window.read(s.square_window, oldest[k]))
    if optimizer.spatial_op == "none":
        oldest_squares = torch._foreach_mul(oldest_grads, oldest_grads)

    weight_sum, oldest_weight = optimizer._momentum_weights()
    if beta_1 > 0:
        # `m` holds W·m_t of the gradients as stored, as in `update_step`.
        ms = [s.momentum.value for s in states]
        torch._foreach_add_(ms, oldest_grads, alpha=-oldest_weight)
        torch._foreach_mul_(ms, beta_1)
        torch._foreach_add_(ms, stored)
    else:
        ms = grads
    torch._foreach_mul_(vs, beta_2)
    torch._foreach_add_(vs, oldest_squares, alpha=1 - beta_2)

    # The hold and the bias correction c = 1 - β2^k of `update_step`.
    moving = [torch.logical_or(v != 0, c > 0) for v, c in zip(vs, cs)]
    torch._foreach_mul_(cs, beta_2)
    torch._foreach_add_(cs, 1 - beta_2)
    torch._foreach_mul_(cs, moving)
    # A held block (c = 0) divides v by 1 and gets 1 added to its
    # denominator, which keeps its rate finite with epsilon 0 before it is
    # multiplied by 0.
    held = [torch.logical_not(m) for m in moving]
    rates = torch._foreach_add(cs, held)
    rates = torch._foreach_div(vs, rates)
    torch._foreach_sqrt_(rates)
    torch._foreach_add_(rates, optimizer.epsilon)
    torch._foreach_add_(rates, held)
    torch._foreach_reciprocal_(rates)
    torch._foreach_mul_(rates, moving)
    lr = ops.convert_to_tensor(learning_rate).double() / weight_sum
    torch._foreach_mul_(rates, lr)
    updates = torch._foreach_mul(ms, rates)
    torch._foreach_sub_([v.value for v in variables], updates)
