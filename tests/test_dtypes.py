"""Float dtypes: 16-bit and float64 variables against the reference, the
bfloat16 window, float64 under float32 floatx and JAX x64, mixed_bfloat16.

The dtypes of the optimizer's own variables: tests/test_state_layout.py.
The mixed_float16 policy and its loss scaling: tests/test_loss_scaling.py.
"""

import keras
import ml_dtypes
import numpy as np
import pytest
from keras import ops

from conftest import only_on
from keras_adashift import AdaShift
from models import tiny_model
from reference import adashift_trajectory
from trajectories import DTYPES
from trajectories import RTOL
from trajectories import SPATIAL_OPS
from trajectories import Case
from trajectories import assert_case_matches
from trajectories import assert_trajectory_close
from trajectories import config
from trajectories import reference
from trajectories import run_keras


SIXTEEN_BIT_EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7}


@pytest.mark.usefixtures("floatx_like_the_variables")
@pytest.mark.parametrize("dtype", DTYPES)
def test_variable_dtypes_track_the_float64_reference(dtype):
    # Gradients within 10^±1 stay well inside float16's range; lr 2^-4
    # makes each step large against θ's rounding, so the 16-bit checks
    # below constrain the update.
    case = Case(f"{dtype} keep_num=3 beta_1=0.9", config(3, 0.9, 0.99),
                [(4, 3)], [None], steps=30, dtype=dtype, lr=2.0**-4,
                decades=1.0)
    [[actual]] = run_keras([case], "eager")
    expected = reference(case, 0)
    if dtype not in SIXTEEN_BIT_EPS:
        assert_trajectory_close(actual, expected, case.thetas[0],
                                RTOL[dtype], case.label)
        return
    eps = SIXTEEN_BIT_EPS[dtype]
    previous = np.concatenate([case.thetas[0][None], actual[:-1]])
    previous_ref = np.concatenate([case.thetas[0][None], expected[:-1]])
    update = previous_ref - expected  # exact; θ does not feed it
    # Each step Keras rounds the float32 update to `dtype`, then the new θ:
    # half a unit in the last place each, so within eps * (|update| + |θ|)
    # with a factor 2 of slack.
    step_error = np.abs(actual - (previous - update))
    step_bound = eps * (np.abs(update) + np.abs(actual))
    worst = np.argmax(np.max(step_error - step_bound, axis=(1, 2)))
    assert np.all(step_error <= step_bound), (
        f"step {worst + 1} is off by {step_error[worst].max():.3g} "
        f"(bound {step_bound[worst].min():.3g})")
    # Those roundings add up, and no more than that.
    drift = np.abs(actual - expected)
    bound = np.cumsum(eps * (np.abs(update) + np.abs(expected)), axis=0)
    assert np.all(drift <= 2 * bound), (
        f"drift {np.max(drift / bound):.3g} times the rounding bound")


@pytest.mark.usefixtures("floatx_like_the_variables")
def test_bfloat16_window_stays_close_to_float32_window():
    def case(window_dtype):
        kw = config(3, 0.9, 0.99, window_dtype=window_dtype)
        return Case("float32 keep_num=3 beta_1=0.9", kw, [(4, 3)], [None],
                    steps=40, dtype="float32", decades=1.0)

    exact, narrow = case(None), case("bfloat16")
    [[a]], [[b]] = run_keras([exact], "eager"), run_keras([narrow], "eager")
    # A bfloat16 window rounds each stored gradient to 8 significant bits
    # (relative error <= 2^-9): v̂ is off by <= 2^-8 relative and sqrt(v̂) by
    # <= 2^-9, and m keeps a residual of the rounding of each gradient that
    # left it, decaying by beta_1 per step. Measured: the parameter
    # movement differs by < 0.15% of its largest value (also for keep_num
    # 1 to 40 and gradients spread over 10^±3); 1% allowed.
    movement_a = a - exact.thetas[0]
    movement_b = b - narrow.thetas[0]
    scale = np.abs(movement_a).max()
    assert np.abs(movement_b - movement_a).max() <= 1e-2 * scale
    assert_trajectory_close(a, reference(exact, 0), exact.thetas[0],
                            RTOL["float32"], "float32 window vs reference")


