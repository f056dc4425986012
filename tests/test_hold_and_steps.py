"""The hold per block (warm-up, zero first gradients) and the steps counted
per variable (variables without a gradient, the bias correction).

A block of `v` (an element for spatial_op "none") holds its parameters until
its `v` is non-zero, and its bias correction counts from then; a variable's
window, hold and bias correction advance only on the steps that give it a
gradient. Expected trajectories come from tests/reference.py, which follows
the authors' released code literally (a flag and a power of β2 per block,
no step counter), fed the same gradients. Every case here made the previous
design (one global step counter, warm-up = the first keep_num steps) take
steps of about lr·m/ε.
"""

import keras
import numpy as np
import pytest
from keras import ops

from conftest import FLOAT
from conftest import only_on
from keras_adashift import AdaShift
from models import tiny_model
from reference import adashift_trajectory
from trajectories import LR as EXACT_LR
from trajectories import round_to

# float32 variables against the float64 reference; a wrong step is >= lr.
TOL = dict(rtol=2e-5, atol=2e-5)
LR = 0.05


def _run(optimizer, thetas, gradients, compiled=False):
    """Applies per step the non-None gradients to their variables; the
    values of every variable after each step."""
    variables = [keras.Variable(t.astype("float32"), name=f"v{i}")
                 for i, t in enumerate(thetas)]
    optimizer.build(variables)

    steps = {}  # one function per set of variables with a gradient

    def step_for(present):
        if present not in steps:
            chosen = [v for v, p in zip(variables, present) if p]

            def apply(grads):
                optimizer.apply(grads, chosen)

            if compiled:
                import tensorflow as tf

                apply = tf.function(apply)
            steps[present] = apply
        return steps[present]

    out = []
    for step in gradients:
        present = tuple(g is not None for g in step)
        step_for(present)([ops.convert_to_tensor(g, "float32")
                           for g in step if g is not None])
        out.append([ops.convert_to_numpy(v).astype("float64")
                    for v in variables])
    return out


def _assert_matches_reference(actual, thetas, gradients, spatial_axes=None,
                              **kwargs):
    for i, theta in enumerate(thetas):
        # The reference takes the axes resolved for the variable's rank.
        axes = None if spatial_axes is None else (spatial_axes,)
        expected = adashift_trajectory(
            theta, [step[i] for step in gradients], learning_rate=LR,
            axes=axes, **kwargs)
        for t, step in enumerate(actual):
            np.testing.assert_allclose(
                step[i], expected[t], err_msg=f"variable {i}, step {t + 1}",
                **TOL)


def _normal(rng, shape, steps):
    return list(rng.normal(size=(steps,) + shape).astype("float32"))


# (keep_num, beta_1, spatial_op, spatial_axes, epsilon). Gradients near 1e-3
# make an epsilon of 1e-3 matter: inside the square root it fails.
WARM_UP = {
    "keep1-max": (1, 0.0, "max", None, 1e-10),
    "keep3-mean-axes0-eps1e-3": (3, 0.9, "mean", 0, 1e-3),
    "keep5-none": (5, 0.5, "none", None, 1e-10),
}


