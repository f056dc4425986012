"""AdaShift under Keras's own machinery: compile modes and base arguments.

Every expected trajectory comes from tests/reference.py (float64 NumPy) or
from NumPy written in the test, fed the same gradients as the optimizer.
"""

import numpy as np
import pytest

import keras
from keras import ops

from conftest import BACKEND, only_on
from keras_adashift import AdaShift
from reference import adashift_trajectory

# float32 optimizer against a float64 reference; a wrong step is ~lr (1e-2).
TOL = dict(rtol=1e-5, atol=1e-5)
BASE = dict(learning_rate=0.05, keep_num=3, beta_1=0.5, beta_2=0.9)
SHAPES = {"kernel": (3, 2), "bias": (2,)}


def _gradients(steps, seed=0):
    """Per step, one gradient per variable, at scales spanning 100x.

    AdaShift with φ = max is nearly invariant to a common scale of all
    gradients; varying the scale per step lets clipping and unscaling show.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        scale = 10.0 ** rng.uniform(-1, 1)
        out.append(
            {
                name: (rng.normal(size=shape) * scale).astype("float32")
                for name, shape in SHAPES.items()
            }
        )
    return out


def _initial(seed=1):
    rng = np.random.default_rng(seed)
    return {
        name: rng.normal(size=shape).astype("float32")
        for name, shape in SHAPES.items()
    }


def _variables(initial):
    return {
        name: keras.Variable(value, name=name)
        for name, value in initial.items()
    }


def _run(optimizer, variables, gradients):
    """Applies each step's gradients; the values of the variables after each."""
    names = list(variables)
    out = []
    for step in gradients:
        optimizer.apply(
            [ops.convert_to_tensor(step[n]) for n in names],
            [variables[n] for n in names],
        )
        out.append({n: ops.convert_to_numpy(variables[n]) for n in names})
    return out


def _reference(initial, gradients, **kwargs):
    return {
        name: adashift_trajectory(
            initial[name], [g[name] for g in gradients], **kwargs
        )
        for name in initial
    }


def _assert_trajectory(actual, expected, **tol):
    tol = tol or TOL
    for t, step in enumerate(actual):
        for name, value in step.items():
            np.testing.assert_allclose(
                value,
                expected[name][t],
                err_msg=f"{name} after step {t + 1}",
                **tol,
            )


def _opt_variable(optimizer, suffix):
    matches = [v for v in optimizer.variables if v.path.endswith(suffix)]
    assert len(matches) == 1, [v.path for v in optimizer.variables]
    return matches[0]


# --------------------------------------------------------------------------
# model.fit under each compile mode


def _tiny_model():
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, activation="tanh"),
            keras.layers.Dense(2),
        ]
    )


def _fit_weights(init_weights, mode, **opt_kwargs):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.normal(size=(32, 2)).astype("float32")
    model = _tiny_model()
    model.set_weights(init_weights)
    model.compile(optimizer=AdaShift(**opt_kwargs), loss="mse", **mode)
    model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)
    return model.get_weights()


_FIT_MODES = {
    "tensorflow": [
        {"jit_compile": True},
        {"jit_compile": False},
        {"run_eagerly": True},
    ],
    "jax": [{"jit_compile": True}, {"run_eagerly": True}],
    # torch.compile (jit_compile=True) leaves the AdaShift step out.
    "torch": [
        {"jit_compile": True},
        {"jit_compile": False},
        {"run_eagerly": True},
    ],
}


@pytest.mark.slow
# Accumulation puts the window update inside a conditional, which TF traces
# into a branch function: the XLA write must give the same numbers there.
@pytest.mark.parametrize("accumulate", [None, 2])
def test_fit_gives_the_same_weights_in_every_compile_mode(accumulate):
    init = _tiny_model().get_weights()
    # keep_num 3 and 12 batches: the window wraps several times.
    kwargs = dict(learning_rate=0.05, keep_num=3, beta_1=0.9,
                  gradient_accumulation_steps=accumulate)
    runs = [_fit_weights(init, mode, **kwargs) for mode in _FIT_MODES[BACKEND]]
    for w0, w1 in zip(init, runs[0]):
        assert not np.allclose(w0, w1, atol=1e-3), "fit did not train"
    for mode, run in zip(_FIT_MODES[BACKEND][1:], runs[1:]):
        for w0, w1 in zip(runs[0], run):
            np.testing.assert_allclose(
                w1, w0, rtol=1e-5, atol=1e-6, err_msg=str(mode)
            )


