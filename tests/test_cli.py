"""The experiments behind the command line, and the command line's outputs."""

import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import only_on
from keras_adashift import cli
from keras_adashift.experiments import counterexample

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _child_env():
    """The repository first on the path; TensorFlow's start-up logs shown,
    so that a test sees them if anything imports it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return env


def _timed_run(*args):
    """Runs `python *args` in a fresh process from outside the repository;
    returns the finished process and its wall time."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT.parent, env=_child_env(),
        capture_output=True, text=True, timeout=120, check=False,
    )
    return done, time.perf_counter() - start


# `--help` and argument errors run on the standard library alone: about
# 0.05 s on 2 cores (8 s when the package imported Keras). CI machines vary,
# so the bound is generous; a Keras import would still break it or print.
@pytest.mark.parametrize(
    "args, returncode, error",
    [
        (["--help"], 0, None),
        (["demo", "--help"], 0, None),
        (["demo", "--epochs", "x"], 2, "invalid int value: 'x'"),
        (["counterexample", "--problem", "sequential", "--authors"], 2,
         "--authors is the stochastic problem's setting"),
        (["train"], 2, "invalid choice: 'train'"),
        (["tasks", "--families", "svm"], 2, "invalid choice: 'svm'"),
        ([], 2, "the following arguments are required: command"),
    ],
    ids=["help", "demo-help", "bad-int", "authors-sequential", "bad-command",
         "bad-family", "no-command"],
)
def test_help_and_argument_errors_are_fast_and_quiet(
        args, returncode, error):
    done, seconds = _timed_run("-m", "keras_adashift", *args)
    print(f"python -m keras_adashift {' '.join(args)}: {seconds:.2f} s")
    assert done.returncode == returncode, done.stderr
    if error is None:
        assert done.stdout.startswith("usage: keras-adashift")
        assert done.stderr == ""
    else:  # argparse's usage, then one line with the error
        assert done.stderr.startswith("usage: keras-adashift")
        last = done.stderr.splitlines()[-1]
        assert last.startswith("keras-adashift") and error in last
    assert seconds < 3


def test_import_keras_adashift_imports_no_backend():
    done, _ = _timed_run("-c", (
        "import sys, keras_adashift\n"
        "print(keras_adashift.__version__)\n"
        "print([m for m in ('keras', 'tensorflow', 'jax', 'torch')\n"
        "       if m in sys.modules])"
    ))
    assert done.returncode == 0, done.stderr
    version, modules = done.stdout.splitlines()
    assert version.count(".") == 2 and modules == "[]"
    assert done.stderr == ""


EXTRAS = 'pip install "keras-adashift[examples]"'


@pytest.mark.parametrize(
    "args, hidden, named",
    [
        (["demo"], "sklearn", "scikit-learn is not installed"),
        (["counterexample"], "matplotlib", "matplotlib is not installed"),
        (["counterexample"], "tqdm",
         "tqdm is not installed (or pass --no-progress)"),
        (["digits", "--quick"], "sklearn", "scikit-learn is not installed"),
        (["digits", "--quick"], "matplotlib", "matplotlib is not installed"),
        (["digits", "--quick"], "tqdm",
         "tqdm is not installed (or pass --no-progress)"),
        (["tasks", "--quick"], "sklearn", "scikit-learn is not installed"),
        (["tasks", "--quick"], "matplotlib", "matplotlib is not installed"),
        (["tasks", "--quick"], "tqdm",
         "tqdm is not installed (or pass --no-progress)"),
    ],
)
def test_a_missing_extra_is_named_before_any_work(
        args, hidden, named, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, hidden, None)  # import and find: none
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--out", str(tmp_path / "out"), *args])
    message = exit_.value.code
    assert message == (
        f"keras-adashift {args[0]}: {named}; install the examples extra: "
        f"{EXTRAS}"
    )
    assert not (tmp_path / "out").exists()  # nothing written, nothing run


def test_no_progress_runs_without_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    for command in ("counterexample", "digits", "tasks"):
        args = cli._parser().parse_args(["--no-progress", command])
        cli._check_optional_dependencies(args)  # no SystemExit


def test_python_m_without_scikit_learn_prints_one_line_and_no_logs():
    # `python -m keras_adashift demo` with scikit-learn hidden: the exit
    # message is the only output, and Keras was never imported.
    done, seconds = _timed_run("-c", (
        "import atexit, runpy, sys\n"
        "sys.modules['sklearn'] = None\n"
        "atexit.register(lambda: print(\n"
        "    [m for m in ('keras', 'tensorflow') if m in sys.modules]))\n"
        "sys.argv = ['keras-adashift', 'demo']\n"
        "runpy.run_module('keras_adashift', run_name='__main__',\n"
        "                 alter_sys=True)\n"
    ))
    assert done.returncode == 1
    assert done.stderr == (
        "keras-adashift demo: scikit-learn is not installed; install the "
        f"examples extra: {EXTRAS}\n"
    )
    assert done.stdout == "[]\n"
    assert seconds < 3