@pytest.mark.usefixtures("floatx_like_the_variables")
@pytest.mark.parametrize("warm_up", WARM_UP.values(), ids=list(WARM_UP))
def test_warm_up_then_first_update(warm_up):
    """The window fills for keep_num steps without a move; step n+1 is
    θ0 - lr·m/(sqrt(φ(g_1²)) + ε), written out here by hand."""
    keep_num, beta_1, spatial_op, spatial_axes, epsilon = warm_up
    # Against |θ|: in float32, θ0 - update rounds at ~6e-8 * |θ|.
    tol = 1e-13 if FLOAT == "float64" else 1e-6
    label = (f"keep_num={keep_num} beta_1={beta_1} spatial_op="
             f"{spatial_op!r} spatial_axes={spatial_axes} "
             f"epsilon={epsilon}")
    rng = np.random.default_rng(keep_num)
    theta0 = round_to(rng.normal(size=(4, 3)), FLOAT)
    grads = round_to(rng.normal(size=(keep_num + 1, 4, 3)) * 1e-3, FLOAT)
    variable = keras.Variable(theta0, dtype=FLOAT)
    opt = AdaShift(learning_rate=EXACT_LR, keep_num=keep_num, beta_1=beta_1,
                   epsilon=epsilon, spatial_op=spatial_op,
                   spatial_axes=spatial_axes)
    initial = ops.convert_to_numpy(variable).copy()
    for t in range(keep_num):
        opt.apply_gradients([(ops.convert_to_tensor(grads[t], FLOAT),
                              variable)])
        assert np.array_equal(ops.convert_to_numpy(variable), initial), (
            f"[{label}] parameters moved during warm-up step {t + 1}")
    opt.apply_gradients([(ops.convert_to_tensor(grads[keep_num], FLOAT),
                          variable)])
    theta1 = np.asarray(ops.convert_to_numpy(variable), np.float64)
    assert np.all(theta1 != initial), (
        f"[{label}] step {keep_num + 1} left parameters unchanged")

    weights = beta_1 ** np.arange(keep_num)  # g_{n+1}, g_n, ..., g_2
    m = sum(w * grads[keep_num - i] for i, w in enumerate(weights))
    m = m / weights.sum()
    g1_squared = grads[0] ** 2
    if spatial_op == "max":
        phi = np.max(g1_squared, axis=spatial_axes, keepdims=True)
    elif spatial_op == "mean":
        phi = np.mean(g1_squared, axis=spatial_axes, keepdims=True)
    else:
        phi = g1_squared
    # At step n+1, v̂ = (1-β2) φ(g_1²) / (1-β2) = φ(g_1²).
    expected = theta0 - EXACT_LR * m / (np.sqrt(phi) + epsilon)
    np.testing.assert_allclose(theta1, expected, rtol=0,
                               atol=tol * np.abs(theta0).max(),
                               err_msg=f"[{label}] first update")


ZERO_FIRST = {
    # The whole variable's first gradients are exactly 0.
    "whole variable, max": (dict(spatial_op="max"), lambda g: g * 0),
    # Some entries are 0 for the first steps: per element (none), per
    # output unit (max over axis 0), and a block that is partly zero.
    "some entries, none": (dict(spatial_op="none"),
                           lambda g: g * np.array([1, 0, 1], "float32")),
    "some columns, max per unit": (
        dict(spatial_op="max", spatial_axes=0),
        lambda g: g * np.array([0, 1, 0], "float32")),
    # A control: a partly zero block has mean(g²) > 0, so it moves at n+1.
    "partly zero block, mean": (dict(spatial_op="mean"),
                                lambda g: g * np.array([[1, 0, 0]], "float32")),
}


@pytest.mark.parametrize("case", ZERO_FIRST, ids=list(ZERO_FIRST))
@pytest.mark.parametrize("epsilon", [1e-10, 0.0])
def test_zero_first_gradients_hold_the_block(case, epsilon):
    kwargs, zero = ZERO_FIRST[case]
    kwargs = dict(keep_num=3, beta_1=0.5, beta_2=0.9, epsilon=epsilon,
                  **kwargs)
    rng = np.random.default_rng(0)
    theta = rng.normal(size=(2, 3)).astype("float32")
    grads = _normal(rng, (2, 3), 16)
    zero_steps = 4  # more than keep_num: the zeros reach v before g does
    grads = [zero(g) if t < zero_steps else g for t, g in enumerate(grads)]
    actual = _run(AdaShift(learning_rate=LR, **kwargs), [theta],
                  [[g] for g in grads])
    assert all(np.all(np.isfinite(s[0])) for s in actual)
    # No step larger than the authors' bound lr·m/sqrt(v̂) allows: |m| is at
    # most max|g| and v̂ of a moving block at least (1-β2)·min φ.
    moves = np.abs(np.diff([theta] + [s[0] for s in actual], axis=0))
    assert moves.max() < 100 * LR, moves.max()
    _assert_matches_reference(actual, [theta], [[g] for g in grads],
                              **kwargs)


