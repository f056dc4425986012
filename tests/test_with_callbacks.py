"""Keras callbacks with AdaShift: the learning-rate callbacks change the rate
the steps use, a checkpoint or backup resumed mid-window trains on as if
never stopped, and TensorBoard, CSVLogger and EarlyStopping record and restore
what the training did.
"""

import csv

import keras
import numpy as np
import pytest

from keras_adashift import AdaShift
from models import tiny_model

pytestmark = pytest.mark.slow

LR, BATCH, EXAMPLES = 0.02, 8, 32
STEPS = EXAMPLES // BATCH  # per epoch
# More than the steps of one epoch: every epoch boundary is mid-window.
KEEP_NUM = 6


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(EXAMPLES, 4)).astype("float32")
    y = (np.tanh(x @ rng.normal(size=(4, 2)))).astype("float32")
    return x, y


def compiled(model=None):
    model = model or tiny_model()
    model.compile(optimizer=AdaShift(learning_rate=LR, keep_num=KEEP_NUM),
                  loss="mse")
    return model


def fit(model, data, epochs, **kwargs):
    x, y = data
    return model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False,
                     verbose=0, **kwargs)


def by_hand(initial, data, epoch_rates, batches=None):
    """train_on_batch over the epochs, setting the rate before each epoch;
    `batches`: the batch indices of each epoch (default: all)."""
    x, y = data
    model = compiled()
    model.set_weights(initial)
    for epoch, rate in enumerate(epoch_rates):
        model.optimizer.learning_rate.assign(rate)
        for b in (range(STEPS) if batches is None else batches[epoch]):
            sl = slice(b * BATCH, (b + 1) * BATCH)
            model.train_on_batch(x[sl], y[sl])
    return model.get_weights()


def assert_weights_close(actual, expected, rtol=1e-5, atol=1e-6):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


def assert_differ(actual, other):
    assert any(not np.allclose(a, o) for a, o in zip(actual, other))


def test_reduce_lr_on_plateau_lowers_the_rate_the_steps_use(data):
    model = compiled()
    initial = model.get_weights()
    # min_delta above any loss: no epoch after the first improves, so with
    # patience 1 the rate halves at the end of epochs 2, 3 and 4.
    reduce = keras.callbacks.ReduceLROnPlateau(
        monitor="loss", factor=0.5, patience=1, min_delta=1e9, verbose=0)
    history = fit(model, data, 4, callbacks=[reduce])
    rates = [LR, LR, LR / 2, LR / 4]  # the rate of each epoch's steps
    np.testing.assert_allclose(history.history["learning_rate"], rates,
                               rtol=1e-6)
    np.testing.assert_allclose(float(model.optimizer.learning_rate), LR / 8,
                               rtol=1e-6)
    assert_weights_close(model.get_weights(), by_hand(initial, data, rates))
    assert_differ(model.get_weights(), by_hand(initial, data, [LR] * 4))


def schedule(epoch, rate):
    return LR * 0.5**epoch


def test_learning_rate_scheduler_sets_the_rate_of_each_epoch(data):
    model = compiled()
    initial = model.get_weights()
    history = fit(model, data, 3, callbacks=[
        keras.callbacks.LearningRateScheduler(schedule)])
    rates = [schedule(e, None) for e in range(3)]
    np.testing.assert_allclose(history.history["learning_rate"], rates,
                               rtol=1e-6)
    assert_weights_close(model.get_weights(), by_hand(initial, data, rates))
    assert_differ(model.get_weights(), by_hand(initial, data, [LR] * 3))


def test_model_checkpoint_resume_equals_uninterrupted(data, tmp_path):
    model = compiled()
    initial = model.get_weights()
    path = str(tmp_path / "epoch{epoch}.keras")
    fit(model, data, 2, callbacks=[keras.callbacks.ModelCheckpoint(path)])
    resumed = keras.models.load_model(str(tmp_path / "epoch2.keras"))
    assert isinstance(resumed.optimizer, AdaShift)
    # 8 steps into a window of 6 plus 1: the window is mid-cycle.
    np.testing.assert_array_equal(np.array(resumed.optimizer._step_counts),
                                  [2 * STEPS] * 4)
    fit(resumed, data, 4, initial_epoch=2)

    uninterrupted = compiled()
    uninterrupted.set_weights(initial)
    fit(uninterrupted, data, 4)
    assert_weights_close(resumed.get_weights(), uninterrupted.get_weights())
    for a, b in zip(resumed.optimizer.variables,
                    uninterrupted.optimizer.variables):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5,
                                   atol=1e-6, err_msg=b.path)


class Interrupt(Exception):
    pass


