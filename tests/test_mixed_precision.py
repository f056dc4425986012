"""AdaShift under Keras mixed precision policies."""

import keras
import numpy as np
import pytest
from keras import ops

from conftest import only_on
from keras_adashift import AdaShift


@pytest.fixture
def policy():
    previous = keras.config.dtype_policy()

    def set_policy(name):
        keras.config.set_dtype_policy(name)

    yield set_policy
    keras.config.set_dtype_policy(previous)


def small_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(1),
        ]
    )


def optimizer_state(inner):
    return [ops.convert_to_numpy(v).copy() for v in inner.variables]


# On JAX, LossScaleOptimizer.apply outside a jitted trainer step leaks a
# tracer from its lax.cond; the JAX trainer uses stateless_apply instead.
@only_on("tensorflow", "torch")
def test_mixed_float16_skips_overflowed_step(policy):
    policy("mixed_float16")
    shapes = [(3, 2), (2,)]
    rng = np.random.default_rng(0)
    steps = [
        [rng.normal(size=s).astype("float32") for s in shapes]
        for _ in range(6)
    ]
    bad = [np.full(shapes[0], np.inf, "float32"),
           np.zeros(shapes[1], "float32")]

    def train(gradients, check_skip_at=None):
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(optimizer=AdaShift(learning_rate=0.1, keep_num=2),
                      loss="mse")
        opt = model.optimizer
        assert isinstance(opt, keras.optimizers.LossScaleOptimizer)
        assert isinstance(opt.inner_optimizer, AdaShift)
        variables = model.trainable_variables
        for v, init in zip(variables, [np.ones(shapes[0]), np.zeros(2)]):
            v.assign(init.astype("float32"))
        opt.build(variables)
        for i, grads in enumerate(gradients):
            before = optimizer_state(opt.inner_optimizer)
            scale = float(ops.convert_to_numpy(opt.dynamic_scale))
            # The loss scale optimizer expects gradients of the scaled loss.
            opt.apply([ops.convert_to_tensor(g * scale) for g in grads],
                      variables)
            if i == check_skip_at:
                after = optimizer_state(opt.inner_optimizer)
                for b, a in zip(before, after):
                    np.testing.assert_array_equal(a, b)
                assert float(ops.convert_to_numpy(opt.dynamic_scale)) == (
                    scale / 2
                )
        return [ops.convert_to_numpy(v) for v in variables], opt

    # The inf arrives once the window is full and updates have started.
    with_bad, opt = train(steps[:3] + [bad] + steps[3:], check_skip_at=3)
    clean, _ = train(steps)
    assert int(ops.convert_to_numpy(opt.inner_optimizer.iterations)) == 6
    assert not np.allclose(clean[0], 1.0)
    for a, b in zip(with_bad, clean):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def fit_losses(policy, name):
    policy(name)
    model = small_model()
    model.compile(
        optimizer=AdaShift(learning_rate=0.01, keep_num=2), loss="mse"
    )
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x @ rng.normal(size=(4, 1))).astype("float32")
    history = model.fit(x, y, batch_size=16, epochs=5, shuffle=False,
                        verbose=0)
    weights = [ops.convert_to_numpy(w) for w in model.get_weights()]
    return history.history["loss"], weights, model


def test_mixed_bfloat16_trains_like_float32(policy):
    losses, weights, model = fit_losses(policy, "mixed_bfloat16")
    assert model.layers[0].compute_dtype == "bfloat16"
    assert model.layers[0].kernel.dtype == "float32"
    reference_losses, reference_weights, _ = fit_losses(policy, "float32")
    assert losses[-1] < 0.8 * losses[0]
    np.testing.assert_allclose(losses, reference_losses, rtol=0.05)
    for w, r in zip(weights, reference_weights):
        np.testing.assert_allclose(w, r, atol=2e-2)