# --------------------------------------------------------------------------
# Base keyword arguments against the reference


def test_plain_apply_matches_reference():
    gradients = _gradients(9)
    initial = _initial()
    actual = _run(AdaShift(**BASE), _variables(initial), gradients)
    _assert_trajectory(actual, _reference(initial, gradients, **BASE))


@pytest.mark.parametrize("exclude", [None, "var_names", "var_list"])
def test_weight_decay_is_decoupled_and_applied_in_warm_up(exclude):
    gradients = _gradients(8)
    initial = _initial()
    variables = _variables(initial)
    optimizer = AdaShift(weight_decay=0.5, **BASE)
    if exclude == "var_names":
        optimizer.exclude_from_weight_decay(var_names=["bias"])
    elif exclude == "var_list":
        optimizer.exclude_from_weight_decay(var_list=[variables["bias"]])
    actual = _run(optimizer, variables, gradients)

    expected = _reference(initial, gradients, weight_decay=0.5, **BASE)
    if exclude is not None:
        expected["bias"] = _reference(initial, gradients, **BASE)["bias"]
    _assert_trajectory(actual, expected)
    # Decay shrinks the kernel during warm-up, before any AdaShift update.
    np.testing.assert_allclose(
        actual[0]["kernel"], initial["kernel"] * (1 - 0.5 * 0.05), **TOL
    )
    bias_after_warm_up = actual[BASE["keep_num"] - 1]["bias"]
    if exclude is None:
        assert not np.allclose(bias_after_warm_up, initial["bias"])
    else:
        np.testing.assert_array_equal(bias_after_warm_up, initial["bias"])


def _clip_norm(g, c):
    return g * c / max(np.linalg.norm(g), c)


@pytest.mark.parametrize("clip", ["clipnorm", "clipvalue", "global_clipnorm"])
def test_gradient_clipping(clip):
    gradients = _gradients(9)
    threshold = 1.0
    clipped = []
    for step in gradients:
        if clip == "clipnorm":
            clipped.append(
                {n: _clip_norm(g, threshold) for n, g in step.items()}
            )
        elif clip == "clipvalue":
            clipped.append(
                {n: np.clip(g, -threshold, threshold) for n, g in step.items()}
            )
        else:
            total = np.sqrt(sum(np.sum(np.square(g)) for g in step.values()))
            factor = threshold / max(total, threshold)
            clipped.append({n: g * factor for n, g in step.items()})
    initial = _initial()
    expected = _reference(initial, clipped, **BASE)
    unclipped = _reference(initial, gradients, **BASE)
    assert not np.allclose(expected["kernel"][-1], unclipped["kernel"][-1])

    optimizer = AdaShift(**{clip: threshold}, **BASE)
    actual = _run(optimizer, _variables(initial), gradients)
    _assert_trajectory(actual, expected)


