"""AdaShift's step on the PyTorch backend, in torch's multi-tensor kernels.

Keras runs the torch backend eagerly, so each `keras.ops` call costs tens of
microseconds of Python: called per variable, as in `AdaShift._update`, about
1 ms per variable, ten times Keras's own torch Adam on a small CNN. Keras's
torch optimizers (`keras/src/backend/torch/optimizers/`) use `_foreach`
kernels for the same reason. This is `AdaShift._update` on all variables at
once, from the same records (`VariableState`, `BlockState`, `StepPlan`) and
the same `second_moment`; the test suite pins it to `_update` at float64.

The window slots are addressed with Python ints (one read of the step counts
per apply), so the oldest gradient is a view and every write one
`_foreach_copy_`. It runs outside `torch.compile` (`jit_compile=True`): the
slot indices are data, which dynamo would split into many graphs.
"""

import torch
from keras.src.backend.common.stateless_scope import in_stateless_scope

from keras_adashift import gradient_window
from keras_adashift.algorithm import second_moment


@torch.compiler.disable
@torch.no_grad()
def update(states, blocks, step_counts, grads, variables, plan, spatial_op):
    """One AdaShift step of `variables`, whose `VariableState`s are `states`;
    `blocks` is the `BlockState` (None for φ = none), `step_counts` the
    per-variable step counts, and `plan` a `StepPlan` of Python floats with
    a float64 learning rate."""
    if in_stateless_scope():
        def tensor(variable):
            return variable.value
    else:
        # The torch tensor itself: `.value` resolves stateless and autocast
        # scopes, which do not apply here, at ~7 µs a call.
        def tensor(variable):
            return variable._value

    counts = tensor(step_counts)
    positions = torch.tensor([s.position for s in states],
                             device=counts.device)
    counts.index_add_(0, positions, torch.ones_like(positions,
                                                    dtype=counts.dtype))
    windows = [tensor(s.window) for s in states if s.window is not None]
    dtypes = [_state_dtype(tensor(v).dtype) for v in variables]
    grads = [g if g.dtype == d else g.to(d) for g, d in zip(grads, dtypes)]
    if windows:
        length = windows[0].shape[0]
        steps = counts[positions].tolist()
        narrow = any(w.dtype != g.dtype for w, g in zip(windows, grads))
        stored = ([g.to(w.dtype) for g, w in zip(grads, windows)] if narrow
                  else grads)
        torch._foreach_copy_(
            [w[t % length] for w, t in zip(windows, steps)], stored)
        oldest_grads = [w[(t + 1) % length] for w, t in zip(windows, steps)]
        if narrow:
            stored = [s.to(g.dtype) for s, g in zip(stored, grads)]
            oldest_grads = [w.to(g.dtype)
                            for w, g in zip(oldest_grads, grads)]

    if blocks is None:
        # φ = none: v per element, all variables' in one vector.
        vs = [tensor(s.velocity) for s in states]
        cs = [tensor(s.bias_correction) for s in states]
        shapes, sizes = [v.shape for v in vs], [v.numel() for v in vs]
        v, c, rate = second_moment(
            *(torch.cat([x.reshape(-1) for x in xs])
              for xs in (vs, cs, torch._foreach_mul(oldest_grads,
                                                    oldest_grads))),
            plan)
        torch._foreach_copy_(vs, _split(v, sizes, shapes))
        torch._foreach_copy_(cs, _split(c, sizes, shapes))
        rates = _split(rate, sizes, shapes)
    else:
        rates = _update_blocks(blocks, tensor, grads, states, plan,
                               spatial_op)
        rates = [r if r.dtype == g.dtype else r.to(g.dtype)
                 for r, g in zip(rates, grads)]

    if states[0].momentum is None:
        ms = grads
    else:
        # `m` holds W·m_t of the gradients as stored, as in `_update`.
        ms = [tensor(s.momentum) for s in states]
        torch._foreach_add_(ms, oldest_grads, alpha=-plan.oldest_weight)
        torch._foreach_mul_(ms, plan.beta_1)
        torch._foreach_add_(ms, stored)
    steps = torch._foreach_mul(ms, rates)
    if plan.step_limit is not None:
        # A limit past a dtype's range clips nothing (as an inf limit does
        # elsewhere); torch refuses a scalar its tensor cannot hold.
        limit = float(plan.step_limit)
        limits = [min(limit, torch.finfo(s.dtype).max) for s in steps]
        torch._foreach_clamp_min_(steps, [-x for x in limits])
        torch._foreach_clamp_max_(steps, limits)
    torch._foreach_sub_([tensor(v) for v in variables], steps)


def _update_blocks(blocks, tensor, grads, states, plan, spatial_op):
    """`AdaShift._update_blocks`: φ into the window of φ, v and c of all
    blocks; returns each variable's rate, shaped like its blocks."""
    window, velocity, correction = (
        tensor(x) for x in (blocks.square_window, blocks.velocity,
                            blocks.bias_correction))
    # φ in the blocks' dtype (float64 if any variable is), as `_update`.
    phis = [p.reshape(-1) for p in _spatial(
        [g if g.dtype == velocity.dtype else g.to(velocity.dtype)
         for g in grads], states, spatial_op)]
    starts = [s.blocks[0] for s in states]
    # Every variable, in the order of the blocks: model.fit's case.
    every = (starts == sorted(starts) and sum(p.numel() for p in phis)
             == velocity.numel())
    if every:
        phi = torch.cat(phis)
    else:
        phi = velocity.new_zeros(velocity.shape)
        mask = torch.zeros(velocity.shape, dtype=torch.bool,
                           device=velocity.device)
        for state, value in zip(states, phis):
            start, stop, _ = state.blocks
            phi[start:stop] = value
            mask[start:stop] = True
    v, c, rate = second_moment(velocity, correction, window[0], plan)
    shifted = torch.cat([window[1:], phi[None]])
    if every:
        window.copy_(shifted)
        velocity.copy_(v)
        correction.copy_(c)
    else:
        window.copy_(torch.where(mask, shifted, window))
        velocity.copy_(torch.where(mask, v, velocity))
        correction.copy_(torch.where(mask, c, correction))
    return [rate[s.blocks[0]:s.blocks[1]].view(s.blocks[2]) for s in states]


def _spatial(grads, states, spatial_op):
    """φ(g²) of each variable: whole-variable blocks in one fused norm
    kernel for all variables, others through `gradient_window.spatial`."""
    if any(s.axes is not None for s in states):
        return [gradient_window.spatial(g, s.axes, s.blocks[2], spatial_op)
                for g, s in zip(grads, states)]
    # An empty gradient has no norm: its φ is 0 (held), as in `spatial`.
    nonempty = [g if g.numel() else g.new_zeros(()) for g in grads]
    if spatial_op == "max":
        phi = torch._foreach_norm(nonempty, float("inf"))  # max|g|
        return torch._foreach_mul(phi, phi)
    phi = torch._foreach_norm(nonempty, 2)  # sqrt(Σ g²)
    phi = torch._foreach_mul(phi, phi)
    return torch._foreach_div(phi, [max(g.numel(), 1) for g in grads])


def _state_dtype(dtype):
    """`algorithm.state_dtype` for torch dtypes (16-bit: float32)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _split(flat, sizes, shapes):
    return [x.view(shape) for x, shape in zip(flat.split(sizes), shapes)]
