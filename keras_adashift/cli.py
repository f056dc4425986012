"""Command line: `keras-adashift {demo,counterexample,digits,tasks}` or
`python -m keras_adashift ...`. Each command prints a table and writes
results.json under `--out/<command>[_<problem>]`; `counterexample`,
`digits` and `tasks` also write PNG plots there.

The backend is Keras's (KERAS_BACKEND). The counterexample's loop is
compiled on TF and JAX; the authors' 10^7 single-chain steps take about half
a minute on either (2 CPU cores).
"""

import argparse
import importlib.util
import json
import pathlib
import sys
import time

# Only the standard library at import: `--help` and argument errors must not
# wait for Keras and its backend. Each command imports what it runs.

DEFAULT_OUT = "adashift_results"
# experiments.families.FAMILIES, named here so that `--help` needs no Keras.
_FAMILY_NAMES = ("mlp", "convnet", "lstm", "gru", "transformer",
                 "regression", "autoencoder", "wgan")
INSTALL_EXTRAS = 'pip install "keras-adashift[examples]"'
# Module: the distribution that provides it (all in the `examples` extra).
OPTIONAL = {"sklearn": "scikit-learn", "matplotlib": "matplotlib",
            "tqdm": "tqdm"}


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "counterexample" and args.authors and (
        args.problem != "stochastic"
    ):
        parser.error("--authors is the stochastic problem's setting")
    _check_optional_dependencies(args)
    name = args.command
    if name == "counterexample":
        name += f"_{args.problem}" + ("_authors" if args.authors else "")
    out = pathlib.Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = args.run(args, out)
    args_given = argv if argv is not None else sys.argv[1:]
    results["command"] = ["keras-adashift", *args_given]
    results["total_seconds"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out / 'results.json'}")
    return 0


def _check_optional_dependencies(args):
    """Exits with one line naming the extra if a command lacks a module.

    Runs before any work (and before any heavy import), so a missing plotting
    library does not surface after minutes of computing. tqdm draws the
    progress bars only: `--no-progress` runs without it.
    """
    needed = [m for m in args.needs if m != "tqdm" or args.progress]
    missing = [OPTIONAL[m] for m in needed if not _installed(m)]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        hint = " (or pass --no-progress)" if missing == ["tqdm"] else ""
        raise SystemExit(
            f"keras-adashift {args.command}: {', '.join(missing)} {verb} "
            f"not installed{hint}; install the examples extra: "
            f"{INSTALL_EXTRAS}"
        )


def _installed(module):
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or spec-less entry
        return False


def _parser():
    parser = argparse.ArgumentParser(
        prog="keras-adashift",
        description="AdaShift experiments: a demo, the online "
        "counterexamples, and small networks on sklearn's digits.",
    )
    parser.add_argument(
        "--out", default=DEFAULT_OUT,
        help=f"output folder (default: ./{DEFAULT_OUT})",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false",
        help="hide the progress bars",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="AdaShift vs Adam on an MLP on digits (~30 s)"
    )
    demo.add_argument("--epochs", type=int, default=15)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo, needs=("sklearn",))

    counter = commands.add_parser(
        "counterexample",
        help="the online problems on which Adam moves the wrong way",
    )
    counter.add_argument(
        "--problem", choices=("stochastic", "sequential"),
        default="stochastic",
    )
    counter.add_argument("--chains", type=int, help="independent chains")
    counter.add_argument("--steps", type=int, help="steps per chain")
    counter.add_argument(
        "--lr", type=float,
        help="learning rate of all optimizers (default 1e-3 stochastic, "
        "1e-2 sequential)",
    )
    counter.add_argument("--seed", type=int, default=0)
    counter.add_argument(
        "--authors", action="store_true",
        help="the authors' setting: one chain, 10^7 steps (stochastic)",
    )
    counter.add_argument(
        "--quick", action="store_true", help="a run of a few seconds"
    )
    counter.set_defaults(
        run=_counterexample, needs=("matplotlib", "tqdm")
    )

    digits = commands.add_parser(
        "digits",
        help="MLP and CNN on digits: max-AdaShift, AdaShift (none), Adam, "
        "AMSGrad, SGD",
    )
    digits.add_argument("--models", nargs="+", default=["mlp", "cnn"],
                        choices=("mlp", "cnn"))
    digits.add_argument("--seeds", type=int, default=2,
                        help="seeds 0..N-1 (default 2, for a run under "
                        "2 minutes on 2 cores)")
    digits.add_argument("--epochs", type=int, default=6)
    digits.add_argument(
        "--quick", action="store_true",
        help="MLP only, one seed, 2 epochs",
    )
    digits.set_defaults(
        run=_digits, needs=("sklearn", "matplotlib", "tqdm")
    )

    tasks = commands.add_parser(
        "tasks",
        help="the task suite: one small model per family (MLP, CNN, LSTM, "
        "GRU, Transformer, regression, autoencoder, WGAN-GP) x Adam, "
        "AMSGrad and AdaShift settings (~30 min; --quick ~5 min)",
    )
    tasks.add_argument(
        "--families", nargs="+", choices=_FAMILY_NAMES, default=None,
        help="families to run (default: all; wgan needs TensorFlow)",
    )
    tasks.add_argument("--seeds", type=int, default=3,
                       help="seeds 0..N-1 (default 3)")
    tasks.add_argument(
        "--quick", action="store_true",
        help="Adam, AMSGrad, AdaShift and per-unit AdaShift only, one "
        "seed, a third of the steps",
    )
    tasks.set_defaults(
        run=_tasks, needs=("sklearn", "matplotlib", "tqdm")
    )
    return parser


