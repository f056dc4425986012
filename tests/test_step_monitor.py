"""StepMonitor: its numbers against NumPy, its warnings, and that it leaves
training alone, in `fit` (also under jit_compile=True) and in a custom loop.
"""

import math
import warnings

import keras
import numpy as np
import pytest

from conftest import BACKEND
from keras_adashift import AdaShift
from keras_adashift.callbacks import StepMonitor
from keras_adashift.callbacks import StepMonitorWarning

NAMES = ("max_over_bound", "rms_over_bound", "update_ratio")


def _model(inputs=8, hidden=6, outputs=3):
    return keras.Sequential([
        keras.Input((inputs,)),
        keras.layers.Dense(hidden, activation="tanh", name="hidden"),
        keras.layers.Dense(outputs, name="head"),
    ])


def _data(samples=64, inputs=8, outputs=3, seed=0, zero_columns=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, inputs)).astype("float32")
    x[:, :zero_columns] = 0  # φ = none: those kernel rows stay on hold
    y = rng.normal(size=(samples, outputs)).astype("float32")
    return x, y


class _Snapshots(keras.callbacks.Callback):
    """The weights before and after every batch, the optimizer's state
    after it, and the batch logs as the callbacks after it see them."""

    def __init__(self):
        super().__init__()
        self.before, self.after, self.held, self.logs = [], [], [], []
        self.lr = []

    def on_train_batch_begin(self, batch, logs=None):
        model = self.model  # JAX: the state of fit
        self.before.append([np.array(keras.ops.convert_to_numpy(v),
                                     dtype="float64")
                            for v in model.trainable_variables])
        self.lr.append(float(keras.ops.convert_to_numpy(
            model.optimizer.learning_rate)))

    def on_train_batch_end(self, batch, logs=None):
        model = self.model
        self.after.append([np.array(keras.ops.convert_to_numpy(v),
                                    dtype="float64")
                           for v in model.trainable_variables])
        self.held.append(_held_by_numpy(model))
        self.logs.append(dict(logs))


def _held_by_numpy(model):
    """(held, total) per top-level layer, from AdaShift's bias corrections."""
    optimizer = model.optimizer
    if not isinstance(optimizer, AdaShift):
        return None
    out = {}
    for layer in model.layers:
        held = total = 0
        for variable in layer.trainable_variables:
            state = optimizer._states[optimizer._get_variable_index(variable)]
            if state.blocks is None:
                c = keras.ops.convert_to_numpy(state.bias_correction)
            else:
                start, stop, _ = state.blocks
                c = keras.ops.convert_to_numpy(
                    optimizer._blocks.bias_correction)[start:stop]
            held += int(np.sum(c == 0))
            total += c.size
        out[layer.name] = (held, total)
    return out


def _expected(before, after, lr, beta_2, layers, held):
    """The logged values, from the weights by NumPy."""
    bound = lr / math.sqrt(1 - beta_2)
    groups = {"": range(len(before))}
    for name, indices in layers.items():
        groups[name] = indices
    out = {}
    for name, indices in groups.items():
        step = np.concatenate([(after[i] - before[i]).ravel()
                               for i in indices])
        old = np.concatenate([before[i].ravel() for i in indices])
        prefix = f"step/{name}/" if name else "step/"
        out[prefix + "max_over_bound"] = np.max(np.abs(step)) / bound
        out[prefix + "rms_over_bound"] = np.sqrt(np.mean(step**2)) / bound
        out[prefix + "update_ratio"] = (np.linalg.norm(step)
                                        / np.linalg.norm(old))
        if held is not None:
            parts = held.values() if not name else [held[name]]
            out[prefix + "held_fraction"] = (sum(h for h, _ in parts)
                                             / sum(t for _, t in parts))
    return out


def _fit(optimizer, callbacks, epochs=1, batch_size=8, jit_compile="auto",
         x=None, y=None):
    keras.utils.set_random_seed(1)
    model = _model()
    model.compile(optimizer, "mse", jit_compile=jit_compile)
    if x is None:
        x, y = _data()
    history = model.fit(x, y, batch_size=batch_size, epochs=epochs,
                        verbose=0, shuffle=False, callbacks=callbacks)
    return model, history


