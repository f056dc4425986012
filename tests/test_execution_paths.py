"""The same numbers on every execution path: TF eager/graph/XLA, JAX jit,
torch eager kernels and torch.compile, model.fit in every compile mode.

The big sweeps in tests/test_numerics.py run on each backend's fastest
path; here the other paths are shown to agree with it. Traces shared by the
cases of a table are computed once and cached.
"""

import functools
import logging
import re
import warnings

import keras
import numpy as np
import pytest

from conftest import BACKEND
from conftest import only_on
from keras_adashift import AdaShift
from keras_adashift import gradient_window
from models import tiny_model
from reference import adashift_trajectory
from trajectories import assert_case_matches
from trajectories import assert_trajectory_close
from trajectories import path_cases
from trajectories import run_keras
from trajectories import sweep

PATH_CASES = path_cases()
BY_PATH_CASE = dict(argnames="index", argvalues=range(len(PATH_CASES)),
                    ids=[c.id for c in PATH_CASES])


@functools.cache
def _path_run(path):
    return run_keras(PATH_CASES, path)


def _assert_same(first, second, index, rtol, names):
    case = PATH_CASES[index]
    for i, (a, b) in enumerate(zip(first, second)):
        assert_trajectory_close(a, b, case.thetas[i], rtol,
                                f"{case.what(i)}: {names}")


@only_on("tensorflow")
@pytest.mark.usefixtures("floatx_like_the_variables")
@pytest.mark.parametrize(**BY_PATH_CASE)
def test_tensorflow_eager_graph_and_xla_agree(index):
    eager = _path_run("eager")[index]
    assert_case_matches(PATH_CASES[index], eager, oracle=False)
    # Eager and graph run the same kernels; XLA may fuse and reorder.
    _assert_same(_path_run("graph")[index], eager, index, 1e-15,
                 "graph vs eager")
    _assert_same(_path_run("xla")[index], eager, index, 1e-12,
                 "XLA vs eager")


@only_on("jax")
@pytest.mark.usefixtures("floatx_like_the_variables")
@pytest.mark.parametrize(**BY_PATH_CASE)
def test_jax_stateless_jit_equals_stateful(index):
    stateful = _path_run("eager")[index]
    assert_case_matches(PATH_CASES[index], stateful, oracle=False)
    _assert_same(_path_run("jit")[index], stateful, index, 1e-6,
                 "stateless_apply under jax.jit vs stateful")


@only_on("torch")
@pytest.mark.usefixtures("floatx_like_the_variables")
@pytest.mark.parametrize(**BY_PATH_CASE)
def test_torch_eager_matches_reference(index):
    assert_case_matches(PATH_CASES[index], _path_run("eager")[index],
                        oracle=False)


# torch_step is the torch transcription of `AdaShift._update`: pinned to it
# directly at float64, so a change to one that misses the other fails here
# even where both stay near the reference.


def _generic_all_at_once(self, grads, variables, learning_rate):
    self._update(grads, variables, learning_rate)


def _generic_per_variable(self, grads, variables, learning_rate):
    # The blocks of the other variables are then masked: the path of a
    # variable without a gradient.
    for gradient, variable in zip(grads, variables):
        self.update_step(gradient, variable, learning_rate)


GENERIC = {"all_at_once": _generic_all_at_once,
           "per_variable": _generic_per_variable}


def _kernel_cases(steps=50):
    cases = sweep((1, 2, 3, 10), steps) + path_cases()
    for case in cases:
        case.steps = steps
        case.grads = [g[:steps] for g in case.grads]
        # Some exactly zero first gradients exercise the hold.
        for g in case.grads:
            g[:2] = 0
    return cases


KERNEL_CASES = _kernel_cases()


@functools.cache
def _kernel_run(generic=None):
    if generic is None:
        return run_keras(KERNEL_CASES, "eager")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AdaShift, "_backend_update_step", GENERIC[generic])
        return run_keras(KERNEL_CASES, "eager")


@only_on("torch")
@pytest.mark.usefixtures("floatx_like_the_variables")
@pytest.mark.parametrize("index", range(len(KERNEL_CASES)),
                         ids=[c.id for c in KERNEL_CASES])