def _demo(args, out):
    import keras

    from keras_adashift import AdaShift
    from keras_adashift.experiments import digits

    data = digits.load()
    results = {}
    for label, optimizer in (
        ("AdaShift (lr 1e-2)", AdaShift(1e-2)),
        ("Adam (lr 1e-3)", keras.optimizers.Adam(1e-3)),
    ):
        run = digits.train("mlp", optimizer, args.seed, args.epochs, data=data)
        results[label] = {
            "test_accuracy": run.test_accuracy[-1],
            "seconds": run.seconds,
        }
        print(
            f"{label:<20} test accuracy {run.test_accuracy[-1]:.4f} "
            f"after {args.epochs} epochs ({run.seconds:.1f} s)"
        )
    return {"backend": keras.backend.backend(), "epochs": args.epochs,
            "seed": args.seed, "runs": results}


def _counterexample(args, out):
    from keras_adashift.experiments import counterexample

    if args.authors:  # main() refused it for the sequential problem
        chains, steps = 1, 10_000_000
    elif args.quick:
        chains, steps = (512, 2000) if args.problem == "stochastic" else (
            64, 1500)
    elif args.problem == "stochastic":
        chains, steps = 2048, 50_000
    else:
        chains, steps = 256, 6000
    chains = args.chains or chains
    steps = args.steps or steps

    result = counterexample.run(
        args.problem, chains=chains, steps=steps, learning_rate=args.lr,
        seed=args.seed, progress=args.progress,
    )
    print(result.table())
    plot = out / "mean_theta.png"
    counterexample.plot(result, plot)
    print(f"wrote {plot}")
    return {**result.to_json(), "plot": plot.name}


def _digits(args, out):
    import keras

    from keras_adashift.experiments import digits

    models, seeds, epochs = args.models, range(args.seeds), args.epochs
    if args.quick:
        models, seeds, epochs = ["mlp"], range(1), 2
    runs = digits.compare(models, seeds=tuple(seeds), epochs=epochs,
                          progress=args.progress)
    rows = digits.summarize(runs)
    print(digits.table(rows))
    plot = out / "learning_curves.png"
    digits.plot(runs, plot)
    print(f"wrote {plot}")
    return {
        "backend": keras.backend.backend(),
        "epochs": epochs,
        "summary": rows,
        "runs": [
            {
                "model": r.model, "optimizer": r.optimizer, "seed": r.seed,
                "train_accuracy": r.train_accuracy,
                "test_accuracy": r.test_accuracy, "seconds": r.seconds,
            }
            for r in runs
        ],
        "plot": plot.name,
    }


def _tasks(args, out):
    import keras

    from keras_adashift.experiments import tasks

    seeds = range(1 if args.quick else args.seeds)
    runs = tasks.run(args.families, seeds=tuple(seeds), quick=args.quick,
                     progress=args.progress)
    rows = tasks.summarize(runs)
    print(tasks.table(rows))
    plots = tasks.plot(runs, out)
    print(f"wrote {len(plots)} plots to {out}")
    return {
        "backend": keras.backend.backend(),
        "quick": args.quick,
        "seeds": len(seeds),
        "summary": rows,
        "runs": [run.to_json() for run in runs],
        "plots": [path.name for path in plots],
    }
