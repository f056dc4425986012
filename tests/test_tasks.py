"""The task suite's structure on a tiny budget: its records, statistics,
outputs and plots. Nothing here asserts which optimizer wins."""

import math

import keras
import numpy as np
import pytest

from conftest import only_on
from keras_adashift import AdaShift
from keras_adashift.experiments import digits, families, gan, tasks

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _tiny_contenders(family):
    return {
        "Adam": lambda: keras.optimizers.Adam(),
        "AdaShift": lambda: AdaShift(),
        # MSE on targets of sd 1 at this rate overflows within a few steps.
        "SGD 1e4": lambda: keras.optimizers.SGD(1e4),
    }


@pytest.fixture(scope="module")
def runs():
    """Two families x three contenders, one seed, one epoch each."""
    return tasks.run(["mlp", "regression"], contenders_of=_tiny_contenders,
                     seeds=(0,), epochs=1, progress=False)


def test_every_run_has_its_record(runs):
    assert [(r.family, r.contender) for r in runs] == [
        (f, c) for f in ("mlp", "regression")
        for c in ("Adam", "AdaShift", "SGD 1e4")
    ]
    for run in runs:
        assert len(run.curve) == 1
        data = families.FAMILIES[run.family].load()
        assert run.steps_per_epoch == math.ceil(len(data["x"]) / 32)
        record = run.to_json()
        assert set(record) >= {
            "family", "contender", "seed", "curve", "final",
            "steps_to_threshold", "diverged", "max_abs_weight",
            "max_step_ratio", "step_ratio_by_variable",
            "rms_step_ratio_by_variable", "max_abs_weight_by_variable",
            "seconds",
        }
        assert set(record["step_ratio_by_variable"]) == set(
            record["max_abs_weight_by_variable"])


def test_a_run_that_blows_up_is_marked_diverged(runs):
    by_label = {(r.family, r.contender): r for r in runs}
    blown = by_label["regression", "SGD 1e4"]
    assert blown.diverged and math.isnan(blown.final)
    assert blown.steps_to_threshold is None
    assert blown.to_json()["final"] is None  # JSON has no NaN
    for label in ("Adam", "AdaShift"):
        run = by_label["mlp", label]
        assert not run.diverged and 0 <= run.final <= 1
        assert 0 < run.max_step_ratio < math.inf
        assert run.max_abs_weight < tasks.DIVERGED_WEIGHT


def test_summary_and_table(runs):
    rows = tasks.summarize(runs)
    assert len(rows) == 6
    row = next(r for r in rows if r["family"] == "regression"
               and r["contender"] == "SGD 1e4")
    assert row["diverged"] == 1 and row["final_mean"] is None
    printed = tasks.table(rows)
    for family in ("mlp", "regression"):
        assert printed.count(f"{family}: ") == 1
    assert printed.count("SGD 1e4") == 2


def test_one_png_per_family(runs, tmp_path):
    paths = tasks.plot(runs, tmp_path)
    assert [p.name for p in paths] == ["mlp.png", "regression.png"]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_step_statistic_by_hand():
    variable = keras.Variable(np.array([1.0, -2.0], "float32"))
    # bound = lr / sqrt(1 - β2) = 0.1 / sqrt(0.01) = 1, from the optimizer
    statistics = tasks.StepStatistics(
        [variable], keras.optimizers.Adam(0.1, beta_2=0.99))
    (name,) = statistics.max_abs_weight
    variable.assign([1.5, -2.25])
    assert not statistics.update()
    assert statistics.step_ratio[name] == pytest.approx(0.5)
    # StepMonitor's own numbers, the same statistic (one implementation)
    assert statistics.monitor.by_variable[name]["max_over_bound"] == (
        statistics.step_ratio[name])
    assert statistics.rms_step_ratio[name] == pytest.approx(
        math.sqrt((0.5**2 + 0.25**2) / 2))
    variable.assign([1.5, -2.0])  # a smaller step keeps the maximum
    statistics.update()
    assert statistics.step_ratio[name] == pytest.approx(0.5)
    assert statistics.largest_weight == pytest.approx(2.25)
    variable.assign([1.5, 2 * tasks.DIVERGED_WEIGHT])
    assert statistics.update() and statistics.diverged


def test_step_statistic_of_adams_first_step():
    # Adam's first step is lr·g/(|g| + ε) ≈ lr per element, so its ratio
    # to lr / sqrt(1 - β2) is sqrt(1 - β2).
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.Adam(1e-2, epsilon=1e-12), "mse")
    tracker = tasks._Tracker()
    x = np.ones((4, 3), "float32")
    model.fit(x, np.full((4, 2), 5.0, "float32"), batch_size=4, epochs=1,
              verbose=0, callbacks=[tracker])
    assert tracker.statistics.steps == 1
    assert tracker.statistics.largest_step_ratio == pytest.approx(
        math.sqrt(0.001), rel=1e-4)


@only_on("tensorflow")
def test_wgan_family_runs(monkeypatch):
    monkeypatch.setattr(gan, "GENERATOR_STEPS_PER_EPOCH", 2)
    family = families.FAMILIES["wgan"]
    run = tasks.train(family, AdaShift, 0, 2, family.load(), "AdaShift")
    assert len(run.curve) == 2 and run.steps_per_epoch == 2
    assert run.final <= 0  # minus a distance
    # critic and generator: 3 Dense layers each, kernel and bias
    assert len(run.step_ratio_by_variable) == 12


@pytest.mark.skipif(gan.available(), reason="the GAN runs on TensorFlow")
def test_wgan_is_skipped_off_tensorflow():
    assert tasks.run(["wgan"], seeds=(0,), progress=False) == []


def test_gan_score():
    pool = gan.data()["x"]
    assert gan.score(pool[:1000], pool[1000:]) > -0.05
    assert gan.score(pool[:1000] + 5.0, pool[1000:]) < -2.0
    assert math.isnan(gan.score(np.full((10, 2), np.nan), pool))


def test_digits_plot_draws_diverged_and_identical_runs(
        tmp_path, monkeypatch):
    # Two optimizers with identical curves and one whose runs diverge
    # (accuracy at chance, then NaN): every label gets a visible line.
    runs = [
        digits.Run("mlp", label, seed, curve, curve, 1.0)
        for label, curve in (("A", [0.5, 0.9]), ("B", [0.5, 0.9]),
                             ("C", [0.1, float("nan")]))
        for seed in (0, 1)
    ]
    import matplotlib.figure

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda figure, *a, **k: saved.append(figure))
    digits.plot(runs, tmp_path / "curves.png")
    top = saved[0].axes[0]
    lines = {line.get_label(): line for line in top.get_lines()
             if not line.get_label().startswith("_")}
    assert set(lines) == {"A", "B", "C (2/2 diverged)"}
    assert lines["A"].get_linestyle() != lines["B"].get_linestyle()
    assert lines["A"].get_marker() != lines["B"].get_marker()
    low, high = top.get_ylim()
    assert low <= 0.1 and high >= 0.9  # the diverged run is in range
