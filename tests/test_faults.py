"""Faults found in review, each pinned by the behaviour its fix gives.

A fractional accumulation count and an integer variable are refused at
once (the other arguments: tests/test_validation.py); a gradient of the
wrong shape fails before it touches any state; zero-size variables, sparse JAX
gradients and `overwrite_with_gradient` variables train as with Keras's own
optimizers; the bfloat16 window's `W·m` is the sum of what the window
holds; default names are unique; the package imports under `python -OO`;
slots sit on their variable's device; and the optional pieces of TensorFlow
and torch.compile are handled. Expected values are computed here in NumPy
or come from `tests/reference.py`.
"""

import logging
import os
import re
import subprocess
import sys
import warnings

import keras
import ml_dtypes
import numpy as np
import pytest
from keras import ops

from conftest import BACKEND
from conftest import only_on
from keras_adashift import AdaShift
from keras_adashift import gradient_window
from reference import adashift_trajectory


def _variable(value, name):
    return keras.Variable(np.asarray(value, "float32"), name=name)


def _numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def _optimizer_state(optimizer):
    """Every optimizer variable as a NumPy array, by path."""
    return {v.path: _numpy(v).copy() for v in optimizer.variables}


def _gradients(shape, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape).astype("float32") for _ in range(steps)]


# gradient_accumulation_steps must be an int >= 2 (Keras lets 2.5 through
# and takes 0 for None).


@pytest.mark.parametrize(
    "steps", [2.5, 1, 0, True, "2"],
    ids=["fraction", "one", "zero", "bool", "string"],
)
def test_gradient_accumulation_steps_rejected(steps):
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        AdaShift(gradient_accumulation_steps=steps)


@pytest.mark.parametrize("steps", [2, 3])
def test_gradient_accumulation_steps_accepted(steps):
    assert AdaShift(gradient_accumulation_steps=steps) \
        .gradient_accumulation_steps == steps


# The largest float32 below 1 is a valid beta_2 and trains like the
# float64 reference (closer to 1 is refused: tests/test_validation.py).


def test_beta_2_just_below_one_in_float32_trains():
    beta_2 = 1 - 2**-24
    assert np.float32(beta_2) < 1
    theta = np.array([0.5, -1.0, 2.0], "float32")
    grads = _gradients(3, 6)
    w = _variable(theta, "w")
    optimizer = AdaShift(learning_rate=0.1, keep_num=2, beta_2=beta_2)
    for g in grads:
        optimizer.apply_gradients([(ops.convert_to_tensor(g), w)])
    expected = adashift_trajectory(theta, grads, learning_rate=0.1,
                                   keep_num=2, beta_2=beta_2)[-1]
    actual = _numpy(w)
    assert np.all(np.isfinite(actual))
    assert not np.allclose(actual, theta)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-6)


# With a bfloat16 window, W·m is the weighted sum of the gradients as the
# window stores them (it used to add the exact gradient and subtract the
# rounded copy, and drift).


def test_bfloat16_window_momentum_is_sum_of_rounded_gradients():
    beta_1, n, steps = 0.99, 10, 60
    g = np.array([1 + 2**-9, 1 + 3 * 2**-9, -(1 + 2**-9)], "float32")
    rounded = g.astype(ml_dtypes.bfloat16).astype("float64")
    np.testing.assert_array_equal(rounded, [1, 1 + 2**-7, -1])  # premise
    w = _variable(np.zeros(3), "w")
    optimizer = AdaShift(keep_num=n, beta_1=beta_1, window_dtype="bfloat16")
    optimizer.build([w])
    slot_name = w.path.replace("/", "_") + "_momentum"
    (momentum,) = [v for v in optimizer.variables if v.name == slot_name]
    for t in range(1, steps + 1):
        optimizer.apply_gradients([(ops.convert_to_tensor(g), w)])
        if t in (1, n, n + 1, steps):
            weights = sum(beta_1**i for i in range(min(t, n)))
            np.testing.assert_allclose(
                _numpy(momentum), weights * rounded, rtol=1e-5,
                err_msg=f"W·m after step {t}")


# A gradient of another shape fails, naming the variable and both shapes,
# before it changes anything (it used to broadcast into the window).