@pytest.mark.parametrize("generic", list(GENERIC))
def test_torch_kernels_equal_the_generic_update(generic, index):
    case = KERNEL_CASES[index]
    kernels, generic_run = _kernel_run()[index], _kernel_run(generic)[index]
    for i in range(len(kernels)):
        assert np.any(kernels[i][-1] != case.thetas[i]), case.what(i)
        assert_trajectory_close(kernels[i], generic_run[i], case.thetas[i],
                                1e-13, f"{case.what(i)}: torch_step vs generic")


@only_on("torch")
@pytest.mark.parametrize("spatial_op", ["max", "mean"])
def test_torch_kernels_equal_the_generic_update_at_mixed_dtypes(spatial_op):
    # A float64 variable makes the blocks float64: φ of the float32
    # variable's gradient is then taken in float64 on both paths.
    rng = np.random.default_rng(11)
    shapes = {"float32": (3, 4), "float64": (5,)}
    thetas = {d: rng.normal(size=s).astype(d) for d, s in shapes.items()}
    grads = [[rng.normal(size=s).astype(d) for d, s in shapes.items()]
             for _ in range(8)]

    def run(generic):
        variables = [keras.Variable(t, dtype=d) for d, t in thetas.items()]
        optimizer = AdaShift(2.0**-6, keep_num=2, spatial_op=spatial_op)
        with pytest.MonkeyPatch.context() as patch:
            if generic:
                patch.setattr(AdaShift, "_backend_update_step",
                              GENERIC["all_at_once"])
            for step in grads:
                optimizer.apply([keras.ops.convert_to_tensor(g)
                                 for g in step], variables)
        blocks = optimizer._blocks.velocity
        assert keras.backend.standardize_dtype(blocks.dtype) == "float64"
        return [keras.ops.convert_to_numpy(x) for x in (*variables, blocks)]

    kernels, generic = run(False), run(True)
    np.testing.assert_allclose(kernels[2], generic[2], rtol=1e-14)
    np.testing.assert_allclose(kernels[1], generic[1], rtol=1e-13)
    np.testing.assert_allclose(kernels[0], generic[0], rtol=1e-6)
    assert np.all(kernels[0] != thetas["float32"])


# TensorFlow: without `tf.__internal__.get_enclosing_xla_context` the
# window is written with the scatter, under XLA too.


def _tensorflow_steps(jit_compile, theta, grads):
    import tensorflow as tf

    w = keras.Variable(theta, name="w")
    optimizer = AdaShift(learning_rate=0.1, keep_num=2)
    optimizer.build([w])

    @tf.function(jit_compile=jit_compile)
    def step(g):
        optimizer.apply_gradients([(g, w)])

    for g in grads:
        step(tf.constant(g))
    return (keras.ops.convert_to_numpy(w),
            [keras.ops.convert_to_numpy(v) for v in optimizer.variables])


@only_on("tensorflow")
def test_xla_step_without_enclosing_xla_context(monkeypatch):
    theta = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]], "float32")
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=(2, 3)).astype("float32") for _ in range(5)]
    graph_w, graph_state = _tensorflow_steps(False, theta, grads)
    monkeypatch.setattr(gradient_window, "_enclosing_xla_context", None)
    xla_w, xla_state = _tensorflow_steps(True, theta, grads)
    expected = adashift_trajectory(theta, grads, learning_rate=0.1,
                                   keep_num=2)[-1]
    np.testing.assert_allclose(graph_w, expected, rtol=1e-5)
    np.testing.assert_allclose(xla_w, graph_w, rtol=1e-6)
    for x, g in zip(xla_state, graph_state):
        np.testing.assert_allclose(x, g, rtol=1e-6)


# model.fit under each compile mode of the backend.


def _fit_weights(init_weights, mode, **opt_kwargs):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.normal(size=(32, 2)).astype("float32")
    model = tiny_model()
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
    init = tiny_model().get_weights()
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


# torch: `jit_compile=True` runs the update outside torch.compile, with no
# graph-break warnings, and trains like eager.

GRAPH_BREAK = re.compile(r"graph break|torch\._dynamo", re.IGNORECASE)


@pytest.mark.slow
@only_on("torch")
def test_torch_compiled_fit_without_graph_break_warnings(capfd, caplog):
    torch = pytest.importorskip("torch")
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
