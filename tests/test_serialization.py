"""Saving and restoring: configs, .keras files, BackupAndRestore, TF
checkpoints, and state saved under other settings or an older format.

Resumed runs are compared with uninterrupted ones bit for bit: a window
restored in the wrong order, or not at all, changes every later step. The
layout of the saved state: tests/test_state_layout.py; loading after
`import keras_adashift` before Keras: tests/test_import.py.
"""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import keras
from keras import ops

from conftest import BACKEND, only_on
from keras_adashift import AdaShift
from models import batches
from models import tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _schedule():
    return keras.optimizers.schedules.ExponentialDecay(
        0.03, decay_steps=4, decay_rate=0.7
    )


def _full_kwargs(clip):
    kwargs = dict(
        learning_rate=_schedule(),
        keep_num=7,
        beta_1=0.5,
        beta_2=0.95,
        epsilon=1e-6,
        spatial_op="mean",
        spatial_axes=(0, -1),
        window_dtype="bfloat16",
        weight_decay=0.01,
        use_ema=True,
        ema_momentum=0.9,
        ema_overwrite_frequency=3,
        loss_scale_factor=8.0,
        gradient_accumulation_steps=2,
        step_bound=2.0,
        name="shift",
    )
    kwargs[clip] = 1.5
    return kwargs


_CLIPS = ["clipnorm", "clipvalue", "global_clipnorm"]


@pytest.mark.parametrize("clip", _CLIPS)
def test_get_config_from_config_round_trip(clip):
    optimizer = AdaShift(**_full_kwargs(clip))
    config = optimizer.get_config()
    expected = {
        "name": "shift",
        "keep_num": 7,
        "beta_1": 0.5,
        "beta_2": 0.95,
        "epsilon": 1e-6,
        "spatial_op": "mean",
        "spatial_axes": (0, -1),
        "window_dtype": "bfloat16",
        "weight_decay": 0.01,
        "clipnorm": None,
        "clipvalue": None,
        "global_clipnorm": None,
        "use_ema": True,
        "ema_momentum": 0.9,
        "ema_overwrite_frequency": 3,
        "loss_scale_factor": 8.0,
        "gradient_accumulation_steps": 2,
        "step_bound": 2.0,
    }
    expected[clip] = 1.5
    lr_config = config.pop("learning_rate")
    assert config == expected
    assert lr_config["class_name"] == "ExponentialDecay"
    assert lr_config["config"]["initial_learning_rate"] == 0.03
    assert lr_config["config"]["decay_rate"] == 0.7

    restored = AdaShift.from_config(optimizer.get_config())
    assert isinstance(restored, AdaShift)
    assert restored.get_config() == optimizer.get_config()
    assert isinstance(
        restored._learning_rate,
        keras.optimizers.schedules.ExponentialDecay,
    )


def test_config_round_trip_with_float_learning_rate():
    optimizer = AdaShift(learning_rate=0.02, keep_num=4, spatial_axes=1)
    config = optimizer.get_config()
    assert config["learning_rate"] == pytest.approx(0.02)
    assert config["spatial_axes"] == (1,)
    restored = AdaShift.from_config(config)
    assert restored.get_config() == config


@pytest.mark.parametrize("clip", _CLIPS)
def test_serialize_deserialize_through_json(clip):
    assert keras.saving.get_registered_name(AdaShift) == (
        "keras_adashift>AdaShift"
    )
    optimizer = AdaShift(**_full_kwargs(clip))
    text = json.dumps(keras.optimizers.serialize(optimizer))
    restored = keras.optimizers.deserialize(json.loads(text))
    assert type(restored) is AdaShift
    # JSON turns tuples into lists; the restored optimizer has a tuple again.
    assert restored.spatial_axes == (0, -1)
    assert isinstance(restored.spatial_axes, tuple)
    assert restored.window_dtype == "bfloat16"
    assert restored.get_config() == optimizer.get_config()


# --------------------------------------------------------------------------
# Saving a model with its optimizer


def _optimizer_state(optimizer):
    return [
        (v.path, ops.convert_to_numpy(v).copy()) for v in optimizer.variables
    ]


_KINDS = (
    "step_counts",
    "iteration",
    "learning_rate",
    "bias_correction",
    "average",
    "square_window",  # before "window", which it ends with
    "window",
    "momentum",
    "velocity",
)