@pytest.mark.parametrize("overwrite_frequency", [None, 4])
def test_ema_tracks_and_overwrites_like_numpy(overwrite_frequency):
    momentum = 0.7
    steps = 10
    gradients = _gradients(steps)
    initial = _initial()
    # Without weight decay an AdaShift step does not depend on θ, so the
    # reference's steps can be replayed onto a θ that EMA overwrote.
    ref = _reference(initial, gradients, **BASE)
    expected_vars, expected_ema = [], []
    theta = {n: v.astype("float64") for n, v in initial.items()}
    ema = None
    for t in range(steps):
        for n in theta:
            before = ref[n][t - 1] if t else initial[n]
            theta[n] = theta[n] + (ref[n][t] - before)
        if ema is None:  # Keras starts the average at the first step's θ.
            ema = dict(theta)
        else:
            ema = {
                n: momentum * ema[n] + (1 - momentum) * theta[n] for n in theta
            }
        if overwrite_frequency and (t + 1) % overwrite_frequency == 0:
            theta = dict(ema)
        expected_vars.append(dict(theta))
        expected_ema.append(dict(ema))

    optimizer = AdaShift(
        use_ema=True,
        ema_momentum=momentum,
        ema_overwrite_frequency=overwrite_frequency,
        **BASE,
    )
    variables = _variables(initial)
    names = list(variables)
    for t, step in enumerate(gradients):
        optimizer.apply(
            [ops.convert_to_tensor(step[n]) for n in names],
            [variables[n] for n in names],
        )
        for n in names:
            np.testing.assert_allclose(
                ops.convert_to_numpy(variables[n]), expected_vars[t][n], **TOL
            )
            average = _opt_variable(optimizer, f"{n}_average")
            np.testing.assert_allclose(
                ops.convert_to_numpy(average), expected_ema[t][n], **TOL
            )
    if overwrite_frequency:
        # Overwrites at steps 4 and 8 moved θ off the plain trajectory.
        assert not np.allclose(expected_vars[-1]["kernel"], ref["kernel"][-1])
    optimizer.finalize_variable_values([variables[n] for n in names])
    for n in names:
        np.testing.assert_allclose(
            ops.convert_to_numpy(variables[n]), expected_ema[-1][n], **TOL
        )


def test_loss_scale_factor_unscales_gradients_before_the_step():
    factor = 64.0
    # ε comparable to sqrt(v) makes the step depend on the gradient scale,
    # so gradients left scaled would give another trajectory.
    kwargs = dict(BASE, epsilon=0.3)
    gradients = _gradients(8)
    scaled = [{n: g * factor for n, g in s.items()} for s in gradients]
    initial = _initial()
    expected = _reference(initial, gradients, **kwargs)
    wrong = _reference(initial, scaled, **kwargs)
    assert not np.allclose(expected["kernel"][-1], wrong["kernel"][-1])

    optimizer = AdaShift(loss_scale_factor=factor, **kwargs)
    np.testing.assert_allclose(
        ops.convert_to_numpy(optimizer.scale_loss(ops.convert_to_tensor(1.5))),
        1.5 * factor,
    )
    actual = _run(optimizer, _variables(initial), scaled)
    _assert_trajectory(actual, expected)


def _lr_kwargs():
    return {k: v for k, v in BASE.items() if k != "learning_rate"}


def test_learning_rate_schedule_sees_the_zero_based_step():
    schedule = keras.optimizers.schedules.ExponentialDecay(
        0.05, decay_steps=2, decay_rate=0.5
    )

    def lr(i):
        return 0.05 * 0.5 ** (i / 2)

    gradients = _gradients(9)
    initial = _initial()
    expected = _reference(initial, gradients, learning_rate=lr, **_lr_kwargs())
    shifted = _reference(
        initial, gradients, learning_rate=lambda i: lr(i + 1), **_lr_kwargs()
    )
    assert not np.allclose(expected["kernel"][-1], shifted["kernel"][-1])

    optimizer = AdaShift(learning_rate=schedule, **_lr_kwargs())
    actual = _run(optimizer, _variables(initial), gradients)
    _assert_trajectory(actual, expected)


def test_callable_learning_rate():
    optimizer = None

    def learning_rate():
        step = ops.cast(optimizer.iterations, "float32")
        return 0.05 / (1.0 + step)

    optimizer = AdaShift(learning_rate=learning_rate, **_lr_kwargs())
    gradients = _gradients(9)
    initial = _initial()
    expected = _reference(
        initial,
        gradients,
        learning_rate=lambda i: 0.05 / (1.0 + i),
        **_lr_kwargs(),
    )
    actual = _run(optimizer, _variables(initial), gradients)
    _assert_trajectory(actual, expected)