@pytest.mark.parametrize("optimizer", [
    lambda: keras.optimizers.Adam(1e-2, beta_2=0.99),
    lambda: keras.optimizers.SGD(0.1),  # no beta_2: Adam's 0.999
    lambda: AdaShift(keep_num=3),
    lambda: AdaShift(1e-2, keep_num=2, spatial_op="none"),
], ids=["adam", "sgd", "adashift", "adashift-none"])
def test_values_equal_numpy_from_the_weights(optimizer):
    snapshots = _Snapshots()
    monitor = StepMonitor(every=3, per_layer=True, warn=False)
    x, y = _data(zero_columns=2)
    model, history = _fit(optimizer(), [monitor, snapshots], epochs=2, x=x,
                          y=y)
    beta_2 = getattr(model.optimizer, "beta_2", 0.999)
    layers = {"hidden": [0, 1], "head": [2, 3]}
    measured = None
    held_seen = set()
    for batch, logs in enumerate(snapshots.logs):  # 8 batches per epoch
        if batch % 3 == 0:
            measured = _expected(snapshots.before[batch],
                                 snapshots.after[batch], snapshots.lr[batch],
                                 beta_2, layers, snapshots.held[batch])
        step_logs = {k: v for k, v in logs.items() if k.startswith("step/")}
        assert set(step_logs) == set(measured)
        for key, value in measured.items():
            assert step_logs[key] == pytest.approx(value, rel=1e-5, abs=1e-12)
        if "step/held_fraction" in measured:
            held_seen.add(round(measured["step/held_fraction"], 6))
    assert isinstance(model.optimizer, AdaShift) == bool(held_seen)
    if isinstance(model.optimizer, AdaShift):
        assert 1.0 in held_seen  # the window filling
        assert min(held_seen) < 1.0
    # Epoch logs: the latest measured values (batch 15 of 16: the 2nd
    # epoch's last measurement is its batch 7, the 16th batch, 15 % 3 = 0).
    for key, value in measured.items():
        assert history.history[key][-1] == pytest.approx(value, rel=1e-5,
                                                         abs=1e-12)
    assert len(history.history["step/max_over_bound"]) == 2


def test_held_fraction_per_element_between_0_and_1():
    # φ = none on two always-zero input columns: those kernel rows never get
    # a non-zero gradient, so they stay on hold; the rest moves.
    monitor = StepMonitor(every=1, per_layer=True, warn=False)
    x, y = _data(zero_columns=2)
    _fit(AdaShift(1e-2, keep_num=1, spatial_op="none"), [monitor], x=x, y=y)
    hidden = monitor.by_layer["hidden"]["held_fraction"]
    assert hidden == pytest.approx(2 * 6 / (8 * 6 + 6))
    assert monitor.by_layer["head"]["held_fraction"] == 0
    assert monitor.by_variable[
        next(p for p in monitor.by_variable if p.endswith("hidden/bias"))
    ]["held_fraction"] == 0


# torch: jit_compile=True (torch.compile) takes 90 s to compile here; the
# CSV test below runs the monitor under it.
@pytest.mark.parametrize("jit_compile", [
    pytest.param(True, marks=pytest.mark.skipif(
        BACKEND == "torch", reason="torch.compile: slow, see the CSV test")),
    "auto"])
def test_monitor_leaves_training_alone(jit_compile):
    results = []
    for callbacks in ([], [StepMonitor(every=1, per_layer=True)]):
        model, _ = _fit(AdaShift(keep_num=2), callbacks, epochs=2,
                        jit_compile=jit_compile)
        results.append(model.get_weights() + [
            keras.ops.convert_to_numpy(v) for v in model.optimizer.variables])
    for without, with_ in zip(*results):
        np.testing.assert_array_equal(without, with_)
    assert results[1][0].shape == (8, 6)


def test_runs_under_jit_compile_and_records_in_history_and_csv(tmp_path):
    path = tmp_path / "log.csv"
    monitor = StepMonitor(every=2)
    _, history = _fit(AdaShift(keep_num=2), [
        monitor, keras.callbacks.CSVLogger(str(path))], epochs=3,
        jit_compile=True)
    for name in NAMES + ("held_fraction",):
        values = history.history[f"step/{name}"]
        assert len(values) == 3 and all(math.isfinite(v) for v in values)
    header = path.read_text().splitlines()[0].split(",")
    assert {f"step/{name}" for name in NAMES} <= set(header)
    assert monitor.latest["step/update_ratio"] > 0
    # Nothing that refers to the model outlives the fit.
    assert monitor._variables is None and monitor._before is None
    assert monitor._optimizer is None


class _GradientRun:
    """A custom loop on one variable with given gradients."""

    def __init__(self, optimizer):
        self.variable = keras.Variable(np.full((4,), 0.5, "float32"),
                                       name="theta")
        self.optimizer = optimizer
        optimizer.build([self.variable])

    def run(self, monitor, gradients, loss=None):
        logs = []
        for g in gradients:
            monitor.begin([self.variable], self.optimizer)
            self.optimizer.apply_gradients(
                [(keras.ops.convert_to_tensor(g, "float32"), self.variable)])
            logs.append(monitor.end(loss=loss))
        return logs


def _spike_gradients():
    # Quiet, then 1e4 times larger: AdaShift's v is built from the quiet
    # ones, so its step is 1e4 · lr; Adam's v holds the large one.
    return [np.full((4,), 1e-4)] * 6 + [np.full((4,), 1.0)] * 2