@pytest.mark.parametrize("shape", [(1,), ()], ids=["length_1", "scalar"])
def test_gradient_shape_mismatch_rejected_without_side_effects(shape):
    w = _variable([0.5, -1.0, 2.0, 0.25], "mismatched_kernel")
    # Weight decay runs before the update step: the check must come first.
    optimizer = AdaShift(learning_rate=0.1, keep_num=1, weight_decay=0.1)
    for g in _gradients(4, 3):
        optimizer.apply_gradients([(ops.convert_to_tensor(g), w)])
    before, state = _numpy(w).copy(), _optimizer_state(optimizer)
    bad = ops.convert_to_tensor(np.full(shape, 0.5, "float32"))
    expected = ("mismatched_kernel", str(shape), "(4,)")
    with pytest.raises(
        ValueError,
        match="(?s)" + "".join(f"(?=.*{re.escape(e)})" for e in expected),
    ):
        optimizer.apply_gradients([(bad, w)])
    np.testing.assert_array_equal(_numpy(w), before)
    after = _optimizer_state(optimizer)
    assert after.keys() == state.keys()
    for path, value in state.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)


# Zero-size variables train beside ordinary ones, as with Adam.

ZERO_SIZE_CASES = {
    "max": ("max", None),
    "mean": ("mean", None),
    "none": ("none", None),
    "max-axes1": ("max", 1),
    "mean-axes1": ("mean", 1),
}


@pytest.mark.parametrize("spatial_op, spatial_axes",
                         ZERO_SIZE_CASES.values(), ids=ZERO_SIZE_CASES.keys())
def test_zero_size_variables(spatial_op, spatial_axes):
    shapes = [(0,), (3, 0), (2, 2)]
    theta = np.array([[0.5, -1.0], [2.0, 0.25]], "float32")
    rng = np.random.default_rng(0)
    grads = [[rng.normal(size=s).astype("float32") for s in shapes]
             for _ in range(4)]

    def train(optimizer):
        variables = [_variable(np.ones(s), f"empty_{i}")
                     for i, s in enumerate(shapes[:2])]
        variables.append(_variable(theta, "ordinary"))
        for step in grads:
            optimizer.apply_gradients(
                zip([ops.convert_to_tensor(g) for g in step], variables))
        return variables

    adam = train(keras.optimizers.Adam(learning_rate=0.1))  # Keras copes
    assert not np.allclose(_numpy(adam[2]), theta)
    optimizer = AdaShift(learning_rate=0.1, keep_num=1,
                         spatial_op=spatial_op, spatial_axes=spatial_axes)
    variables = train(optimizer)
    for v, s in zip(variables, shapes):
        assert tuple(v.shape) == s
    expected = adashift_trajectory(
        theta, [step[2] for step in grads], learning_rate=0.1, keep_num=1,
        spatial_op=spatial_op,
        axes=None if spatial_axes is None else (spatial_axes,))[-1]
    assert not np.allclose(_numpy(variables[2]), theta)
    np.testing.assert_allclose(_numpy(variables[2]), expected, rtol=1e-5)
    for v in optimizer.variables:
        assert not np.any(np.isnan(_numpy(v))), v.path


# Integer variables have no gradient to keep: refused at build.


def test_integer_variable_rejected_at_build():
    # torch cannot make an integer tensor require a gradient.
    counter = keras.Variable(np.zeros(3, "int32"), dtype="int32",
                             name="int_counter",
                             trainable=BACKEND != "torch")
    with pytest.raises(ValueError,
                       match="(?s)(?=.*int_counter)(?=.*float)"):
        AdaShift().build([_variable(np.ones(2), "w"), counter])


# JAX: a sparse BCOO gradient is the dense gradient it stands for.


