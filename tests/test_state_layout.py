"""The optimizer's state: which variables, in which order, their shapes,
dtypes and contents, and their device.

Keras saves optimizer variables by position, so the golden lists and slot
contents here are the saved format (saving and loading:
tests/test_serialization.py).
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

from conftest import only_on
from keras_adashift import AdaShift
from trajectories import DTYPES


def _golden_model():
    return keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(2, name="dense"),
            keras.layers.Dense(1, name="head"),
        ],
        name="net",
    )


MODEL_VARIABLES = [
    ("net_dense_kernel", (3, 2)),
    ("net_dense_bias", (2,)),
    ("net_head_kernel", (2, 1)),
    ("net_head_bias", (1,)),
]


def _slots(kinds):
    """Per model variable, in the model's order, one slot per kind."""
    return [
        (f"adashift/{name}_{kind}", shape_fn(shape))
        for name, shape in MODEL_VARIABLES
        for kind, shape_fn in kinds
    ]


def _per_kind(kind, shape_fn):
    """One slot of this kind per model variable (Keras's EMA averages)."""
    return [(f"adashift/{name}_{kind}", shape_fn(shape))
            for name, shape in MODEL_VARIABLES]


# Written out from the documented build order (iteration, learning_rate;
# then per variable its VariableState slots: window (beta_1 > 0 or
# spatial_op "none"; keep_num + 1 slots), momentum (beta_1 > 0), velocity and
# bias_correction (spatial_op "none": per element); then the step counts, one
# per model variable, and for a reducing φ the BlockState of all blocks:
# square_window (keep_num rows), velocity, bias_correction), not read from the
# code: a change in creation order breaks saved files.
COUNTERS = [("adashift/iteration", ()), ("adashift/learning_rate", ())]
STEP_COUNTS = [("adashift/step_counts", (len(MODEL_VARIABLES),))]


def _blocks(keep_num, blocks):
    return [("adashift/square_window", (keep_num, blocks)),
            ("adashift/velocity", (blocks,)),
            ("adashift/bias_correction", (blocks,))]


# keep_num 4, one block per variable.
GOLDEN_DEFAULT = COUNTERS + _slots([
    ("window", lambda s: (5, *s)),
    ("momentum", lambda s: s),
]) + STEP_COUNTS + _blocks(4, 4)

# spatial_op "none": no blocks; v and its bias correction are element-wise.
GOLDEN_NONE = COUNTERS + _slots([
    ("window", lambda s: (5, *s)),
    ("momentum", lambda s: s),
    ("velocity", lambda s: s),
    ("bias_correction", lambda s: s),
]) + STEP_COUNTS

# beta_1 0 with a reducing φ: m_t = g_t, so no gradient window and no
# momentum; nothing the size of the variable.
GOLDEN_BETA_1_ZERO = COUNTERS + STEP_COUNTS + _blocks(4, 4)

# beta_1 0 with φ = none: v still needs the gradients, m does not.
GOLDEN_BETA_1_ZERO_NONE = COUNTERS + _slots([
    ("window", lambda s: (5, *s)),
    ("velocity", lambda s: s),
    ("bias_correction", lambda s: s),
]) + STEP_COUNTS

# With EMA, Keras's base build adds the averages before AdaShift's slots;
# spatial_axes=0 keeps one velocity per output unit of a kernel, and a bias
# (axis 0 only) is one block: 2 + 1 + 1 + 1 blocks.
GOLDEN_EMA_AXES = COUNTERS + _per_kind("average", lambda s: s) + _slots([
    ("window", lambda s: (3, *s)),
    ("momentum", lambda s: s),
]) + STEP_COUNTS + _blocks(2, 5)