def test_bfloat16_window_momentum_is_sum_of_rounded_gradients():
    # With a bfloat16 window, W·m is the weighted sum of the gradients as
    # the window stores them (it used to add the exact gradient and
    # subtract the rounded copy, and drift).
    beta_1, n, steps = 0.99, 10, 60
    g = np.array([1 + 2**-9, 1 + 3 * 2**-9, -(1 + 2**-9)], "float32")
    rounded = g.astype(ml_dtypes.bfloat16).astype("float64")
    np.testing.assert_array_equal(rounded, [1, 1 + 2**-7, -1])  # premise
    w = keras.Variable(np.zeros(3, "float32"), name="w")
    optimizer = AdaShift(keep_num=n, beta_1=beta_1, window_dtype="bfloat16")
    optimizer.build([w])
    slot_name = w.path.replace("/", "_") + "_momentum"
    (momentum,) = [v for v in optimizer.variables if v.name == slot_name]
    for t in range(1, steps + 1):
        optimizer.apply_gradients([(ops.convert_to_tensor(g), w)])
        if t in (1, n, n + 1, steps):
            weights = sum(beta_1**i for i in range(min(t, n)))
            np.testing.assert_allclose(
                ops.convert_to_numpy(momentum), weights * rounded,
                rtol=1e-5, err_msg=f"W·m after step {t}")


@only_on("tensorflow", "torch")
@pytest.mark.usefixtures("floatx_like_the_variables")
@pytest.mark.parametrize("spatial_op", SPATIAL_OPS)
def test_float64_variables_keep_float64_precision_under_default_floatx(
        spatial_op):
    """The documented dtypes: m and v in the variable's dtype, so a float64
    variable gets a float64 update even when floatx is float32 (the
    default). The learning rate variable is float32, so the rate is a power
    of two."""
    keras.config.set_floatx("float32")  # the fixture restores it
    case = Case(f"floatx float32, float64 variables, spatial_op={spatial_op!r}",
                config(3, 0.9, 0.999, 1e-10, spatial_op), [(4, 3)], [None],
                steps=20, dtype="float64")
    [per_var] = run_keras([case], "eager")
    assert_case_matches(case, per_var, oracle=False)


@only_on("jax")
def test_float64_under_jax_enable_x64():
    # x64 makes the step count int64 while the window's other start
    # indices are built as int32: the write must not mix the two.
    import jax

    jax.config.update("jax_enable_x64", True)
    try:
        rng = np.random.default_rng(3)
        theta = rng.normal(size=(3, 2))
        grads = [rng.normal(size=(3, 2)) for _ in range(9)]
        variable = keras.Variable(theta, dtype="float64")
        opt = AdaShift(learning_rate=0.05, keep_num=3, epsilon=0.0)
        for g in grads:
            opt.apply([g], [variable])
        expected = adashift_trajectory(
            theta, grads, learning_rate=0.05, keep_num=3, epsilon=0.0
        )[-1]
        assert variable.dtype == "float64"
        np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-6)
    finally:
        jax.config.update("jax_enable_x64", False)


def _fit_losses(dtype_policy, name):
    dtype_policy(name)
    keras.utils.set_random_seed(0)  # the same initial weights per policy
    model = tiny_model(hidden=8, outputs=1)
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


def test_mixed_bfloat16_trains_like_float32(dtype_policy):
    losses, weights, model = _fit_losses(dtype_policy, "mixed_bfloat16")
    assert model.layers[0].compute_dtype == "bfloat16"
    assert model.layers[0].kernel.dtype == "float32"
    reference_losses, reference_weights, _ = _fit_losses(dtype_policy,
                                                         "float32")
    assert losses[-1] < 0.8 * losses[0]
    np.testing.assert_allclose(losses, reference_losses, rtol=0.05)
    for w, r in zip(weights, reference_weights):
        np.testing.assert_allclose(w, r, atol=2e-2)
