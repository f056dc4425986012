"""Loss scaling: LossScaleOptimizer skips a non-finite step without a trace
(by hand, jitted, in fit, under mixed_float16); loss_scale_factor unscales.
"""

import keras
import numpy as np
import pytest
from keras import ops

import kernel_bias as kb
from conftest import BACKEND
from conftest import FLOAT
from conftest import only_on
from keras_adashift import AdaShift
from models import tiny_model
from reference import adashift_trajectory
from trajectories import LR
from trajectories import RTOL
from trajectories import assert_trajectory_close
from trajectories import round_to


@pytest.mark.usefixtures("floatx_like_the_variables")
def test_skipped_step_equals_a_run_without_that_gradient():
    """A skipped step touches neither the window nor the moments: the run
    equals the reference fed the finite gradients only."""
    rng = np.random.default_rng(8)
    grads = round_to(rng.normal(size=(10, 4, 3)), FLOAT)
    bad_step = 5
    theta0 = round_to(rng.normal(size=(4, 3)), FLOAT)
    variable = keras.Variable(theta0, dtype=FLOAT)
    opt = keras.optimizers.LossScaleOptimizer(
        AdaShift(learning_rate=LR, keep_num=2, beta_1=0.5, beta_2=0.9),
        initial_scale=4.0)
    opt.build([variable])
    # The scale halves on the skipped step and would only grow after
    # dynamic_growth_steps (2000) finite ones. Powers of two: scaling and
    # unscaling are exact.
    scaled = [np.full_like(g, np.inf) if t == bad_step
              else g * (4.0 if t < bad_step else 2.0)
              for t, g in enumerate(grads, start=1)]
    history = []
    if BACKEND == "jax":
        # LossScaleOptimizer's stateful apply leaks tracers on JAX for any
        # inner optimizer (it runs stateful branches under lax.cond); Keras's
        # JAX trainer uses stateless_apply, so that is the path tested.
        import jax

        step = jax.jit(opt.stateless_apply)
        state = [v.value for v in opt.variables]
        train = [variable.value]
        for g in scaled:
            train, state = step(state, [ops.convert_to_tensor(g, FLOAT)],
                                train)
            history.append(np.asarray(train[0]))
    else:
        for g in scaled:
            opt.apply_gradients([(ops.convert_to_tensor(g, FLOAT),
                                  variable)])
            history.append(np.asarray(ops.convert_to_numpy(variable)))
    history = np.stack(history)
    np.testing.assert_array_equal(history[bad_step - 1],
                                  history[bad_step - 2])
    kept = np.delete(grads, bad_step - 1, axis=0)
    expected = np.stack(adashift_trajectory(
        theta0, list(kept), learning_rate=LR, keep_num=2, beta_1=0.5,
        beta_2=0.9))
    assert_trajectory_close(np.delete(history, bad_step - 1, axis=0),
                            expected, theta0, RTOL[FLOAT],
                            "LossScaleOptimizer(AdaShift) vs reference")


def _numpy_state(optimizer):
    return [ops.convert_to_numpy(v).copy() for v in optimizer.variables]


# Keras's stateful LossScaleOptimizer.apply leaks a tracer out of
# jax.lax.cond on JAX (Keras itself, with any optimizer); JAX goes through
# stateless_apply, which the tests above and below cover.
@only_on("tensorflow", "torch")
def test_loss_scale_optimizer_skips_an_overflowed_step():
    inner = AdaShift(**kb.BASE)
    lso = keras.optimizers.LossScaleOptimizer(inner, initial_scale=2.0**10)
    plain = AdaShift(**kb.BASE)
    initial = kb.initial()
    variables = kb.variables(initial)
    plain_variables = kb.variables(initial)
    names = list(variables)
    lso.build([variables[n] for n in names])

    gradients = kb.gradients(9)
    bad_step = 5  # the window is full and has wrapped once
    for t, step in enumerate(gradients):
        if t == bad_step:
            bad = {n: g.copy() for n, g in step.items()}
            bad["kernel"][1, 0] = np.inf  # the bias gradient stays finite
            inner_before = _numpy_state(inner)
            vars_before = {n: ops.convert_to_numpy(variables[n]) for n in names}
            scale_before = float(ops.convert_to_numpy(lso.dynamic_scale))
            lso.apply(
                [ops.convert_to_tensor(bad[n] * scale_before) for n in names],
                [variables[n] for n in names],
            )
            for v, before in zip(inner.variables, inner_before):
                np.testing.assert_array_equal(
                    ops.convert_to_numpy(v), before, err_msg=v.path
                )
            for n in names:
                np.testing.assert_array_equal(
                    ops.convert_to_numpy(variables[n]), vars_before[n]
                )
            assert float(ops.convert_to_numpy(lso.dynamic_scale)) == (
                scale_before / 2
            )
        scale = float(ops.convert_to_numpy(lso.dynamic_scale))
        lso.apply(
            [ops.convert_to_tensor(step[n] * scale) for n in names],
            [variables[n] for n in names],
        )
        plain.apply(
            [ops.convert_to_tensor(step[n]) for n in names],
            [plain_variables[n] for n in names],
        )

    assert int(ops.convert_to_numpy(inner.iterations)) == len(gradients)
    # Powers of two scale exactly: the skipped step leaves no trace at all.
    for v, w in zip(inner.variables, plain.variables):
        np.testing.assert_array_equal(
            ops.convert_to_numpy(v), ops.convert_to_numpy(w), err_msg=v.path
        )
    expected = kb.reference(initial, gradients, **kb.BASE)
    for n in names:
        np.testing.assert_array_equal(
            ops.convert_to_numpy(variables[n]),
            ops.convert_to_numpy(plain_variables[n]),
        )
        np.testing.assert_allclose(
            ops.convert_to_numpy(variables[n]), expected[n][-1], **kb.TOL
        )