@pytest.mark.parametrize("variant", ["constant", "schedule_and_decay"])
def test_gradient_accumulation_window_counts_applied_updates(variant):
    k = 3
    keep_num = BASE["keep_num"]
    groups = 7
    micro = _gradients(k * groups, seed=5)
    means = [
        {
            n: np.mean([micro[j * k + i][n] for i in range(k)], axis=0)
            for n in SHAPES
        }
        for j in range(groups)
    ]
    initial = _initial()
    kwargs = dict(BASE)
    ref_kwargs = dict(BASE)
    if variant == "schedule_and_decay":

        def lr(i):
            return 0.05 * 0.7 ** (i / 4)

        kwargs["learning_rate"] = keras.optimizers.schedules.ExponentialDecay(
            0.05, decay_steps=4, decay_rate=0.7
        )
        kwargs["weight_decay"] = ref_kwargs["weight_decay"] = 0.5
        # Schedules see the micro-batch count: update j runs at micro-batch
        # k(j+1) - 1 (0-based); decay happens only on updates.
        ref_kwargs["learning_rate"] = lambda j: lr(k * (j + 1) - 1)
        by_update = _reference(
            initial, means, **dict(ref_kwargs, learning_rate=lr)
        )
    expected = _reference(initial, means, **ref_kwargs)
    if variant == "schedule_and_decay":
        assert not np.allclose(expected["kernel"][-1], by_update["kernel"][-1])

    optimizer = AdaShift(gradient_accumulation_steps=k, **kwargs)
    actual = _run(optimizer, _variables(initial), micro)
    assert int(ops.convert_to_numpy(optimizer.iterations)) == groups

    for i, step in enumerate(actual, start=1):
        group = i // k  # updates applied after micro-batch i
        for n, value in step.items():
            np.testing.assert_allclose(
                value,
                expected[n][group - 1] if group else initial[n],
                err_msg=f"{n} after micro-batch {i}",
                **TOL,
            )
    if variant == "constant":
        # The window fills with keep_num updates, i.e. keep_num·k
        # micro-batches; the first change ends the next group.
        first_change = k * (keep_num + 1)
        for step in actual[: first_change - 1]:
            for n, value in step.items():
                np.testing.assert_array_equal(value, initial[n])
        assert not np.allclose(
            actual[first_change - 1]["kernel"], initial["kernel"]
        )


def test_name():
    assert AdaShift().name == "adashift"
    optimizer = AdaShift(name="shifty", **BASE)
    assert optimizer.name == "shifty"
    optimizer.build(list(_variables(_initial()).values()))
    assert optimizer.variables
    assert all(v.path.startswith("shifty/") for v in optimizer.variables)
    assert optimizer.get_config()["name"] == "shifty"


# --------------------------------------------------------------------------
# LossScaleOptimizer


def _numpy_state(optimizer):
    return [ops.convert_to_numpy(v).copy() for v in optimizer.variables]


# Keras's stateful LossScaleOptimizer.apply leaks a tracer out of
# jax.lax.cond on JAX (Keras itself, with any optimizer); JAX goes through
# stateless_apply, which the fit test below covers.
@only_on("tensorflow", "torch")
def test_loss_scale_optimizer_skips_an_overflowed_step():
    inner = AdaShift(**BASE)
    lso = keras.optimizers.LossScaleOptimizer(inner, initial_scale=2.0**10)
    plain = AdaShift(**BASE)
    initial = _initial()
    variables = _variables(initial)
    plain_variables = _variables(initial)
    names = list(variables)
    lso.build([variables[n] for n in names])

    gradients = _gradients(9)
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
    expected = _reference(initial, gradients, **BASE)
    for n in names:
        np.testing.assert_array_equal(
            ops.convert_to_numpy(variables[n]),
            ops.convert_to_numpy(plain_variables[n]),
        )
        np.testing.assert_allclose(
            ops.convert_to_numpy(variables[n]), expected[n][-1], **TOL
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
    init = _tiny_model().get_weights()

    def fit(x, y):
        model = _tiny_model()
        model.set_weights(init)
        inner = AdaShift(**BASE)
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