def _kind(path):
    return next(k for k in _KINDS if path.endswith(k))


def _assert_same_state(a, b):
    # Positional, like Keras's format. Paths are not compared whole: a model
    # rebuilt by load_model drops the Sequential's scope from variable paths
    # (Keras does the same to Adam's slots).
    assert [_kind(p) for p, _ in a] == [_kind(p) for p, _ in b]
    for (path, x), (_, y) in zip(a, b):
        np.testing.assert_array_equal(x, y, err_msg=path)


def _compiled_model(**opt_kwargs):
    model = tiny_model()
    model.compile(optimizer=AdaShift(**opt_kwargs), loss="mse")
    return model


def test_load_model_restores_adashift_without_custom_objects(tmp_path):
    model = _compiled_model(
        learning_rate=_schedule(), keep_num=3, spatial_axes=(0,)
    )
    x, y = batches(5)
    for xb, yb in zip(x, y):
        model.train_on_batch(xb, yb)
    path = str(tmp_path / "model.keras")
    model.save(path)

    loaded = keras.models.load_model(path, safe_mode=True)
    assert type(loaded.optimizer) is AdaShift
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert int(ops.convert_to_numpy(loaded.optimizer.iterations)) == 5
    _assert_same_state(
        _optimizer_state(loaded.optimizer), _optimizer_state(model.optimizer)
    )
    for w0, w1 in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(w1, w0)


_RESUME_SCRIPT = textwrap.dedent(
    """
    import sys

    import numpy as np
    import keras
    from keras import ops

    import keras_adashift  # registers AdaShift; no custom_objects below

    model_path, data_path, out_path = sys.argv[1:]
    model = keras.models.load_model(model_path)
    assert type(model.optimizer) is keras_adashift.AdaShift
    data = np.load(data_path)
    for x, y in zip(data["x"], data["y"]):
        model.train_on_batch(x, y)
    arrays = {f"w{i}": w for i, w in enumerate(model.get_weights())}
    for i, v in enumerate(model.optimizer.variables):
        arrays[f"o{i}"] = ops.convert_to_numpy(v)
    np.savez(out_path, **arrays)
    """
)