@only_on("jax")
def test_jax_bcoo_gradient_equals_dense():
    import jax.numpy as jnp
    from jax.experimental import sparse

    theta = np.arange(15, dtype="float32").reshape(5, 3) / 10 - 0.7
    grads = _gradients((5, 3), 5)
    for g in grads:
        g[[1, 3]] = 0  # rows without a gradient
    trajectories = []
    for to_sparse in (False, True):
        w = _variable(theta, "embedding")
        optimizer = AdaShift(learning_rate=0.1, keep_num=2)
        trajectory = []
        for g in grads:
            g = jnp.asarray(g)
            optimizer.apply_gradients(
                [(sparse.BCOO.fromdense(g) if to_sparse else g, w)])
            trajectory.append(_numpy(w).copy())
        trajectories.append(trajectory)
    dense, sparse_ = trajectories
    assert not np.allclose(dense[-1], theta)
    for t, (d, s) in enumerate(zip(dense, sparse_)):
        np.testing.assert_allclose(s, d, rtol=1e-6, atol=1e-6,
                                   err_msg=f"step {t + 1}")


# Default names are unique, so two AdaShifts do not clash.


def test_default_names_are_unique():
    first, second = AdaShift(), AdaShift()
    assert first.name != second.name
    for name in (first.name, second.name):
        assert re.fullmatch(r"adashift(_\d+)?", name), name


def test_explicit_name_is_kept():
    optimizer = AdaShift(name="my_adashift")
    assert optimizer.name == "my_adashift"
    optimizer.build([_variable(np.ones(2), "w")])
    assert all(v.path.startswith("my_adashift/") for v in optimizer.variables)


def test_two_default_adashifts_in_multi_optimizer_do_not_clash():
    if not hasattr(keras.optimizers, "MultiOptimizer"):
        pytest.skip("this Keras has no keras.optimizers.MultiOptimizer")
    first, second = AdaShift(), AdaShift()
    a, b = _variable(np.ones(2), "a"), _variable(np.ones(3), "b")
    multi = keras.optimizers.MultiOptimizer(
        lambda v: first if v.name == "a" else second)
    multi.build([a, b])
    assert len({o.name for o in multi.optimizers}) == 2
    paths = [v.path for v in multi.variables]
    duplicates = sorted({p for p in paths if paths.count(p) > 1})
    assert not duplicates, duplicates


# The package imports without docstrings.


@pytest.mark.slow
def test_imports_under_python_OO():
    env = dict(os.environ, KERAS_BACKEND=BACKEND)
    result = subprocess.run(
        [sys.executable, "-OO", "-c", "from keras_adashift import AdaShift"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]


# TensorFlow: without `tf.__internal__.get_enclosing_xla_context` the
# window is written with the scatter, under XLA too.


def _tensorflow_steps(jit_compile, theta, grads):
    import tensorflow as tf

    w = _variable(theta, "w")
    optimizer = AdaShift(learning_rate=0.1, keep_num=2)
    optimizer.build([w])

    @tf.function(jit_compile=jit_compile)
    def step(g):
        optimizer.apply_gradients([(g, w)])

    for g in grads:
        step(tf.constant(g))
    return _numpy(w), [_numpy(v) for v in optimizer.variables]


@only_on("tensorflow")
def test_xla_step_without_enclosing_xla_context(monkeypatch):
    theta = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]], "float32")
    grads = _gradients((2, 3), 5)
    graph_w, graph_state = _tensorflow_steps(False, theta, grads)
    monkeypatch.setattr(gradient_window, "_enclosing_xla_context", None)
    xla_w, xla_state = _tensorflow_steps(True, theta, grads)
    expected = adashift_trajectory(theta, grads, learning_rate=0.1,
                                   keep_num=2)[-1]
    np.testing.assert_allclose(graph_w, expected, rtol=1e-5)
    np.testing.assert_allclose(xla_w, graph_w, rtol=1e-6)
    for x, g in zip(xla_state, graph_state):
        np.testing.assert_allclose(x, g, rtol=1e-6)


# Variables that Keras overwrites with their gradient get no slots.


