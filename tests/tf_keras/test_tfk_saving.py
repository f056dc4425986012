"""Saving and resuming with the tf_keras class: `.keras`, `.h5`, SavedModel,
`tf.train.Checkpoint` and `BackupAndRestore`, each saved mid-window and
resumed to the weights of an uninterrupted run; a SavedModel's
`serving_default` signature in a fresh process; load_model without
custom_objects."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from keras_adashift.tf_keras import AdaShift
from tfk_helpers import data
from tfk_helpers import tiny_model

KEEP = 5  # more than the steps before the save: it is resumed mid-window
BEFORE, AFTER, BATCH = 3, 5, 8
REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _batches():
    x, y = data((BEFORE + AFTER) * BATCH)
    return [(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH])
            for i in range(BEFORE + AFTER)]


def _compiled(seed=0, **kwargs):
    model = tiny_model(seed=seed)
    model.compile(optimizer=AdaShift(keep_num=KEEP, **kwargs), loss="mse")
    return model


def _train(model, batches):
    for xb, yb in batches:
        model.train_on_batch(xb, yb)


@pytest.fixture(scope="module")
def uninterrupted():
    tf_keras.utils.set_random_seed(0)
    model = _compiled()
    _train(model, _batches())
    return model.get_weights()


def _assert_resumed(model, expected):
    assert type(model.optimizer) is AdaShift
    assert int(model.optimizer.iterations) == BEFORE + AFTER
    np.testing.assert_array_equal(model.optimizer._step_counts.numpy(),
                                  BEFORE + AFTER)
    for got, want in zip(model.get_weights(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fmt", ["keras", "h5", "tf"])
def test_load_model_resumes_mid_window(tmp_path, uninterrupted, fmt):
    model = _compiled()
    batches = _batches()
    _train(model, batches[:BEFORE])
    path = str(tmp_path / ("model" if fmt == "tf" else f"model.{fmt}"))
    model.save(path, save_format=fmt if fmt == "tf" else None)
    # Without custom_objects: importing keras_adashift.tf_keras registered
    # the class.
    loaded = tf_keras.models.load_model(path)
    if fmt == "tf":
        # tf_keras 2.21 does not restore an optimizer's state from a
        # SavedModel in load_model (its Adam neither); the SavedModel's
        # checkpoint holds it, and load_weights restores it by object.
        assert int(loaded.optimizer.iterations) == 0
        loaded.optimizer.build(loaded.trainable_variables)
        loaded.load_weights(
            os.path.join(path, "variables", "variables")).expect_partial()
    assert int(loaded.optimizer.iterations) == BEFORE
    # The window holds the three gradients, nothing moved yet: the state
    # came back, not a fresh optimizer.
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    saved = [v.numpy() for v in model.optimizer.variables]
    got = [v.numpy() for v in loaded.optimizer.variables]
    assert len(got) == len(saved)
    for a, b in zip(got, saved):
        np.testing.assert_array_equal(a, b)
    _train(loaded, batches[BEFORE:])
    _assert_resumed(loaded, uninterrupted)


def test_model_compiled_by_name_saves_and_loads(tmp_path):
    model = tiny_model()
    model.compile(optimizer="adashift", loss="mse")
    _train(model, _batches()[:2])
    path = str(tmp_path / "named.keras")
    model.save(path)
    loaded = tf_keras.models.load_model(path)
    assert type(loaded.optimizer) is AdaShift
    assert int(loaded.optimizer.iterations) == 2


def test_checkpoint_resumes_mid_window(tmp_path, uninterrupted):
    model = _compiled()
    batches = _batches()
    _train(model, batches[:BEFORE])
    prefix = tf.train.Checkpoint(model=model,
                                 optimizer=model.optimizer).save(
        str(tmp_path / "ckpt"))
    fresh = _compiled(seed=1)  # other initial weights
    # Restored before the optimizer is built: the slots are restored as
    # build creates them.
    tf.train.Checkpoint(model=fresh, optimizer=fresh.optimizer).restore(
        prefix).assert_existing_objects_matched()
    _train(fresh, batches[BEFORE:])
    _assert_resumed(fresh, uninterrupted)


class _Interrupt(tf_keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == BEFORE:
            raise RuntimeError("interrupted")


def test_backup_and_restore_resumes_mid_window(tmp_path):
    # One batch per epoch, the same one (a resumed fit starts its data
    # afresh); BackupAndRestore saves at each epoch's end.
    x, y = _batches()[0]
    epochs = BEFORE + AFTER

    def fit(model, *callbacks):
        model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False,
                  verbose=0, callbacks=list(callbacks))

    reference = _compiled()
    fit(reference)
    backup = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(_compiled(), tf_keras.callbacks.BackupAndRestore(backup),
            _Interrupt())
    again = _compiled(seed=1)  # other initial weights, then restored
    epochs_run = []
    counter = tf_keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: epochs_run.append(epoch))
    fit(again, tf_keras.callbacks.BackupAndRestore(backup), counter)
    assert epochs_run == list(range(BEFORE, epochs))
    _assert_resumed(again, reference.get_weights())


def test_other_settings_are_refused_before_anything_loads(tmp_path):
    model = _compiled()
    _train(model, _batches()[:2])
    path = str(tmp_path / "model.keras")
    model.save(path)
    other = tiny_model()
    other.compile(optimizer=AdaShift(keep_num=KEEP, spatial_op="none"),
                  loss="mse")
    other.optimizer.build(other.trainable_variables)
    before = [v.numpy() for v in other.optimizer.variables]
    with pytest.raises(ValueError, match="other settings"):
        other.optimizer.load_own_variables(_optimizer_store(path))
    for a, b in zip(before, other.optimizer.variables):
        np.testing.assert_array_equal(a, b.numpy())


def _optimizer_store(path):
    """The optimizer's saved arrays of a `.keras` file, as a dict."""
    import io
    import zipfile

    import h5py

    with zipfile.ZipFile(path) as archive:
        weights = io.BytesIO(archive.read("model.weights.h5"))
    with h5py.File(weights, "r") as f:
        group = f["optimizer"]["vars"]
        return {k: np.asarray(group[k]) for k in group}


_SERVE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf

    loaded = tf.saved_model.load(sys.argv[1])
    serve = loaded.signatures["serving_default"]
    x = np.load(sys.argv[2])
    out = serve(tf.constant(x))
    print(json.dumps({k: v.numpy().tolist() for k, v in out.items()}))
    """
)


@pytest.mark.slow
def test_serving_default_gives_predict(tmp_path):
    model = _compiled()
    _train(model, _batches())
    export = str(tmp_path / "serving" / "1")
    model.save(export, save_format="tf")  # what a TFX Trainer writes
    x = data(5, seed=3)[0]
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    # A fresh process that imports neither Keras nor keras_adashift.
    result = subprocess.run(
        [sys.executable, "-c", _SERVE, export, str(tmp_path / "x.npy")],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (served,) = json.loads(result.stdout.strip().splitlines()[-1]).values()
    np.testing.assert_allclose(np.array(served), model.predict(x, verbose=0),
                               rtol=1e-6, atol=1e-6)