@pytest.mark.slow
def test_loss_scale_optimizer_fit_skips_a_batch_with_inf_loss():
    rng = np.random.default_rng(3)
    batch = 4
    x = rng.normal(size=(6 * batch, 4)).astype("float32")
    y = rng.normal(size=(6 * batch, 2)).astype("float32")
    bad = slice(3 * batch, 4 * batch)  # the 4th batch: window wrapped once
    x_bad = x.copy()
    x_bad[bad.start, 0] = np.inf
    keep = np.ones(len(x), bool)
    keep[bad] = False
    init = tiny_model().get_weights()

    def fit(x, y):
        model = tiny_model()
        model.set_weights(init)
        inner = AdaShift(**kb.BASE)
        model.compile(
            optimizer=keras.optimizers.LossScaleOptimizer(inner), loss="mse"
        )
        model.fit(x, y, batch_size=batch, shuffle=False, verbose=0)
        return model, inner

    skipped, skipped_inner = fit(x_bad, y)
    clean, clean_inner = fit(x[keep], y[keep])
    assert int(ops.convert_to_numpy(skipped_inner.iterations)) == 5
    for w0, w1 in zip(init, clean.get_weights()):
        assert not np.allclose(w0, w1)
    for w0, w1 in zip(clean.get_weights(), skipped.get_weights()):
        np.testing.assert_array_equal(w1, w0)
    for v, w in zip(skipped_inner.variables, clean_inner.variables):
        np.testing.assert_array_equal(
            ops.convert_to_numpy(v), ops.convert_to_numpy(w), err_msg=v.path
        )


# On JAX, LossScaleOptimizer.apply outside a jitted trainer step leaks a
# tracer from its lax.cond; the JAX trainer uses stateless_apply instead.
@only_on("tensorflow", "torch")
def test_mixed_float16_skips_overflowed_step(dtype_policy):
    dtype_policy("mixed_float16")
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
            before = _numpy_state(opt.inner_optimizer)
            scale = float(ops.convert_to_numpy(opt.dynamic_scale))
            # The loss scale optimizer expects gradients of the scaled loss.
            opt.apply([ops.convert_to_tensor(g * scale) for g in grads],
                      variables)
            if i == check_skip_at:
                after = _numpy_state(opt.inner_optimizer)
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


def test_loss_scale_factor_unscales_gradients_before_the_step():
    factor = 64.0
    # ε comparable to sqrt(v) makes the step depend on the gradient scale,
    # so gradients left scaled would give another trajectory.
    kwargs = dict(kb.BASE, epsilon=0.3)
    gradients = kb.gradients(8)
    scaled = [{n: g * factor for n, g in s.items()} for s in gradients]
    initial = kb.initial()
    expected = kb.reference(initial, gradients, **kwargs)
    wrong = kb.reference(initial, scaled, **kwargs)
    assert not np.allclose(expected["kernel"][-1], wrong["kernel"][-1])

    optimizer = AdaShift(loss_scale_factor=factor, **kwargs)
    np.testing.assert_allclose(
        ops.convert_to_numpy(optimizer.scale_loss(ops.convert_to_tensor(1.5))),
        1.5 * factor,
    )
    actual = kb.run(optimizer, kb.variables(initial), scaled)
    kb.assert_trajectory(actual, expected)