@pytest.mark.parametrize(
    "kwargs, golden",
    [
        (dict(keep_num=4), GOLDEN_DEFAULT),
        (dict(keep_num=4, spatial_op="none"), GOLDEN_NONE),
        (dict(keep_num=4, beta_1=0.0), GOLDEN_BETA_1_ZERO),
        (dict(keep_num=4, beta_1=0.0, spatial_op="none"),
         GOLDEN_BETA_1_ZERO_NONE),
        (dict(keep_num=2, use_ema=True, spatial_axes=0), GOLDEN_EMA_AXES),
    ],
    ids=["default", "none", "beta_1_zero", "beta_1_zero_none",
         "ema_spatial_axes"],
)
def test_golden_optimizer_variables(kwargs, golden):
    model = _golden_model()
    optimizer = AdaShift(**kwargs)
    model.compile(optimizer=optimizer, loss="mse")
    optimizer.build(model.trainable_variables)
    actual = [(v.path, tuple(v.shape)) for v in optimizer.variables]
    assert actual == golden
    for v in optimizer.variables[1:]:
        dtype = keras.backend.standardize_dtype(v.dtype)
        if v.path.endswith("step_counts"):
            assert "int" in dtype, v.path
        else:
            assert dtype == "float32", v.path


def test_slot_contents_are_the_documented_format():
    # What each slot holds is part of the saved format as much as its shape:
    # a file saved by a version that stored another quantity would load
    # without a warning and resume wrongly. 6 steps wrap the 4-slot window.
    n, beta_1, beta_2, steps = 3, 0.5, 0.9, 6
    rng = np.random.default_rng(3)
    grads = rng.normal(size=(steps, 2, 3)).astype("float32")
    variable = keras.Variable(np.zeros((2, 3), "float32"), name="w")
    optimizer = AdaShift(keep_num=n, beta_1=beta_1, beta_2=beta_2)
    optimizer.build([variable])
    for g in grads:
        optimizer.apply([ops.convert_to_tensor(g)], [variable])
    # Slot names as in the golden lists: "w_window", "velocity", ...
    slots = {
        v.path.split("/")[-1].removeprefix("w_"): ops.convert_to_numpy(v)
        for v in optimizer.variables
    }

    # Step t (from 1) writes g_t into slot t % (n + 1).
    for t in range(steps - n, steps + 1):
        np.testing.assert_array_equal(slots["window"][t % (n + 1)],
                                      grads[t - 1])
    # square_window: max(g²) of the latest n gradients, oldest first.
    np.testing.assert_allclose(
        slots["square_window"].ravel(),
        [np.max(g * g) for g in grads[steps - n:]], rtol=1e-6)
    # momentum: the unnormalized weighted sum of the latest n gradients.
    weighted_sum = sum(beta_1**i * grads[steps - 1 - i] for i in range(n))
    np.testing.assert_allclose(slots["momentum"], weighted_sum, rtol=1e-5,
                               atol=1e-6)
    # velocity: the EMA of max(g²) over the gradients that left the window.
    v = 0.0
    for g in grads[: steps - n]:
        v = beta_2 * v + (1 - beta_2) * np.max(g.astype("float64") ** 2)
    np.testing.assert_allclose(slots["velocity"].ravel(), [v], rtol=1e-5)
    # bias_correction: 1 - β2^k, k counted from the step v turned non-zero
    # (step n + 1, when g_1 left the window).
    np.testing.assert_allclose(slots["bias_correction"].ravel(),
                               [1 - beta_2 ** (steps - n)], rtol=1e-6)
    # step_counts: the updates each variable has received.
    assert slots["step_counts"].tolist() == [steps]


def _slot_dtypes(opt, name):
    """The dtypes of the variable's window and momentum and of the blocks'
    window of φ(g²) and velocity."""
    slots = {f"{name}_window": "window", f"{name}_momentum": "momentum",
             "square_window": "square_window", "velocity": "velocity"}
    return {slots[v.name]: keras.backend.standardize_dtype(v.dtype)
            for v in opt.variables if v.name in slots}


@pytest.mark.parametrize("window_dtype", [None, "bfloat16"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_slot_dtypes(dtype, window_dtype):
    # 16-bit variables: m and v accumulate, so they are float32.
    state = "float32" if dtype in ("float16", "bfloat16") else dtype
    variable = keras.Variable(np.zeros((2, 3)), dtype=dtype, name="w")
    opt = AdaShift(keep_num=3, window_dtype=window_dtype)
    opt.build([variable])
    # φ(g²) is taken before the gradient is stored: state dtype.
    assert _slot_dtypes(opt, "w") == {
        "window": window_dtype or dtype, "square_window": state,
        "momentum": state, "velocity": state}


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
    tf = pytest.importorskip("tensorflow")
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        variables = [keras.Variable(np.ones((2, 3), "float32"), name="kernel"),
                     keras.Variable(np.ones(3, "float32"), name="bias")]
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