@pytest.mark.slow
def test_resume_from_keras_file_in_a_fresh_process(tmp_path):
    # keep_num 5, saved after 7 steps: the ring buffer has wrapped partway,
    # so the slot order and both windows must survive.
    model = _compiled_model(learning_rate=0.05, keep_num=5, beta_1=0.9)
    x, y = batches(12)
    for xb, yb in zip(x[:7], y[:7]):
        model.train_on_batch(xb, yb)
    model_path = str(tmp_path / "mid_window.keras")
    model.save(model_path)
    data_path = str(tmp_path / "rest.npz")
    np.savez(data_path, x=x[7:], y=y[7:])

    for xb, yb in zip(x[7:], y[7:]):
        model.train_on_batch(xb, yb)

    out_path = str(tmp_path / "resumed.npz")
    env = dict(os.environ, KERAS_BACKEND=BACKEND)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [REPO, env.get("PYTHONPATH")] if p
    )
    result = subprocess.run(
        [sys.executable, "-c", _RESUME_SCRIPT, model_path, data_path, out_path],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = np.load(out_path)
    weights = model.get_weights()
    for i, w in enumerate(weights):
        assert np.array_equal(resumed[f"w{i}"], w), f"weight {i}"
    for i, v in enumerate(model.optimizer.variables):
        assert np.array_equal(
            resumed[f"o{i}"], ops.convert_to_numpy(v)
        ), v.path


class _Interrupt(Exception):
    pass


class _InterruptAt(keras.callbacks.Callback):
    def __init__(self, epoch, batch):
        super().__init__()
        self.at = (epoch, batch)
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise _Interrupt()


@pytest.mark.slow
def test_backup_and_restore_resumes_an_interrupted_fit(tmp_path):
    x, y = batches(4)
    x, y = x.reshape(-1, 4), y.reshape(-1, 2)  # 4 batches of 4 per epoch
    init = tiny_model().get_weights()
    kwargs = dict(learning_rate=0.05, keep_num=3, beta_1=0.9)
    fit = dict(batch_size=4, epochs=4, shuffle=False, verbose=0)

    def fresh():
        model = _compiled_model(**kwargs)
        model.set_weights(init)
        return model

    uninterrupted = fresh()
    uninterrupted.fit(x, y, **fit)

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    interrupted = fresh()
    with pytest.raises(_Interrupt):
        # Mid-epoch 3: the backup from the end of epoch 2 is the restore point.
        interrupted.fit(x, y, callbacks=[backup, _InterruptAt(2, 1)], **fit)

    # A new model and an unbuilt optimizer: everything must come from disk.
    resumed = fresh()
    resumed.fit(x, y, callbacks=[backup], **fit)
    assert int(ops.convert_to_numpy(resumed.optimizer.iterations)) == 16
    for w0, w1 in zip(init, uninterrupted.get_weights()):
        assert not np.allclose(w0, w1)
    for w0, w1 in zip(uninterrupted.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(w1, w0)
    _assert_same_state(
        _optimizer_state(resumed.optimizer),
        _optimizer_state(uninterrupted.optimizer),
    )


@only_on("tensorflow")
def test_tf_train_checkpoint_resumes(tmp_path):
    import tensorflow as tf

    kwargs = dict(learning_rate=0.05, keep_num=3, beta_1=0.9)
    x, y = batches(9)
    model = _compiled_model(**kwargs)
    init = model.get_weights()
    for xb, yb in zip(x[:5], y[:5]):
        model.train_on_batch(xb, yb)
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(
        str(tmp_path / "ckpt")
    )
    for xb, yb in zip(x[5:], y[5:]):
        model.train_on_batch(xb, yb)

    restored = _compiled_model(**kwargs)
    restored.set_weights(init)
    restored.optimizer.build(restored.trainable_variables)
    status = tf.train.Checkpoint(
        model=restored, optimizer=restored.optimizer
    ).restore(path)
    status.assert_existing_objects_matched()
    assert int(restored.optimizer.iterations.numpy()) == 5
    for xb, yb in zip(x[5:], y[5:]):
        restored.train_on_batch(xb, yb)
    for w0, w1 in zip(model.get_weights(), restored.get_weights()):
        np.testing.assert_array_equal(w1, w0)
    _assert_same_state(
        _optimizer_state(restored.optimizer), _optimizer_state(model.optimizer)
    )


# --------------------------------------------------------------------------
# Loading optimizer state saved under other settings (Keras's behaviour,
# pinned so that a change shows up)


def _trained_weights_file(tmp_path, **opt_kwargs):
    model = _compiled_model(**opt_kwargs)
    x, y = batches(4)
    for xb, yb in zip(x, y):
        model.train_on_batch(xb, yb)
    path = str(tmp_path / "saved.weights.h5")
    model.save_weights(path)
    return path, model.get_weights()


def _assert_fresh(optimizer):
    """Nothing was loaded: the step count and every slot as built."""
    assert int(ops.convert_to_numpy(optimizer.iterations)) == 0
    for v in optimizer.variables[2:]:
        assert not np.any(ops.convert_to_numpy(v)), v.path


@pytest.mark.parametrize(
    "saved, loading, match",
    [
        (dict(keep_num=3), dict(keep_num=5), "shape"),
        # The saved record names spatial_axes before any shape is compared.
        (dict(spatial_axes=0), dict(spatial_axes=None), "spatial_axes"),
        # Same shapes, other meaning: max(g²) state is not mean(g²) state.
        (dict(spatial_op="max"), dict(spatial_op="mean"), "spatial_op"),
    ],
    ids=["keep_num", "spatial_axes", "spatial_op"],
)
def test_loading_state_saved_with_other_settings_fails_before_assigning(
    tmp_path, saved, loading, match
):
    path, _ = _trained_weights_file(tmp_path, **saved)
    model = _compiled_model(**loading)
    model.optimizer.build(model.trainable_variables)
    with pytest.raises(ValueError, match=match):
        model.load_weights(path)
    _assert_fresh(model.optimizer)
    # skip_mismatch: Keras turns the error into a warning; still all or
    # nothing.
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        model.load_weights(path, skip_mismatch=True)
    _assert_fresh(model.optimizer)


def test_state_saved_over_other_axes_with_the_same_shapes_is_refused(
        tmp_path):
    # Square kernels: blocks over rows and over columns have the same
    # shapes, so only the saved record can tell them apart.
    def square(spatial_axes):
        model = tiny_model(hidden=4, outputs=4)
        model.compile(optimizer=AdaShift(keep_num=3,
                                         spatial_axes=spatial_axes),
                      loss="mse")
        return model

    model = square(0)
    rng = np.random.default_rng(0)
    for _ in range(4):
        model.train_on_batch(rng.normal(size=(4, 4)), rng.normal(size=(4, 4)))
    path = str(tmp_path / "rows.weights.h5")
    model.save_weights(path)
    other = square(1)
    other.optimizer.build(other.trainable_variables)
    assert [tuple(v.shape) for v in other.optimizer.variables] == [
        tuple(v.shape) for v in model.optimizer.variables]
    with pytest.raises(ValueError, match="spatial_axes=\\[0\\] vs \\[1\\]"):
        other.load_weights(path)
    _assert_fresh(other.optimizer)


def test_a_0_3_0_file_without_spatial_axes_in_its_record_loads_its_state(
        tmp_path):
    path = os.path.join(REPO, "tests", "data", "adashift_0.3.0.weights.h5")
    model = _compiled_model(keep_num=3)
    model.optimizer.build(model.trainable_variables)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not "starts afresh"
        model.load_weights(path)
    optimizer = model.optimizer
    assert int(ops.convert_to_numpy(optimizer.iterations)) == 4
    np.testing.assert_array_equal(
        ops.convert_to_numpy(optimizer._step_counts), 4)
    if BACKEND == "tensorflow":
        # The file's backend, init and steps: the state it holds is the one
        # this version reaches.
        keras.utils.clear_session(free_memory=False)
        keras.utils.set_random_seed(0)
        fresh = _compiled_model(keep_num=3)
        x, y = batches(4)
        for xb, yb in zip(x, y):
            fresh.train_on_batch(xb, yb)
        for a, b in zip(optimizer.variables, fresh.optimizer.variables):
            np.testing.assert_allclose(ops.convert_to_numpy(a),
                                       ops.convert_to_numpy(b), rtol=1e-6,
                                       err_msg=b.path)


def test_loading_state_with_another_variable_count_warns_and_resets(tmp_path):
    path, saved_weights = _trained_weights_file(tmp_path, keep_num=3)
    model = _compiled_model(keep_num=3, use_ema=True)
    model.optimizer.build(model.trainable_variables)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_weights(path)
    assert any(
        "Skipping variable loading for optimizer" in str(w.message)
        for w in caught
    )
    # The model's weights load; the optimizer keeps its fresh state.
    for w0, w1 in zip(saved_weights, model.get_weights()):
        np.testing.assert_array_equal(w1, w0)
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 0
    for v in model.optimizer.variables:
        if v.path.endswith("_window"):
            assert not np.any(ops.convert_to_numpy(v)), v.path


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0"])
def test_a_file_of_an_older_state_format_loads_its_weights_and_says_why(
        version):
    path = os.path.join(REPO, "tests", "data",
                        f"adashift_{version}.weights.h5")
    model = _compiled_model(keep_num=3)
    model.optimizer.build(model.trainable_variables)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_weights(path)
    messages = [str(w.message) for w in caught]
    assert any(version in m and "starts afresh" in m for m in messages), (
        messages)
    _assert_fresh(model.optimizer)
    assert any(np.any(w) for w in model.get_weights())
    # Training goes on from the loaded weights without a blow-up.
    x, y = batches(6)
    before = model.get_weights()
    for xb, yb in zip(x, y):
        model.train_on_batch(xb, yb)
    for w0, w1 in zip(before, model.get_weights()):
        assert np.abs(w1 - w0).max() < 1.0


@pytest.mark.parametrize("name", ["adashift", "AdaShift"])
def test_a_model_compiled_by_name_loads_with_its_state(tmp_path, name):
    model = tiny_model()
    model.compile(optimizer=name, loss="mse")
    x, y = batches(3)
    for xb, yb in zip(x, y):
        model.train_on_batch(xb, yb)
    path = str(tmp_path / "named.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer) is AdaShift
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(ops.convert_to_numpy(b),
                                      ops.convert_to_numpy(a))