SKIPS = {
    "step 1": {0},
    "middle": {6},
    "long stretch": set(range(5, 17)),
    "every other step": set(range(1, 20, 2)),
}


@pytest.mark.parametrize("skips", SKIPS, ids=list(SKIPS))
def test_a_variable_without_a_gradient_keeps_its_state(skips):
    kwargs = dict(keep_num=3, beta_1=0.9, beta_2=0.99)
    rng = np.random.default_rng(1)
    thetas = [rng.normal(size=(3, 2)).astype("float32"),
              rng.normal(size=(2,)).astype("float32")]
    g0, g1 = _normal(rng, (3, 2), 24), _normal(rng, (2,), 24)
    # Variable 0 gets a gradient on every step, variable 1 not on `skips`.
    grads = [[a, None if t in SKIPS[skips] else b]
             for t, (a, b) in enumerate(zip(g0, g1))]
    opt = AdaShift(learning_rate=LR, **kwargs)
    actual = _run(opt, thetas, grads)
    for t in SKIPS[skips]:
        previous = actual[t - 1][1] if t else thetas[1]
        np.testing.assert_array_equal(actual[t][1], previous)
    _assert_matches_reference(actual, thetas, grads, **kwargs)
    # The step counts: the optimizer's, and each variable's own.
    [counts] = [ops.convert_to_numpy(v).tolist() for v in opt.variables
                if v.path == "adashift/step_counts"]
    assert int(ops.convert_to_numpy(opt.iterations)) == 24
    assert counts == [24, 24 - len(SKIPS[skips])]


@only_on("tensorflow")
def test_skipped_variables_inside_tf_function():
    kwargs = dict(keep_num=2, beta_1=0.5, beta_2=0.9, spatial_op="none")
    rng = np.random.default_rng(2)
    thetas = [rng.normal(size=(2, 2)).astype("float32"),
              rng.normal(size=(3,)).astype("float32")]
    g0, g1 = _normal(rng, (2, 2), 12), _normal(rng, (3,), 12)
    grads = [[a, None if t in (0, 4, 5) else b]
             for t, (a, b) in enumerate(zip(g0, g1))]
    actual = _run(AdaShift(learning_rate=LR, **kwargs), thetas, grads,
                  compiled=True)
    _assert_matches_reference(actual, thetas, grads, **kwargs)


def test_empty_state_under_a_restored_step_count_holds():
    """Only `iterations` restored (state that failed to load, a partial
    restore): the empty windows hold every block until they fill, exactly
    as a fresh optimizer would."""
    kwargs = dict(keep_num=4, beta_1=0.9, beta_2=0.999)
    rng = np.random.default_rng(3)
    theta = rng.normal(size=(4, 3)).astype("float32")
    grads = [[g] for g in _normal(rng, (4, 3), 12)]
    variables = [keras.Variable(theta)]
    restored = AdaShift(learning_rate=LR, **kwargs)
    restored.build(variables)
    restored.iterations.assign(1000)
    actual = []
    for (g,) in grads:
        restored.apply([ops.convert_to_tensor(g)], variables)
        actual.append([ops.convert_to_numpy(variables[0]).astype("float64")])
    for t in range(kwargs["keep_num"]):
        np.testing.assert_array_equal(actual[t][0], theta)
    _assert_matches_reference(actual, [theta], grads, **kwargs)


def _zero_headed_model():
    return tiny_model(hidden=8, outputs=1, head_initializer="zeros")


@pytest.mark.slow
def test_zero_initialised_layer_in_fit_stays_sane_like_adam():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(256, 4)).astype("float32")
    y = (x @ rng.normal(size=(4, 1))).astype("float32")
    init = _zero_headed_model().get_weights()
    results = {}
    for name, optimizer in (("adashift", AdaShift()),
                            ("adam", keras.optimizers.Adam())):
        model = _zero_headed_model()
        model.set_weights(init)
        model.compile(optimizer=optimizer, loss="mse")
        history = model.fit(x, y, batch_size=32, epochs=4, verbose=0)
        results[name] = (model.get_weights(), history.history["loss"])
    weights, losses = results["adashift"]
    # The hidden kernel's first gradient is exactly 0 (the head is 0):
    # divided by ε it reached 2·10^6 within 3 epochs. Adam's stays below 1.
    assert all(np.all(np.isfinite(w)) for w in weights)
    assert np.abs(weights[0]).max() < 5, np.abs(weights[0]).max()
    assert losses[-1] < losses[0]
    adam_weights, _ = results["adam"]
    assert np.abs(weights[0]).max() < 10 * np.abs(adam_weights[0]).max()


