"""THE TASK SUITE'S PROTOTYPE of an opt-in safeguard, not part of the
optimizer: AdaShift with each element's step bounded by Adam's bound.

Adam's `v_t` contains `(1 - β2) g_t²`, so its step `lr·m̂/sqrt(v̂)` can
never exceed about `lr / sqrt(1 - β2)`. AdaShift's `v_t` leaves the current
gradient out, and so has no such bound: an element whose past gradients
were tiny (an embedding row not seen for a while, under φ = none) takes a
huge step when a large gradient arrives. The prototype clips each
element's change to `step_bound · lr / sqrt(1 - β2)` after AdaShift's own
update; the optimizer's state (window, m, v) is AdaShift's, untouched.
It wraps `apply` rather than copying the update, so it measures the idea
without a second copy of the algorithm; the lead decides whether it
belongs in `AdaShift` itself.
"""

import math

from keras import ops

from keras_adashift import AdaShift


class StepBoundAdaShift(AdaShift):
    """AdaShift whose per-element step is at most
    `step_bound · learning_rate / sqrt(1 - beta_2)` (a prototype)."""

    def __init__(self, *args, step_bound=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_bound = step_bound

    def apply(self, grads, trainable_variables=None):
        variables = (list(trainable_variables)
                     if trainable_variables is not None
                     else self._trainable_variables)
        # Copies: on TF a variable's `.value` is read where it is used.
        before = [ops.copy(v.value) for v in variables]
        result = super().apply(grads, trainable_variables)
        bound = (self.step_bound * self._get_current_learning_rate()
                 / math.sqrt(1 - self.beta_2))
        for variable, old in zip(variables, before):
            bound_ = ops.cast(bound, old.dtype)
            step = ops.clip(variable.value - old, -bound_, bound_)
            variable.assign(old + step)
        return result

    def get_config(self):
        return {**super().get_config(), "step_bound": self.step_bound}
