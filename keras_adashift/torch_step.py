"""AdaShift's step on the PyTorch backend, in torch's multi-tensor kernels.

Keras runs the torch backend eagerly, so each `keras.ops` call in
`AdaShift.update_step` costs tens of microseconds of Python: about 1 ms per
variable, ten times Keras's own torch Adam on a small CNN. Keras's torch
optimizers (`keras/src/backend/torch/optimizers/`) use `_foreach` kernels for
the same reason. This is the update of `AdaShift.update_step`, step for step,
on all variables at once; the test suite pins it to `update_step` at float64.

The window slots are addressed with Python ints (one read of the step counts
per apply), so the oldest gradient is a view and every write one
`_foreach_copy_`. It runs outside `torch.compile` (`jit_compile=True`): the
slot indices are data, which dynamo would split into many graphs.
"""

import torch
from keras import ops
from keras.src.backend.common.stateless_scope import in_stateless_scope


@torch.compiler.disable
@torch.no_grad()
def update(states, grads, variables, learning_rate, config):
    """Applies one AdaShift step to `variables`, whose `VariableState`s are
    `states`; `config` is the optimizer (its hyperparameters and the
    `_momentum_weights` and `_spatial` of `update_step`)."""
    n = config.keep_num
    beta_1, beta_2 = config.beta_1, config.beta_2
    if in_stateless_scope():
        def tensor(variable):
            return variable.value
    else:
        # The torch tensor itself: `.value` resolves stateless and autocast
        # scopes, which do not apply here, at ~7 µs a call, and the step
        # reads 7 variables per model variable.
        def tensor(variable):
            return variable._value
    vs = [tensor(s.velocity) for s in states]
    cs = [tensor(s.bias_correction) for s in states]
    grads = [g if g.dtype == v.dtype else g.to(v.dtype)
             for g, v in zip(grads, vs)]

    counts = [tensor(s.iterations) for s in states]
    torch._foreach_add_(counts, 1)
    steps = torch.stack(counts).tolist()
    newest = [t % (n + 1) for t in steps]
    oldest = [(t + 1) % (n + 1) for t in steps]

    if states[0].window is not None:
        windows = [tensor(s.window) for s in states]
        narrow = any(w.dtype != g.dtype for w, g in zip(windows, grads))
        stored = ([g.to(w.dtype) for g, w in zip(grads, windows)] if narrow
                  else grads)
        torch._foreach_copy_([w[i] for w, i in zip(windows, newest)], stored)
        oldest_grads = [w[i] for w, i in zip(windows, oldest)]
        if narrow:
            stored = [s.to(g.dtype) for s, g in zip(stored, grads)]
            oldest_grads = [w.to(g.dtype)
                            for w, g in zip(oldest_grads, grads)]
    if states[0].square_window is None:
        oldest_squares = torch._foreach_mul(oldest_grads, oldest_grads)
    else:
        squares = [tensor(s.square_window) for s in states]
        torch._foreach_copy_([w[i] for w, i in zip(squares, newest)],
                             _spatial(grads, states, config))
        oldest_squares = [w[i] for w, i in zip(squares, oldest)]

    weight_sum, oldest_weight = config._momentum_weights()
    if beta_1 > 0:
        # `m` holds W·m_t of the gradients as stored, as in `update_step`.
        ms = [tensor(s.momentum) for s in states]
        torch._foreach_add_(ms, oldest_grads, alpha=-oldest_weight)
        torch._foreach_mul_(ms, beta_1)
        torch._foreach_add_(ms, stored)
    else:
        ms = grads
    # v, c and the rate of every block of every variable as one vector:
    # block-sized tensors are small, and one kernel over all of them costs
    # less than a `_foreach` kernel that visits each.
    shapes, sizes = [v.shape for v in vs], [v.numel() for v in vs]
    v, c, square = (torch.cat([x.reshape(-1) for x in xs])
                    for xs in (vs, cs, oldest_squares))
    v = beta_2 * v + (1 - beta_2) * square
    # The hold and c = 1 - β2^k, exactly as in `update_step`.
    moving = torch.ne(v + c, 0)
    c = torch.where(moving, beta_2 * c + (1 - beta_2), 0)
    lr = ops.convert_to_tensor(learning_rate).double() / weight_sum
    rate = torch.where(
        moving,
        lr / (torch.sqrt(v / torch.where(moving, c, 1)) + config.epsilon),
        0)
    torch._foreach_copy_(vs, _unflatten(v, sizes, shapes))
    torch._foreach_copy_(cs, _unflatten(c, sizes, shapes))
    rates = _unflatten(rate, sizes, shapes)
    torch._foreach_sub_([tensor(v) for v in variables],
                        torch._foreach_mul(ms, rates))


def _unflatten(flat, sizes, shapes):
    return [x.view(shape) for x, shape in zip(flat.split(sizes), shapes)]


def _spatial(grads, states, config):
    """φ(g²) per block, shaped like each velocity: whole-variable blocks in
    one fused norm kernel for all variables, others through `_spatial`."""
    if any(s.axes is not None for s in states):
        return [config._spatial(g, s) for g, s in zip(grads, states)]
    # An empty gradient has no norm: its φ is 0 (held), as in `_spatial`.
    nonempty = [g if g.numel() else g.new_zeros(()) for g in grads]
    if config.spatial_op == "max":
        phi = torch._foreach_norm(nonempty, float("inf"))  # max|g|
        return torch._foreach_mul(phi, phi)
    phi = torch._foreach_norm(nonempty, 2)  # sqrt(Σ g²)
    phi = torch._foreach_mul(phi, phi)
    return torch._foreach_div(phi, [max(g.numel(), 1) for g in grads])