def _cli(*args):
    """Runs the CLI in this process; returns what it printed."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main(["--no-progress", *args]) == 0
    return stdout.getvalue()


def test_stochastic_problem_adam_goes_up_adashift_goes_down():
    # The loss is linear, so the learning rate only scales θ, its drift and
    # its noise alike: no learning rate makes the signs clearer. What does
    # is chains x steps. Per step AdaShift drifts by about lr·2.5e-3 against
    # noise of about lr·1 per chain (Adam drifts up 10x faster), so the
    # z-score after T steps on N chains is about 2.5e-3·sqrt(T·N), less an
    # early transient: 8192 x 8000 gives z ≈ -12 for AdaShift and +85 for
    # Adam (measured on seeds 0 and 1), far from the 5 asserted, in ~6 s.
    all_optimizers = counterexample.default_optimizers(
        counterexample.Problem("stochastic")
    )
    adam, adashift = "Adam (β1=0.9)", "AdaShift (n=1, β1=0)"
    result = counterexample.run(
        "stochastic",
        chains=8192,
        steps=8000,
        optimizers={k: all_optimizers[k] for k in (adam, adashift)},
        seed=0,
        records=4,
        progress=False,
    )
    assert result.final_mean[adam] > 5 * result.final_se[adam]
    assert result.final_mean[adashift] < -5 * result.final_se[adashift]
    # The cause: Adam's large gradient gets a smaller net update factor than
    # the small one, below the balance point; AdaShift's are equal.
    assert result.k_large[adam] / result.k_small[adam] < 0.9
    assert result.k_large[adashift] / result.k_small[adashift] == (
        pytest.approx(1, abs=0.01)
    )


def test_sequential_problem_adam_ends_at_plus_one(tmp_path):
    printed = _cli("--out", str(tmp_path), "counterexample",
                   "--problem", "sequential", "--quick")
    results = _load_results(tmp_path / "counterexample_sequential")
    assert results["final_mean"]["Adam (β1=0)"] == pytest.approx(1, abs=1e-3)
    assert results["final_mean"]["AMSGrad"] < -0.95
    assert results["final_mean"]["AdaShift (n=1, β1=0)"] < -0.95
    _assert_png(tmp_path / "counterexample_sequential" / results["plot"])
    assert "sequential problem" in printed


def test_counterexample_outputs_exist_and_parse(tmp_path):
    printed = _cli("--out", str(tmp_path), "counterexample", "--quick")
    out = tmp_path / "counterexample_stochastic"
    results = _load_results(out)

    labels = list(counterexample.default_optimizers(
        counterexample.Problem("stochastic")
    ))
    assert list(results["final_mean"]) == labels
    assert results["chains"] == 512 and results["steps"] == 2000
    for key in ("final_se", "k_large", "k_small", "k_ratio", "mean_theta"):
        assert list(results[key]) == labels
    assert len(results["recorded_steps"]) == len(
        results["mean_theta"][labels[0]]
    )
    assert results["recorded_steps"][-1] == 2000
    # The mean θ at the last record is the final mean.
    for label in labels:
        assert results["mean_theta"][label][-1] == pytest.approx(
            results["final_mean"][label]
        )

    # The printed table carries the same numbers as results.json.
    rows = {line[:22].strip(): line[22:].split()
            for line in printed.splitlines()}
    for label in labels:
        mean, _, se, k_large, k_small, ratio = rows[label]
        assert float(mean) == pytest.approx(
            results["final_mean"][label], abs=1e-4)
        assert float(se) == pytest.approx(results["final_se"][label], abs=1e-4)
        assert float(k_large) == pytest.approx(
            results["k_large"][label], rel=1e-3)
        assert float(k_small) == pytest.approx(
            results["k_small"][label], rel=1e-3)
        assert float(ratio) == pytest.approx(
            results["k_ratio"][label], abs=1e-3)
    _assert_png(out / results["plot"])


# Training runs are pinned to TensorFlow, the CLI's default backend: the
# accuracy bound after two epochs holds for its initialisation, and one
# backend is enough to check the outputs.
@only_on("tensorflow")
def test_digits_outputs_exist_and_parse(tmp_path):
    printed = _cli("--out", str(tmp_path), "digits", "--quick")
    out = tmp_path / "digits"
    results = _load_results(out)
    optimizers = ["max-AdaShift", "AdaShift (none)", "Adam", "AMSGrad", "SGD"]
    assert [r["optimizer"] for r in results["summary"]] == optimizers
    for row in results["summary"]:
        assert 0 <= row["test_accuracy_mean"] <= 1
        assert row["optimizer"] in printed
    for run in results["runs"]:
        assert len(run["test_accuracy"]) == results["epochs"] == 2
    by_name = {r["optimizer"]: r for r in results["summary"]}
    # Two epochs on digits are enough for the paper's settings to learn.
    for name in ("max-AdaShift", "Adam"):
        assert by_name[name]["test_accuracy_mean"] > 0.8
    _assert_png(out / results["plot"])


def test_tasks_outputs_exist_and_parse(tmp_path):
    from keras_adashift.experiments import families, tasks

    printed = _cli("--out", str(tmp_path), "tasks", "--quick",
                   "--families", "regression")
    out = tmp_path / "tasks"
    results = _load_results(out)
    assert results["quick"] and results["seeds"] == 1
    labels = list(tasks.QUICK_CONTENDERS)
    assert [r["contender"] for r in results["summary"]] == labels
    assert [r["contender"] for r in results["runs"]] == labels
    epochs = families.FAMILIES["regression"].quick_epochs
    for run in results["runs"]:
        assert len(run["curve"]) == epochs
        assert run["max_step_ratio"] is None or run["max_step_ratio"] > 0
    for label in labels:
        assert label in printed
    assert results["plots"] == ["regression.png"]
    _assert_png(out / "regression.png")


@only_on("tensorflow")
@pytest.mark.slow
def test_python_m_demo_runs(tmp_path):
    # The README's first command, with fewer epochs: the process start and
    # imports are what this checks, and they dominate its time.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, "-m", "keras_adashift", "--no-progress",
         "--out", str(tmp_path), "demo", "--epochs", "3"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = _load_results(tmp_path / "demo")
    for label, run in results["runs"].items():
        assert label in done.stdout
        assert run["test_accuracy"] > 0.9


def _load_results(folder):
    return json.loads((folder / "results.json").read_text())


def _assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 100
    assert np.ptp(image) > 0  # not a blank canvas