class InterruptAt(keras.callbacks.Callback):
    """Raises before batch `batch` of epoch `epoch`."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.at, self.epoch = (epoch, batch), None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise Interrupt


def test_backup_and_restore_after_mid_epoch_interrupt_equals_uninterrupted(
        data, tmp_path):
    model = compiled()
    initial = model.get_weights()
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(Interrupt):
        fit(model, data, 3, callbacks=[backup, InterruptAt(1, 2)])
    # A new process would build the model afresh: start from other weights.
    rerun = compiled()
    fit(rerun, data, 3, callbacks=[backup])
    assert_weights_close(rerun.get_weights(),
                         by_hand(initial, data, [LR] * 3))


def test_backup_and_restore_every_two_batches_replays_the_epoch(
        data, tmp_path):
    # Saved mid-epoch (after batch 1 of epoch 1), Keras restarts that epoch
    # from its first batch: batches 0 and 1 of epoch 1 are seen twice, from
    # the optimizer state the backup holds.
    model = compiled()
    initial = model.get_weights()
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"),
                                              save_freq=2)
    with pytest.raises(Interrupt):
        fit(model, data, 3, callbacks=[backup, InterruptAt(1, 2)])
    rerun = compiled()
    fit(rerun, data, 3, callbacks=[backup])
    every = list(range(STEPS))
    expected = by_hand(initial, data, [LR] * 4,
                       batches=[every, [0, 1], every, every])
    assert_weights_close(rerun.get_weights(), expected)


def test_tensorboard_writes_the_learning_rate_and_weights(data, tmp_path):
    tf = pytest.importorskip("tensorflow")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing import event_accumulator

    model = compiled()
    fit(model, data, 3, callbacks=[
        keras.callbacks.LearningRateScheduler(schedule),
        keras.callbacks.TensorBoard(str(tmp_path / "logs"), histogram_freq=1,
                                    update_freq="batch")])
    events = event_accumulator.EventAccumulator(
        str(tmp_path / "logs" / "train"),
        size_guidance={event_accumulator.TENSORS: 0})
    events.Reload()

    def values(tag):
        return [(e.step, tf.make_ndarray(e.tensor_proto))
                for e in events.Tensors(tag)]

    rates = values("epoch_learning_rate")
    assert [s for s, _ in rates] == [0, 1, 2]
    np.testing.assert_allclose([float(v) for _, v in rates],
                               [schedule(e, None) for e in range(3)],
                               rtol=1e-6)
    assert len(values("batch_loss")) == 3 * STEPS
    # The last histogram of each weight spans that weight's final values.
    for weight in model.weights:
        tag = weight.path.replace(":", "_") + "/histogram"
        histograms = values(tag)
        assert [s for s, _ in histograms] == [0, 1, 2], tag
        buckets = histograms[-1][1]
        final = np.array(weight)
        np.testing.assert_allclose(
            [buckets[0, 0], buckets[-1, 1]], [final.min(), final.max()],
            rtol=1e-5, atol=1e-6, err_msg=tag)
        assert buckets[:, 2].sum() == final.size


def test_csv_logger_records_each_epoch(data, tmp_path):
    model = compiled()
    path = tmp_path / "log.csv"
    history = fit(model, data, 3, callbacks=[
        keras.callbacks.LearningRateScheduler(schedule),
        keras.callbacks.CSVLogger(str(path))])
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    np.testing.assert_allclose([float(r["loss"]) for r in rows],
                               history.history["loss"], rtol=1e-6)
    np.testing.assert_allclose([float(r["learning_rate"]) for r in rows],
                               [schedule(e, None) for e in range(3)],
                               rtol=1e-6)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_early_stopping_restores_the_best_weights(data):
    x, y = data
    model = compiled()
    # The same start on every backend (their random initialisers differ).
    rng = np.random.default_rng(5)
    initial = [rng.normal(size=w.shape).astype("float32") * 0.5
               for w in model.get_weights()]
    model.set_weights(initial)
    # Validation targets a third of the way from 0 to the training ones:
    # the validation loss falls while the outputs approach them, then
    # rises as training carries them on.
    xv, yv = x[:16], y[:16] / 3
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=2,
                                         restore_best_weights=True)
    history = fit(model, data, 20, validation_data=(xv, yv),
                  callbacks=[stop])
    val = history.history["val_loss"]
    best = int(np.argmin(val))
    assert 0 < best and stop.stopped_epoch == best + 2 < 19
    assert_weights_close(model.get_weights(),
                         by_hand(initial, data, [LR] * (best + 1)))
    np.testing.assert_allclose(
        model.evaluate(xv, yv, batch_size=16, verbose=0), val[best],
        rtol=1e-5)
