"""KerasTuner searches with AdaShift: hyperparameters reach the optimizer of
each trial, and a compiled-in `optimizer=AdaShift(...)` is copied into each
trial; the best model holds the weights that training with those settings
gives.
"""

import keras
import numpy as np
import pytest

from keras_adashift import AdaShift

kt = pytest.importorskip("keras_tuner")

pytestmark = pytest.mark.slow

EPOCHS = 2


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 4)).astype("float32")
    y = (x @ rng.normal(size=(4, 2))).astype("float32")
    return (x[:32], y[:32]), (x[32:], y[32:])


def seeded_model(units=3):
    # Seeded initializers: every build of the same units starts alike, so a
    # run outside the tuner can reproduce a trial.
    return keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(
            units, activation="tanh",
            kernel_initializer=keras.initializers.GlorotUniform(1)),
        keras.layers.Dense(
            2, kernel_initializer=keras.initializers.GlorotUniform(2)),
    ])


def search(tuner, data):
    (x, y), validation = data
    tuner.search(x, y, batch_size=8, epochs=EPOCHS, shuffle=False,
                 validation_data=validation, verbose=0)


def retrained(optimizer, data, epochs, units=3):
    """The weights a plain fit with this optimizer reaches after `epochs`."""
    (x, y), _ = data
    model = seeded_model(units)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0)
    return model.get_weights()


def assert_best_model_is_trained(tuner, data, optimizer, units=3):
    (_, _), (xv, yv) = data
    best_trial = tuner.oracle.get_best_trials(1)[0]
    best = tuner.get_best_models(1)[0]
    initial = seeded_model(units).get_weights()
    weights = best.get_weights()
    assert all(np.isfinite(w).all() for w in weights)
    assert all(not np.allclose(w, i) for w, i in zip(weights, initial))
    # The checkpoint is the best epoch's: a plain fit to that epoch with
    # the same settings gives the same weights.
    expected = retrained(optimizer, data, best_trial.best_step + 1, units)
    for w, e in zip(weights, expected):
        np.testing.assert_allclose(w, e, rtol=1e-5, atol=1e-6)
    val_loss = best_trial.metrics.get_best_value("val_loss")
    np.testing.assert_allclose(
        best.evaluate(xv, yv, batch_size=16, verbose=0), val_loss, rtol=1e-5)
    return best, best_trial


def test_random_search_tunes_learning_rate_and_keep_num(data, tmp_path):
    def build(hp):
        model = seeded_model()
        model.compile(
            optimizer=AdaShift(
                learning_rate=hp.Choice("learning_rate", [0.003, 0.03]),
                keep_num=hp.Choice("keep_num", [2, 5])),
            loss="mse")
        return model

    tuner = kt.RandomSearch(build, objective="val_loss", max_trials=2,
                            seed=3, directory=tmp_path, project_name="hp",
                            overwrite=True)
    search(tuner, data)
    trials = list(tuner.oracle.trials.values())
    assert len(trials) == 2
    chosen = {(t.hyperparameters["learning_rate"],
               t.hyperparameters["keep_num"]) for t in trials}
    assert len(chosen) == 2  # two different settings were tried
    for trial in trials:
        optimizer = tuner.load_model(trial).optimizer
        assert isinstance(optimizer, AdaShift)
        assert optimizer.keep_num == trial.hyperparameters["keep_num"]
        np.testing.assert_allclose(
            float(optimizer.learning_rate),
            trial.hyperparameters["learning_rate"], rtol=1e-6)

    best, best_trial = assert_best_model_is_trained(
        tuner, data,
        AdaShift(learning_rate=best_trial_hp(tuner, "learning_rate"),
                 keep_num=best_trial_hp(tuner, "keep_num")))
    assert best.optimizer.get_config()["keep_num"] == (
        best_trial.hyperparameters["keep_num"])


def best_trial_hp(tuner, name):
    return tuner.get_best_hyperparameters(1)[0][name]


def test_tuner_copies_a_given_adashift_into_each_trial(data, tmp_path):
    def build(hp):
        model = seeded_model(hp.Choice("units", [3, 5]))
        model.compile(optimizer="sgd", loss="mse")
        return model

    given = AdaShift(learning_rate=0.02, keep_num=3, spatial_op="mean",
                     spatial_axes=0)
    tuner = kt.RandomSearch(build, objective="val_loss", max_trials=2,
                            seed=1, optimizer=given, directory=tmp_path,
                            project_name="given", overwrite=True)
    search(tuner, data)
    units = {t.hyperparameters["units"]
             for t in tuner.oracle.trials.values()}
    # Trials of different shapes: one shared optimizer could not train both.
    assert units == {3, 5}
    assert not given.built  # each trial trained a copy

    best_units = best_trial_hp(tuner, "units")
    best, _ = assert_best_model_is_trained(
        tuner, data, AdaShift.from_config(given.get_config()), best_units)
    config = best.optimizer.get_config()
    assert isinstance(best.optimizer, AdaShift)
    assert {k: config[k] for k in ("keep_num", "spatial_op", "spatial_axes")
            } == {"keep_num": 3, "spatial_op": "mean", "spatial_axes": (0,)}
    np.testing.assert_allclose(float(best.optimizer.learning_rate), 0.02,
                               rtol=1e-6)
