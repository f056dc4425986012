"""keras.distribution on JAX over 2 host devices, against one device.

Usage: jax_distribution.py RESULT_JSON
Needs XLA_FLAGS=--xla_force_host_platform_device_count=2 in its environment.
"""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import distribution  # noqa: E402

from keras_adashift import AdaShift  # noqa: E402

SLOTS = ("window", "momentum")


def train(dist):
    distribution.set_distribution(dist)
    try:
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(32, 4)).astype("float32")
        y = rng.normal(size=(32, 2)).astype("float32")
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(6, activation="tanh", name="hidden"),
                keras.layers.Dense(2, name="head"),
            ]
        )
        # spatial_axes=0: one v per output unit of a kernel.
        model.compile(
            optimizer=AdaShift(learning_rate=0.01, keep_num=3,
                               spatial_axes=0),
            loss="mse",
        )
        initial = [w.tolist() for w in model.get_weights()]
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        opt = model.optimizer
        shardings = {}
        for v in model.trainable_variables + opt.variables:
            sharding = v.value.sharding
            spec = getattr(sharding, "spec", None)
            shardings[v.path] = {
                "shape": list(v.shape),
                "spec": None if spec is None else [
                    None if a is None else str(a) for a in spec
                ],
                "replicated": sharding.is_fully_replicated,
                "devices": len(sharding.device_set),
            }
        slot_paths = {
            v.path: [
                s.path for s in opt.variables
                for name in SLOTS
                if s.path.endswith(
                    f"{v.path.replace('/', '_')}_{name}"
                )
            ]
            for v in model.trainable_variables
        }
        return {
            "initial": initial,
            "weights": [w.tolist() for w in model.get_weights()],
            "iterations": int(opt.iterations.numpy()),
            "shardings": shardings,
            "slots": slot_paths,
        }
    finally:
        distribution.set_distribution(None)


def main(result_path):
    devices = jax.devices("cpu")
    mesh = distribution.DeviceMesh((1, 2), ["batch", "model"], devices)
    layout_map = distribution.LayoutMap(mesh)
    layout_map[".*/hidden/kernel"] = (None, "model")
    layout_map[".*/hidden/bias"] = ("model",)
    result = {
        "devices": len(devices),
        "one": train(None),
        "data_parallel": train(distribution.DataParallel(devices=devices)),
        "model_parallel": train(
            distribution.ModelParallel(
                layout_map=layout_map, batch_dim_name="batch"
            )
        ),
    }
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