def test_bias_correction_counts_from_the_first_non_zero_v():
    """With n = 1, β1 = 0, φ = none and ε = 0 the step of a moving element
    is lr·g_t·sqrt(1 - β2^k)/sqrt(v_t), written out here by hand."""
    beta_2 = 0.5
    rng = np.random.default_rng(5)
    grads = rng.uniform(1, 2, size=(6, 2)).astype("float32")
    grads[:3, 1] = 0  # element 1: first non-zero gradient at step 4
    variable = keras.Variable(np.zeros(2, "float32"))
    opt = AdaShift(learning_rate=LR, keep_num=1, beta_1=0.0, beta_2=beta_2,
                   epsilon=0.0, spatial_op="none")
    theta = np.zeros(2)
    v, k = np.zeros(2), np.zeros(2)
    for t, g in enumerate(grads.astype("float64")):
        opt.apply([ops.convert_to_tensor(grads[t])], [variable])
        old = grads[t - 1].astype("float64") if t else np.zeros(2)
        v = beta_2 * v + (1 - beta_2) * old**2
        k = np.where((v > 0) | (k > 0), k + 1, 0)
        moving = k > 0
        safe_v = np.where(moving, v, 1)
        step = g * np.sqrt(1 - beta_2**k) / np.sqrt(safe_v)
        theta = theta - LR * np.where(moving, step, 0)
        np.testing.assert_allclose(ops.convert_to_numpy(variable), theta,
                                   rtol=1e-6, atol=1e-7,
                                   err_msg=f"step {t + 1}")
    # Element 1 moved first at step 5, with k = 1 there.
    assert k.tolist() == [5, 2]


COMPILED = {"tensorflow": ["graph", "xla"], "jax": ["jit"], "torch": []}


@pytest.mark.parametrize("path", COMPILED[keras.backend.backend()] or
                         [pytest.param("none", marks=pytest.mark.skip(
                             reason="torch runs eagerly"))])
def test_hold_in_compiled_steps(path):
    """The hold of a zero first gradient and a zero element, traced: TF
    graph and XLA (tf.function), JAX (jit of stateless_apply)."""
    kwargs = dict(keep_num=2, beta_1=0.5, beta_2=0.9, epsilon=0.0,
                  spatial_op="none")
    rng = np.random.default_rng(6)
    theta = rng.normal(size=(2, 3)).astype("float32")
    grads = _normal(rng, (2, 3), 10)
    grads = [g * 0 if t < 3 else g for t, g in enumerate(grads)]
    grads[5][0, 0] = 0  # a zero later on changes nothing: v > 0 by then
    variable = keras.Variable(theta)
    opt = AdaShift(learning_rate=LR, **kwargs)
    opt.build([variable])
    tensors = [ops.convert_to_tensor(g) for g in grads]
    actual = []
    if path == "jit":
        import jax

        step = jax.jit(opt.stateless_apply)
        state, train = [v.value for v in opt.variables], [variable.value]
        for g in tensors:
            train, state = step(state, [g], train)
            actual.append([np.asarray(train[0], "float64")])
    else:
        import tensorflow as tf

        step = tf.function(lambda g: opt.apply([g], [variable]),
                           jit_compile=path == "xla")
        for g in tensors:
            step(g)
            actual.append([ops.convert_to_numpy(variable).astype("float64")])
    assert all(np.all(np.isfinite(a[0])) for a in actual)
    _assert_matches_reference(actual, [theta], [[g] for g in grads],
                              **kwargs)