def test_overwrite_with_gradient_variables_get_no_slots():
    theta = np.array([0.5, -1.0, 2.0], "float32")
    normal = _variable(theta, "normal_kernel")
    special = _variable(np.zeros(2), "fp8_amax_history")
    special.overwrite_with_gradient = True
    optimizer = AdaShift(learning_rate=0.1, keep_num=1)
    optimizer.build([normal, special])
    for v in optimizer.variables:
        assert "fp8_amax_history" not in v.path, v.path
        assert "fp8_amax_history" not in v.name, v.name
    grads = _gradients(3, 3)
    for t, g in enumerate(grads):
        overwrite = np.array([t + 1.0, -2.0 * t], "float32")
        optimizer.apply_gradients([
            (ops.convert_to_tensor(g), normal),
            (ops.convert_to_tensor(overwrite), special),
        ])
        np.testing.assert_array_equal(_numpy(special), overwrite)
    expected = adashift_trajectory(theta, grads, learning_rate=0.1,
                                   keep_num=1)[-1]
    assert not np.allclose(_numpy(normal), theta)
    np.testing.assert_allclose(_numpy(normal), expected, rtol=1e-5)


# TensorFlow: slots are placed with their variable, as Keras's are.


def _slots_by_variable(optimizer, variables):
    slots = {}
    for w in variables:
        prefix = w.path.replace("/", "_") + "_"
        slots[w.path] = [v for v in optimizer.variables
                         if v.name.startswith(prefix)]
        assert slots[w.path], f"no slots found for {w.path}"
    return slots


@only_on("tensorflow")
def test_slots_colocated_under_one_device_strategy():
    import tensorflow as tf

    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        variables = [_variable(np.ones((2, 3)), "kernel"),
                     _variable(np.ones(3), "bias")]
        optimizer = AdaShift(keep_num=2)
        optimizer.build(variables)
    slots = _slots_by_variable(optimizer, variables)
    for w in variables:
        for slot in slots[w.path]:
            assert slot.value.device == w.value.device, slot.path


_TWO_DEVICES = """
import tensorflow as tf
cpu, = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import numpy as np, keras
from keras_adashift import AdaShift
with tf.device("/cpu:1"):
    w = keras.Variable(np.ones((2, 3), "float32"), name="kernel")
optimizer = AdaShift(keep_num=2)
optimizer.build([w])
slots = [v for v in optimizer.variables if v.name.startswith("kernel_")]
assert slots
print(w.value.device)
for v in slots:
    print(v.name, v.value.device)
"""


@pytest.mark.slow
@only_on("tensorflow")
def test_slots_follow_their_variable_to_another_device():
    result = subprocess.run(
        [sys.executable, "-c", _TWO_DEVICES], capture_output=True,
        text=True, timeout=120,
        env=dict(os.environ, KERAS_BACKEND="tensorflow"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    device, *slots = result.stdout.strip().splitlines()
    assert device.endswith("CPU:1"), device
    for line in slots:
        name, slot_device = line.split()
        assert slot_device == device, line


# torch: `jit_compile=True` runs the update outside torch.compile, with
# no graph-break warnings, and trains like eager.

GRAPH_BREAK = re.compile(r"graph break|torch\._dynamo", re.IGNORECASE)


@pytest.mark.slow
@only_on("torch")
def test_torch_compiled_fit_without_graph_break_warnings(capfd, caplog):
    import torch

    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 3)).astype("float32")
    y = rng.normal(size=(12, 2)).astype("float32")

    def model():
        return keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])

    eager, compiled = model(), model()
    compiled.set_weights(eager.get_weights())
    initial = eager.get_weights()
    histories = {}
    caplog.set_level(logging.WARNING)
    torch._dynamo.reset()
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for jit, m in ((False, eager), (True, compiled)):
            m.compile(optimizer=AdaShift(learning_rate=0.05, keep_num=1),
                      loss="mse", jit_compile=jit)
            histories[jit] = m.fit(x, y, batch_size=4, epochs=1,
                                   shuffle=False, verbose=0).history
    out, err = capfd.readouterr()
    messages = [str(w.message) for w in caught]
    messages += [r.getMessage() for r in caplog.records]
    messages += (out + err).splitlines()
    breaks = [m for m in messages if GRAPH_BREAK.search(m)]
    assert not breaks, "\n".join(breaks[:10])
    assert np.isfinite(histories[True]["loss"][-1])
    for e, c, i in zip(eager.get_weights(), compiled.get_weights(), initial):
        assert not np.allclose(c, i)
        np.testing.assert_allclose(c, e, rtol=1e-5, atol=1e-6)
