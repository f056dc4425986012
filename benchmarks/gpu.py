"""One run on a machine with an accelerator, JAX and no TensorFlow.

    KERAS_BACKEND=jax python benchmarks/gpu.py            # about 3 minutes
    KERAS_BACKEND=jax python benchmarks/gpu.py --quick    # a smoke run

It prints one table: AdaShift's trajectories against the NumPy reference
(tests/reference.py) in float32 on the device, the update step ÷ Keras Adam
on the shapes of the four real architectures of `benchmarks/bench.py`
(interleaved rounds, median and 25th-75th percentile), and a short
`model.fit` per epoch ÷ Adam. Nothing is downloaded: the models are built
with `weights=None`, the data is random.
"""

import argparse
import functools
import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.join(os.path.dirname(HERE), "tests"))
sys.path.append(HERE)

import bench  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_adashift import AdaShift  # noqa: E402
from reference import adashift_trajectory  # noqa: E402

# float32 trajectories against the float64 reference, relative to the
# largest |θ| seen (tests/trajectories.py uses the same bound).
RTOL = 2e-5
CONFIGS = {
    "max k10": {},
    "mean k10": dict(spatial_op="mean"),
    "none k10": dict(spatial_op="none"),
    "max k1 β1=0": dict(keep_num=1, beta_1=0.0),
    "max axes=0 k3": dict(keep_num=3, spatial_axes=0),
    "none k3 bound 1": dict(keep_num=3, spatial_op="none", step_bound=1.0),
}


def _reference_axes(kwargs, rank):
    if kwargs.get("spatial_axes") is None or rank == 1:
        return None
    return (0,)


def check_numerics(steps):
    """Max trajectory error ÷ max |θ| of each config, on the device."""
    import jax

    rng = np.random.default_rng(0)
    shapes = [(64, 32), (32,)]
    thetas = [rng.normal(size=s).astype("float32") for s in shapes]
    grads = [[(rng.normal(size=s) * 10.0 ** rng.uniform(-2, 2)).astype(
        "float32") for s in shapes] for _ in range(steps)]
    grads[0] = [np.zeros(s, "float32") for s in shapes]  # the hold
    out = {}
    for label, kwargs in CONFIGS.items():
        kwargs = dict(dict(learning_rate=1e-2), **kwargs)
        optimizer = AdaShift(**kwargs)
        variables = [keras.Variable(t) for t in thetas]
        optimizer.build(variables)

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def step(opt_values, values, g, optimizer=optimizer):
            values, opt_values = optimizer.stateless_apply(
                opt_values, g, values)
            return opt_values, values

        opt_values = [v.value for v in optimizer.variables]
        values = [v.value for v in variables]
        trajectory = [[] for _ in shapes]
        for g in grads:
            opt_values, values = step(opt_values, values,
                                      [jax.numpy.asarray(x) for x in g])
            for i, value in enumerate(values):
                trajectory[i].append(np.asarray(value, np.float64))
        worst = 0.0
        for i, shape in enumerate(shapes):
            expected = np.array(adashift_trajectory(
                thetas[i], [g[i] for g in grads],
                learning_rate=kwargs["learning_rate"],
                keep_num=kwargs.get("keep_num", 10),
                beta_1=kwargs.get("beta_1", 0.9),
                spatial_op=kwargs.get("spatial_op", "max"),
                axes=_reference_axes(kwargs, len(shape)),
                step_bound=kwargs.get("step_bound")))
            scale = np.maximum.accumulate(
                np.abs(expected).reshape(steps, -1).max(axis=1))
            error = np.abs(np.array(trajectory[i]) - expected).reshape(
                steps, -1).max(axis=1) / scale
            worst = max(worst, float(error.max()))
        out[label] = worst
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: fewer steps, rounds and models")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    import jax

    device = jax.devices()[0]
    quick = args.quick
    numerics = check_numerics(steps=20 if quick else 100)
    names = ["mlp_51x32"] if quick else None
    update = bench.bench_real_update_step(
        names, rounds=3 if quick else 25, inner=2, warmup=1 if quick else 3)
    fit = bench.bench_real_fit(
        ["mlp_51x32"] if quick else ["mlp_51x32", "transformer_4x256",
                                     "mobilenetv2_32"],
        rounds=2 if quick else 5, samples=64 if quick else 2048,
        batch_size=32)

    print(f"# keras-adashift on {device.platform} ({device.device_kind}), "
          f"Keras {keras.__version__}, JAX {jax.__version__}")
    print("\n| check | model / config | value | target | met |")
    print("|---|---|---|---|---|")
    for label, error in numerics.items():
        print(f"| float32 vs reference | {label} | {error:.1e} "
              f"| ≤ {RTOL:g} | {'yes' if error <= RTOL else 'NO'} |")
    for name, result in update.items():
        r = result["modes"]["jax"]["ratio"]
        print(f"| update step ÷ Adam | {name} ({result['variables']} "
              f"variables) | {r['median']:.2f}× [{r['p25']:.2f}–"
              f"{r['p75']:.2f}] | ≤ 1.2 | "
              f"{'yes' if r['median'] <= 1.2 else 'NO'} |")
    for name, per_jit in fit.items():
        for jit, result in per_jit.items():
            r = result["ratio"]
            print(f"| fit s/epoch ÷ Adam | {name} (jit {jit}) | "
                  f"{r['median']:.2f}× [{r['p25']:.2f}–{r['p75']:.2f}] | "
                  f"≤ 1.05 | {'yes' if r['median'] <= 1.05 else 'NO'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "numerics": numerics,
                       "update": update, "fit": fit}, f, indent=1)
    return 0 if all(e <= RTOL for e in numerics.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
