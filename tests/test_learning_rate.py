"""Learning rates: schedules (called with the 0-based step) and callables,
each used as the rate of the step it is called for.

Schedules under gradient accumulation (they see the micro-batch count):
tests/test_base_arguments.py. Schedules in get_config:
tests/test_serialization.py.
"""

import keras
import numpy as np
import pytest
from keras import ops

import kernel_bias as kb
from keras_adashift import AdaShift


@pytest.mark.parametrize("lr, expected_rate", [
    # Step 2 is the first update: schedule(1) = 0.5 * 0.5.
    (keras.optimizers.schedules.ExponentialDecay(
        0.5, decay_steps=1, decay_rate=0.5), 0.25),
    (lambda: 0.125, 0.125),
], ids=["schedule", "callable"])
def test_the_rate_of_the_first_update(lr, expected_rate):
    """With keep_num 1, beta_1 0, element-wise v and epsilon 0, the second
    step moves θ by -lr * g_2 / |g_1|."""
    variable = keras.Variable(np.array([1.0, 1.0]), dtype="float32")
    opt = AdaShift(learning_rate=lr, keep_num=1, beta_1=0.0,
                   spatial_op="none", epsilon=0.0)
    opt.apply_gradients([(keras.ops.array([2.0, 4.0]), variable)])
    opt.apply_gradients([(keras.ops.array([1.0, -2.0]), variable)])
    expected = np.array([1.0, 1.0]) - expected_rate * np.array(
        [1.0 / 2.0, -2.0 / 4.0])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(variable),
                               expected, rtol=1e-6)


def _lr_kwargs():
    return {k: v for k, v in kb.BASE.items() if k != "learning_rate"}


def test_learning_rate_schedule_sees_the_zero_based_step():
    schedule = keras.optimizers.schedules.ExponentialDecay(
        0.05, decay_steps=2, decay_rate=0.5
    )

    def lr(i):
        return 0.05 * 0.5 ** (i / 2)

    gradients = kb.gradients(9)
    initial = kb.initial()
    expected = kb.reference(initial, gradients, learning_rate=lr,
                            **_lr_kwargs())
    shifted = kb.reference(
        initial, gradients, learning_rate=lambda i: lr(i + 1), **_lr_kwargs()
    )
    assert not np.allclose(expected["kernel"][-1], shifted["kernel"][-1])

    optimizer = AdaShift(learning_rate=schedule, **_lr_kwargs())
    actual = kb.run(optimizer, kb.variables(initial), gradients)
    kb.assert_trajectory(actual, expected)


def test_callable_learning_rate():
    optimizer = None

    def learning_rate():
        step = ops.cast(optimizer.iterations, "float32")
        return 0.05 / (1.0 + step)

    optimizer = AdaShift(learning_rate=learning_rate, **_lr_kwargs())
    gradients = kb.gradients(9)
    initial = kb.initial()
    expected = kb.reference(
        initial,
        gradients,
        learning_rate=lambda i: 0.05 / (1.0 + i),
        **_lr_kwargs(),
    )
    actual = kb.run(optimizer, kb.variables(initial), gradients)
    kb.assert_trajectory(actual, expected)