def test_spike_warns_in_a_custom_loop():
    monitor = StepMonitor(every=1)
    run = _GradientRun(AdaShift(1e-3, keep_num=1, beta_1=0.0,
                                spatial_op="none"))
    with pytest.warns(StepMonitorWarning) as caught:
        logs = run.run(monitor, _spike_gradients())
    messages = [str(w.message) for w in caught
                if w.category is StepMonitorWarning]
    assert len(messages) == 1  # once per kind
    assert "spike" in monitor.messages
    text = messages[0]
    assert "theta (316)" in text  # the variable's layer: its path here
    assert "Troubleshooting" in text and "step_bound" in text
    # The number: the step of 1e4 · lr against lr / sqrt(1 - 0.999).
    assert logs[6]["step/max_over_bound"] == pytest.approx(
        1e4 * math.sqrt(0.001), rel=1e-3)
    assert f"{logs[6]['step/max_over_bound']:.3g}" in text
    assert logs[5]["step/max_over_bound"] < 10
    assert logs[6]["step/held_fraction"] == 0 and logs[0][
        "step/held_fraction"] == 1


def test_spike_is_silent_for_adam_and_for_a_bounded_adashift():
    for optimizer in (keras.optimizers.Adam(1e-3, beta_1=0.0),
                      AdaShift(1e-3, keep_num=1, beta_1=0.0,
                               spatial_op="none", step_bound=1.0)):
        monitor = StepMonitor(every=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error", StepMonitorWarning)
            logs = _GradientRun(optimizer).run(monitor, _spike_gradients())
        assert monitor.messages == {}
        assert max(log["step/max_over_bound"] for log in logs) <= 1.0 + 1e-5


def test_spike_warns_in_fit_and_names_the_layer():
    # Gradients that jump 1e4 times after a quiet stretch, in fit: inputs
    # and targets, and so the gradients, grow 1e4 times at batch 6.
    x, y = _data(samples=64)
    x, y = x * 1e-4, y * 1e-4
    x[48:] *= 1e4
    y[48:] *= 1e4
    monitor = StepMonitor(every=1, per_layer=True)
    with pytest.warns(StepMonitorWarning, match="head") as caught:
        _fit(AdaShift(1e-3, keep_num=1, beta_1=0.0, spatial_op="none"),
             [monitor], x=x, y=y)
    assert list(monitor.messages) == ["spike"]
    assert len([w for w in caught if w.category is StepMonitorWarning]) == 1


def test_stall_warns_at_a_tiny_learning_rate():
    monitor = StepMonitor(every=2)
    with pytest.warns(StepMonitorWarning, match="stalled") as caught:
        _fit(keras.optimizers.Adam(1e-9), [monitor], epochs=2)
    assert list(monitor.messages) == ["stall"]
    (text,) = [str(w.message) for w in caught
               if w.category is StepMonitorWarning]
    assert "update/weight ratio" in text and "Learning is slow" in text
    assert monitor.latest["step/update_ratio"] < 1e-6


def test_hold_warns_when_no_gradient_ever_arrives():
    # Zero inputs and no biases: every gradient is exactly 0, so AdaShift
    # holds every block; its stall is the hold, reported once as such.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)),
                              keras.layers.Dense(2, use_bias=False)])
    model.compile(AdaShift(keep_num=2), "mse")
    monitor = StepMonitor(every=1)
    x = np.zeros((40, 4), "float32")
    with pytest.warns(StepMonitorWarning, match="on hold") as caught:
        model.fit(x, np.ones((40, 2), "float32"), batch_size=4, verbose=0,
                  callbacks=[monitor])
    assert list(monitor.messages) == ["hold"]
    (text,) = [str(w.message) for w in caught
               if w.category is StepMonitorWarning]
    assert "keep_num=2" in text
    assert monitor.latest["step/held_fraction"] == 1.0


@pytest.mark.parametrize("optimizer", [
    lambda: keras.optimizers.Adam(), lambda: AdaShift()],
    ids=["adam", "adashift"])
def test_silent_on_a_healthy_run(optimizer):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x[:512] / 16).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((64,)), keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer(), "sparse_categorical_crossentropy")
    monitor = StepMonitor(every=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StepMonitorWarning)
        history = model.fit(x, y[:512], batch_size=32, epochs=3, verbose=0,
                            callbacks=[monitor])
    assert monitor.messages == {}
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_warnings_are_per_fit():
    monitor = StepMonitor(every=2)
    model = None
    for _ in range(2):
        with pytest.warns(StepMonitorWarning, match="stalled"):
            model, _ = _fit(keras.optimizers.Adam(1e-9), [monitor], epochs=2)
    assert model is not None


def test_every_must_be_positive():
    with pytest.raises(ValueError, match="every"):
        StepMonitor(every=0)


def test_lazy_export():
    import keras_adashift

    assert keras_adashift.StepMonitor is StepMonitor
    assert BACKEND in ("tensorflow", "jax", "torch")
