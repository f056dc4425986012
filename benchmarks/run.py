"""AdaShift vs Adam benchmarks on every Keras backend: one command, one table.

    python benchmarks/run.py                 # ~4M parameters, all backends
    python benchmarks/run.py --quick         # smoke run, small and short
    python benchmarks/run.py --backends jax torch --params 1000000

Each backend runs in its own subprocess (KERAS_BACKEND is fixed per process).
Timings are medians of per-round ratios with the contenders interleaved in
one process, so background load hits both sides of each ratio alike.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = ("tensorflow", "jax", "torch")
TARGETS = {  # mode: (max AdaShift/Adam, max k40/k1)
    "tf-xla": (1.3, 1.1),
    "tf": (1.5, 1.1),
    "jax": (1.3, 1.1),
    "torch": (1.5, 1.1),
}
FIT_TARGET = 1.1
# StepMonitor at its default `every` (100): at most 3 % of fit time.
MONITOR_TARGET, MONITOR_DEFAULT = 1.03, "every 100"
# Issue 11: real architectures, many variables.
REAL_TARGETS = {"tf-xla": 1.2, "jax": 1.2, "tf": 1.3, "torch": 1.3}
REAL_FIT_TARGET = 1.05


def worker(args):
    sys.path.insert(0, HERE)
    import bench

    quick = args.quick
    rounds = 5 if quick else args.rounds
    result = {"backend": bench.BACKEND}
    result["update_step"] = bench.bench_update_step(
        args.params, rounds=rounds, inner=1 if quick else 2,
        warmup=2 if quick else 3, copy_bytes=(4 << 20) if quick else None,
    )
    result["fit"] = bench.bench_fit(
        rounds=2 if quick else max(2, rounds // 3),
        max_samples=256 if quick else None,
    )
    # --quick: the two models that build fast, a few rounds.
    real = ["mlp_51x32", "transformer_4x256"] if quick else None
    result["real_update_step"] = bench.bench_real_update_step(
        real, rounds=3 if quick else max(5, rounds // 3),
        inner=1, warmup=2 if quick else 3,
    )
    result["real_fit"] = bench.bench_real_fit(
        real, rounds=1 if quick else 3, samples=64 if quick else 128,
    )
    result["monitor"] = bench.bench_monitor(
        rounds=2 if quick else max(4, rounds // 10),
        epochs=1 if quick else 4, max_samples=256 if quick else None,
    )
    if bench.BACKEND == "torch":
        result["peer"] = bench.bench_peer(
            args.params, rounds=rounds, inner=1 if quick else 2,
            warmup=2 if quick else 3,
        )
    if args.extras:
        result["memory"] = bench.state_bytes_per_param()
        result["bf16_window"] = bench.bench_bf16_window(
            epochs=1 if quick else 10
        )
    with open(args.out, "w") as f:
        json.dump(result, f)


def run_backend(backend, args, extras):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--worker",
           "--params", str(args.params), "--rounds", str(args.rounds),
           "--out", out]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--extras"] if extras else []
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"backend": backend, "error": proc.stderr[-3000:]}
    with open(out) as f:
        result = json.load(f)
    os.unlink(out)
    return result


def run_tf_keras(args):
    """benchmarks/bench_tf_keras.py in its own process: the tf_keras table
    (None when tf_keras or TensorFlow is not installed)."""
    from importlib.util import find_spec

    if find_spec("tensorflow") is None or find_spec("tf_keras") is None:
        print("[tf_keras] skipped: tf_keras is not installed",
              file=sys.stderr, flush=True)
        return None
    print("[tf_keras] running...", file=sys.stderr, flush=True)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, os.path.join(HERE, "bench_tf_keras.py"), out,
           "--params", str(args.params),
           "--rounds", str(max(5, args.rounds // 3))]
    cmd += ["--quick"] if args.quick else []
    env = dict(os.environ, KERAS_BACKEND="tensorflow",
               TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"backend": "tf_keras", "error": proc.stderr[-3000:]}
    with open(out) as f:
        result = json.load(f)
    os.unlink(out)
    return {"backend": "tf_keras", "tf_keras_update_step": result}


def _r(summary):
    median, p25, p75 = (summary[k] for k in ("median", "p25", "p75"))
    return f"{median:.2f}× [{p25:.2f}–{p75:.2f}]"


def format_report(results):
    """Markdown tables from the per-backend results."""
    lines = []
    step_rows = []
    for res in results:
        for mode, s in res.get("update_step", {}).items():
            step_rows.append((mode, s))
    if step_rows:
        params = step_rows[0][1]["params"]
        lines += [
            f"### Update step ({params:,} float32 parameters in 8 "
            "variables): AdaShift ÷ Adam, same process, interleaved",
            "",
            "Median of per-round ratios [25th–75th percentile]; "
            "target: ≤ limit, and k40/k1 ≤ 1.1.",
            "",
            "| path | Adam ms | k1/Adam | k10/Adam | k40/Adam | k40/k1 "
            "| target | met | AdaShift k10 % of copy BW | Adam % of copy BW |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for mode, s in step_rows:
            r = s["ratios"]
            limit, flat = TARGETS[mode]
            worst = max(r[f"k{k}/adam"]["median"] for k in (1, 10, 40))
            met = worst <= limit and r["k40/k1"]["median"] <= flat
            bw = s["bandwidth"]
            lines.append(
                f"| {mode} | {s['ms']['adam']['median']:.1f} "
                f"| {_r(r['k1/adam'])} | {_r(r['k10/adam'])} "
                f"| {_r(r['k40/adam'])} | {_r(r['k40/k1'])} "
                f"| ≤{limit} | {'yes' if met else 'NO'} "
                f"| {bw['k10']['pct_of_copy']:.0f}% "
                f"| {bw['adam']['pct_of_copy']:.0f}% |"
            )
        lines += [""]
        copy = ", ".join(
            f"{m}: {s['bandwidth']['copy_GBps']:.1f} GB/s"
            for m, s in step_rows
        )
        noise = ", ".join(
            f"{m}: {100 * s['max_rel_iqr']:.0f}%" for m, s in step_rows
        )
        lines += [
            f"numpy copy bandwidth measured in the same rounds: {copy}. "
            "Bytes per step counted: Adam 7×4 B/param (variable r+w, "
            "gradient r, m r+w, v r+w); AdaShift max also 7×4 B/param "
            "(variable r+w, gradient r, m r+w, newest window slot written, "
            "oldest read; v and the window of φ(g²) are per block).",
            f"Noise (largest interquartile range / median of one "
            f"contender's step time): {noise}.",
            "",
        ]
    real = [(r["backend"], r["real_update_step"]) for r in results
            if "real_update_step" in r]
    if real:
        lines += [
            "### Update step on real architectures: AdaShift k10 ÷ Adam, "
            "interleaved",
            "",
            "The shapes of each model's trainable variables; median "
            f"[25th–75th percentile]. Targets: ≤ {REAL_TARGETS['tf-xla']} "
            f"on TF-XLA and JAX, ≤ {REAL_TARGETS['tf']} on TF graph and "
            "torch. The last column is `spatial_op=\"mean\"` ÷ Adam: the "
            "same step with a sum in place of the max reduction.",
            "",
            "| model | variables | parameters | path | Adam ms "
            "| AdaShift ms | ratio | met | mean ÷ Adam |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for _, per_model in real:
            for name, m in per_model.items():
                for mode, s in m["modes"].items():
                    ok = s["ratio"]["median"] <= REAL_TARGETS[mode]
                    lines.append(
                        f"| {name} | {m['variables']} | {m['params']:,} "
                        f"| {mode} | {s['ms']['adam']['median']:.2f} "
                        f"| {s['ms']['k10']['median']:.2f} "
                        f"| {_r(s['ratio'])} | {'yes' if ok else 'NO'} "
                        f"| {_r(s['mean_ratio'])} |")
        lines += [""]
    real_fits = [(r["backend"], r["real_fit"]) for r in results
                 if "real_fit" in r]
    if real_fits:
        lines += [
            "### model.fit on real architectures: seconds per epoch, "
            "AdaShift k10 ÷ Adam, interleaved",
            "",
            f"Target ≤ {REAL_FIT_TARGET}.",
            "",
            "| model | backend | jit_compile | Adam s/epoch "
            "| AdaShift s/epoch | ratio | met |",
            "|---|---|---|---|---|---|---|",
        ]
        for backend, per_model in real_fits:
            for name, per_mode in per_model.items():
                for jit, s in per_mode.items():
                    ok = s["ratio"]["median"] <= REAL_FIT_TARGET
                    sec = s["s_per_epoch"]
                    lines.append(
                        f"| {name} | {backend} | {jit} "
                        f"| {sec['adam']['median']:.2f} "
                        f"| {sec['adashift']['median']:.2f} "
                        f"| {_r(s['ratio'])} | {'yes' if ok else 'NO'} |")
        lines += [""]
    fits = [(r["backend"], r["fit"]) for r in results if "fit" in r]
    if fits:
        f0 = fits[0][1]
        lines += [
            f"### model.fit, small CNN on sklearn digits ({f0['params']:,} "
            f"parameters, {f0['steps_per_epoch']} steps/epoch), "
            "AdaShift k10 ÷ Adam, jit_compile='auto'",
            "",
            "| backend | Adam s/epoch | AdaShift s/epoch | ratio | target "
            "| met |",
            "|---|---|---|---|---|---|",
        ]
        for backend, f in fits:
            lines.append(
                f"| {backend} | {f['s_per_epoch']['adam']['median']:.3f} "
                f"| {f['s_per_epoch']['adashift']['median']:.3f} "
                f"| {_r(f['ratio'])} | ≤{FIT_TARGET} "
                f"| {'yes' if f['ratio']['median'] <= FIT_TARGET else 'NO'} |"
            )
        lines.append("")
    monitors = [(r["backend"], r["monitor"]) for r in results
                if "monitor" in r]
    if monitors:
        m0 = monitors[0][1]
        names = list(m0["ratios"])
        lines += [
            f"### StepMonitor in model.fit: fit time with ÷ without, small "
            f"CNN on digits ({m0['params']:,} parameters, AdaShift k10, "
            f"{m0['steps_per_fit']} steps per fit), interleaved",
            "",
            "Median of per-round ratios [25th–75th percentile]; in "
            "brackets after it, the monitor's own share of the fit time "
            "(seconds in its batch hooks ÷ fit seconds). Each fit measures "
            "its first batch, then one in `every`. Target at the default "
            f"({MONITOR_DEFAULT}): ≤ {MONITOR_TARGET}.",
            "",
            "| backend | fit s (no monitor) | "
            + " | ".join(names) + " | met |",
            "|---|---|" + "---|" * len(names) + "---|",
        ]
        for backend, m in monitors:
            ok = m["ratios"][MONITOR_DEFAULT]["median"] <= MONITOR_TARGET
            lines.append(
                f"| {backend} | {m['s_per_fit']['none']['median']:.2f} | "
                + " | ".join(f"{_r(m['ratios'][n])} "
                             f"({100 * m['hook_fraction'][n]:.1f}%)"
                             for n in names)
                + f" | {'yes' if ok else 'NO'} |")
        lines.append("")
    for res in results:
        if "peer" not in res:
            continue
        p = res["peer"]
        lines += [
            f"### Peer: pytorch_optimizer.AdaShift (keep_num "
            f"{p['keep_num']}, torch CPU, same parameter count)",
            "",
            "| optimizer | ms/step |",
            "|---|---|",
        ]
        for name, s in p["ms"].items():
            lines.append(f"| {name} | {s['median']:.1f} |")
        lines.append("")
        lines += [f"- {k}: {_r(v)}" for k, v in p["ratios"].items()]
        lines.append("")
    for res in results:
        if "memory" in res:
            lines += [
                "### Optimizer state, bytes per parameter (float32 "
                "variables, from optimizer.variables)",
                "",
                "| optimizer | bytes/param |",
                "|---|---|",
            ]
            lines += [f"| {k} | {v:.1f} |" for k, v in res["memory"].items()]
            lines.append("")
        if "bf16_window" in res:
            b = res["bf16_window"]
            lines += [
                f"### window_dtype='bfloat16' vs float32 (digits MLP, "
                f"AdaShift k10, {b['epochs']} epochs, same init and "
                f"batches, {res['backend']})",
                "",
                "| window | val acc | val loss | train acc | train loss |",
                "|---|---|---|---|---|",
            ]
            for name in ("float32", "bfloat16"):
                x = b[name]
                lines.append(
                    f"| {name} | {x['val_acc']:.4f} | {x['val_loss']:.4f} "
                    f"| {x['train_acc']:.4f} | {x['train_loss']:.4f} |"
                )
            lines += [
                "",
                f"val acc diff {b['val_acc_diff']:+.4f}, val loss diff "
                f"{b['val_loss_diff']:+.4f}; max |θ_bf16 − θ_f32| = "
                f"{b['max_param_diff']:.2e} (largest move of any parameter "
                f"from its init: {b['max_param_move_f32']:.2e}).",
                "",
            ]
    for res in results:
        if "tf_keras_update_step" in res:
            sys.path.insert(0, HERE)
            import bench_tf_keras

            lines += [bench_tf_keras.format_table(
                res["tf_keras_update_step"])]
    for res in results:
        if "error" in res:
            lines += [f"### {res['backend']}: FAILED", "", "```",
                      res["error"], "```", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small and short: a smoke run")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS),
                        choices=BACKENDS)
    parser.add_argument("--params", type=int, default=None,
                        help="parameters in the update-step benchmark "
                        "(default 4Mi, 65536 with --quick)")
    parser.add_argument("--rounds", type=int, default=60,
                        help="interleaved timing rounds per contender "
                        "(model.fit epochs: a third of that)")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--worker", action="store_true",
                        help=argparse.SUPPRESS)
    parser.add_argument("--extras", action="store_true",
                        help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.params is None:
        args.params = 1 << 16 if args.quick else 1 << 22
    if args.worker:
        return worker(args)
    from importlib.util import find_spec

    results = []
    for backend in args.backends:
        if find_spec(backend) is None:  # each backend's module is its name
            print(f"[{backend}] skipped: {backend} is not installed in "
                  f"{sys.prefix}", file=sys.stderr, flush=True)
            continue
        print(f"[{backend}] running...", file=sys.stderr, flush=True)
        # Memory and the bfloat16 run do not depend on the backend: once.
        results.append(run_backend(backend, args, extras=not results))
    if not results:
        print("no backend to run: install tensorflow, jax or torch",
              file=sys.stderr)
        return 1
    if "tensorflow" in args.backends:
        tf_keras_result = run_tf_keras(args)
        if tf_keras_result is not None:
            results.append(tf_keras_result)
    print(format_report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
