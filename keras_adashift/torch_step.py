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
    windows = [optimizer._windows[i] for i in index]
    shifted = [optimizer._shifted_gradients[i].value for i in index]
    ms = [optimizer._momentums[i].value for i in index]
    vs = [optimizer._velocities[i].value for i in index]
    grads = [g.to(m.dtype) for g, m in zip(grads, ms)]
    oldest = [s.to(m.dtype) for s, m in zip(shifted, ms)]  # g_{t-n}

    weight_sum = sum(beta_1**i for i in range(n))
    torch._foreach_add_(ms, oldest, alpha=-(beta_1 ** (n - 1)) / weight_sum)
    torch._foreach_mul_(ms, beta_1)
    torch._foreach_add_(ms, grads, alpha=1 / weight_sum)
    squares = torch._foreach_mul(oldest, oldest)
    torch._foreach_mul_(vs, beta_2)
    torch._foreach_add_(
        vs,
        [optimizer._spatial(s, i) for s, i in zip(squares, index)],
        alpha=1 - beta_2,
    )

    # A tensor, not a variable, under gradient accumulation.
    step = ops.convert_to_tensor(optimizer.iterations).long() + 1
    for window, gradient, slot in zip(windows, grads, shifted):
        gradient_window.write(optimizer, window, (step - 1) % n, gradient)
        slot.copy_(gradient_window.read(window, step % n))

    # As in `update_step`: the step is held until the window is full, masked
    # on the scalar rate and the block-sized denominator.
    age = step - n
    active = age > 0
    bias_correction = 1 - torch.pow(beta_2, age.clamp(min=1).double())
    lr = torch.where(active, learning_rate, 0).double()
    for variable, m, v in zip(variables, ms, vs):
        denominator = torch.where(
            active,
            (v / bias_correction.to(v.dtype)).sqrt_() + optimizer.epsilon,
            1,
        )
        update = m * (lr.to(m.dtype) / denominator)
        variable = variable.value
        variable.sub_(update.to(variable.dtype))
