"""tf_keras (Keras 2): keras_adashift.tf_keras.AdaShift k10 ÷ tf_keras's Adam.

The update step (`apply_gradients` on fixed gradients) in a `tf.function`,
graph (`jit_compile=False`) and XLA (`jit_compile=True`), on the 8-variable
set of `bench.shapes_for` and on the variable shapes of `bench.real_models`;
the contenders interleaved round by round, as in `bench.py`. Runs in its own
process (`run.py --tf-keras`, or `python bench_tf_keras.py OUT.json`).
"""

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

# `bench` (which imports Keras) is imported where it is used: run.py formats
# the table in a process that imports no Keras.

MODES = ("tf_keras-xla", "tf_keras")
TARGETS = {"tf_keras-xla": 1.2, "tf_keras": 1.3}


def make_stepper(kind, shapes, mode, keep_num=10, seed=0):
    """One tf_keras optimizer update on fixed gradients, no arguments."""
    import tensorflow as tf
    import tf_keras

    from keras_adashift.tf_keras import AdaShift

    rng = np.random.default_rng(seed)
    variables = [tf.Variable(rng.standard_normal(s).astype("float32"),
                             name=f"v{i}") for i, s in enumerate(shapes)]
    grads = [tf.constant(1e-3 * rng.standard_normal(s).astype("float32"))
             for s in shapes]
    # jit_compile=False on the optimizers: the mode decides, as tf_keras's
    # compile(jit_compile=...) does for a train step.
    if kind == "adam":
        optimizer = tf_keras.optimizers.Adam(1e-3, jit_compile=False)
    else:
        optimizer = AdaShift(keep_num=keep_num, jit_compile=False)
    optimizer.build(variables)

    @tf.function(jit_compile=mode == "tf_keras-xla")
    def step():
        optimizer.apply_gradients(zip(grads, variables))

    return step


def bench_update_step(shape_sets, rounds=25, inner=2, warmup=3):
    """{name: {"variables", "params", "modes": {mode: {"ms", "ratio"}}}}."""
    import bench

    out = {}
    for name, shapes in shape_sets.items():
        per_mode = {}
        for mode in MODES:
            steppers = {kind: make_stepper(kind, shapes, mode)
                        for kind in ("adam", "k10")}
            times = bench._interleave(steppers, rounds, inner, warmup)
            per_mode[mode] = {
                "ms": {n: bench._summary(1e3 * np.asarray(t))
                       for n, t in times.items()},
                "ratio": bench._ratio(times, "k10", "adam"),
            }
        out[name] = {"variables": len(shapes),
                     "params": int(sum(np.prod(s) for s in shapes)),
                     "modes": per_mode}
    return out


def shape_sets(n_params, real_names=None):
    """The 8-variable set, then each real model's trainable shapes."""
    import bench
    import keras

    sets = {"8 variables": bench.shapes_for(n_params)}
    builders = bench.real_models()
    for name in (builders if real_names is None else real_names):
        sets[name] = [tuple(v.shape)
                      for v in builders[name]().trainable_variables]
        keras.utils.clear_session(free_memory=False)
    return sets


def run(n_params, quick=False, rounds=25):
    real = ["mlp_51x32"] if quick else None
    return bench_update_step(
        shape_sets(n_params, real), rounds=3 if quick else rounds,
        inner=1 if quick else 2, warmup=2 if quick else 3)


def format_table(result):
    def r(s):
        return f"{s['median']:.2f}× [{s['p25']:.2f}–{s['p75']:.2f}]"

    lines = [
        "### tf_keras update step: keras_adashift.tf_keras.AdaShift k10 ÷ "
        "tf_keras Adam, interleaved",
        "",
        "`apply_gradients` in a `tf.function`, graph and XLA; median of "
        "per-round ratios [25th–75th percentile]. Targets: ≤ "
        f"{TARGETS['tf_keras-xla']} XLA, ≤ {TARGETS['tf_keras']} graph.",
        "",
        "| variables set | variables | parameters | path | Adam ms "
        "| AdaShift ms | ratio | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in result.items():
        for mode, s in m["modes"].items():
            ok = s["ratio"]["median"] <= TARGETS[mode]
            lines.append(
                f"| {name} | {m['variables']} | {m['params']:,} | {mode} "
                f"| {s['ms']['adam']['median']:.2f} "
                f"| {s['ms']['k10']['median']:.2f} | {r(s['ratio'])} "
                f"| {'yes' if ok else 'NO'} |")
    return "\n".join(lines + [""])


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--params", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=25)
    args = parser.parse_args()
    params = args.params or (1 << 16 if args.quick else 1 << 22)
    result = run(params, quick=args.quick, rounds=args.rounds)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f)
    print(format_table(result))
