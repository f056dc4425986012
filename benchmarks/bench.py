"""Measurements for one Keras backend (the one this process was started with).

`benchmarks/run.py` starts one process per backend, because KERAS_BACKEND is
fixed when Keras is first imported. Every timing here is a *ratio* measured in
one process with the contenders interleaved round by round: the machine may be
shared, and interleaving puts the same background load on each contender, so
the median of per-round ratios stays meaningful when absolute times do not.
"""

import os
import sys
import time

import numpy as np

# Appended, not prepended: PYTHONPATH can point at a patched copy to compare.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402

from keras_adashift import AdaShift  # noqa: E402

BACKEND = keras.backend.backend()
KEEP_NUMS = (1, 10, 40)
N_VARIABLES = 8


def shapes_for(n_params):
    """Four (rows, cols) kernels and their four biases: 8 variables."""
    cols = max(1, int(round((n_params / 4) ** 0.5)))
    rows = max(1, int(round(n_params / 4 / cols)))
    return [(rows, cols), (cols,)] * (N_VARIABLES // 2)


def _summary(samples):
    q = np.percentile(samples, [25, 50, 75])
    return {"p25": float(q[0]), "median": float(q[1]), "p75": float(q[2])}


def _interleave(steppers, rounds, inner, warmup):
    """Per-round seconds per call of each stepper, rounds rotating the order.

    Rotating the order keeps a contender from always running right after the
    same neighbour (cache state, allocator state, frequency ramps).
    """
    names = list(steppers)
    for name in names:
        for _ in range(warmup):
            steppers[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start = time.perf_counter()
            for _ in range(inner):
                steppers[name]()
            times[name].append((time.perf_counter() - start) / inner)
    return times


def _ratio(times, num, den):
    per_round = np.asarray(times[num]) / np.asarray(times[den])
    return _summary(per_round)


# --- the update step, as each backend's training loop runs it --------------


def _make_optimizer(kind, keep_num=10, **kwargs):
    if kind == "adam":
        return keras.optimizers.Adam(learning_rate=1e-3)
    return AdaShift(keep_num=keep_num, **kwargs)


def _tf_stepper(optimizer, variables, grads, jit_compile):
    import tensorflow as tf

    @tf.function(jit_compile=jit_compile)
    def step(grads):
        optimizer.apply(grads, variables)

    return lambda: step(grads)


def _jax_stepper(optimizer, variables, grads):
    import jax

    # Donation is what lets XLA update the window in place. As in Keras's
    # JAX trainer, the state goes in and comes out in the same order: XLA
    # pairs donated buffers with outputs by position and shape, so another
    # order makes it copy every variable that shares a shape with a slot.
    def apply(train, opt, grads):
        return optimizer.stateless_apply(opt, grads, train)

    step = jax.jit(apply, donate_argnums=(0, 1))
    state = {
        "opt": [v.value for v in optimizer.variables],
        "train": [v.value for v in variables],
    }

    def run():
        train, opt = step(state["train"], state["opt"], grads)
        jax.block_until_ready(train)
        state["train"], state["opt"] = train, opt

    return run


def _torch_stepper(optimizer, variables, grads):
    return lambda: optimizer.apply(grads, variables)


def make_update_stepper(kind, shapes, mode, keep_num=10, seed=0, **kwargs):
    """A no-argument callable doing one optimizer update on fixed gradients."""
    rng = np.random.default_rng(seed)
    variables = [
        keras.Variable(rng.standard_normal(s).astype("float32"), name=f"v{i}")
        for i, s in enumerate(shapes)
    ]
    grads = [
        keras.ops.convert_to_tensor(
            1e-3 * rng.standard_normal(s).astype("float32")
        )
        for s in shapes
    ]
    optimizer = _make_optimizer(kind, keep_num, **kwargs)
    optimizer.build(variables)
    if mode == "tf-xla":
        return _tf_stepper(optimizer, variables, grads, jit_compile=True)
    if mode == "tf":
        return _tf_stepper(optimizer, variables, grads, jit_compile=False)
    if mode == "jax":
        return _jax_stepper(optimizer, variables, grads)
    if mode == "torch":
        return _torch_stepper(optimizer, variables, grads)
    raise ValueError(f"unknown mode {mode!r}")


def modes():
    return {"tensorflow": ["tf-xla", "tf"], "jax": ["jax"], "torch": ["torch"]}[
        BACKEND
    ]


def _copy_stepper(n_bytes):
    """numpy copy of an array far larger than cache: the machine's bandwidth."""
    n = max(1, n_bytes // 4)
    src = np.ones(n, "float32")
    dst = np.empty_like(src)
    return lambda: np.copyto(dst, src)


def bytes_per_step(kind, n_params, keep_num=10, spatial_op="max",
                   window_itemsize=4):
    """Bytes the update must move per step at the least, float32 state.

    Adam: variable r+w, gradient r, m r+w, v r+w. AdaShift: variable r+w,
    gradient r, m r+w, v r+w (none; a reduced v and the window of φ(g²) are
    negligible), the newest slot written and the oldest slot read.
    """
    f = 4 * n_params
    if kind == "adam":
        return 7 * f
    v = 2 * f if spatial_op == "none" else 0
    window = 2 * window_itemsize * n_params
    return 2 * f + f + 2 * f + v + window


def bench_update_step(n_params, rounds=25, inner=2, warmup=3,
                      keep_nums=KEEP_NUMS, copy_bytes=None):
    """Interleaved update-step times of Adam and AdaShift per mode.

    Returns {mode: {"ms": {config: summary}, "ratios": {...},
    "bandwidth": {...}}}.
    """
    shapes = shapes_for(n_params)
    true_params = int(sum(np.prod(s) for s in shapes))
    copy_bytes = copy_bytes or max(64 * 2**20, 8 * true_params)
    out = {}
    for mode in modes():
        steppers = {"adam": make_update_stepper("adam", shapes, mode)}
        for k in keep_nums:
            steppers[f"k{k}"] = make_update_stepper(
                "adashift", shapes, mode, keep_num=k
            )
        steppers["copy"] = _copy_stepper(copy_bytes)
        # Warm-up must cover AdaShift's keep_num fill steps: the compiled
        # step is the same, but the first calls also trace and compile.
        times = _interleave(steppers, rounds, inner, warmup)
        ms = {n: _summary(1e3 * np.asarray(t)) for n, t in times.items()}
        ratios = {f"k{k}/adam": _ratio(times, f"k{k}", "adam")
                  for k in keep_nums}
        ratios[f"k{keep_nums[-1]}/k{keep_nums[0]}"] = _ratio(
            times, f"k{keep_nums[-1]}", f"k{keep_nums[0]}"
        )
        copy_gbs = 2 * copy_bytes / ms["copy"]["median"] / 1e6
        bandwidth = {"copy_GBps": copy_gbs}
        for name in steppers:
            if name == "copy":
                continue
            kind = "adam" if name == "adam" else "adashift"
            moved = bytes_per_step(kind, true_params)
            gbs = moved / ms[name]["median"] / 1e6
            bandwidth[name] = {"bytes_per_step": moved, "GBps": gbs,
                               "pct_of_copy": 100 * gbs / copy_gbs}
        spread = max(
            (m["p75"] - m["p25"]) / m["median"]
            for n, m in ms.items() if n != "copy"
        )
        out[mode] = {"params": true_params, "ms": ms, "ratios": ratios,
                     "bandwidth": bandwidth, "max_rel_iqr": spread}
    return out


# --- real architectures: many variables -------------------------------------


def _transformer(vocab=8000, dim=256, blocks=4, heads=4, length=32):
    """A text classifier: Embedding + `blocks` encoder blocks + Dense head."""
    inputs = keras.Input((length,), dtype="int32")
    h = keras.layers.Embedding(vocab, dim)(inputs)
    for _ in range(blocks):
        a = keras.layers.MultiHeadAttention(heads, dim // heads)(h, h)
        h = keras.layers.LayerNormalization()(h + a)
        f = keras.layers.Dense(2 * dim, activation="relu")(h)
        f = keras.layers.Dense(dim)(f)
        h = keras.layers.LayerNormalization()(h + f)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(inputs, keras.layers.Dense(2)(h))


def real_models():
    """Builders of the architectures users train, by name: the variable
    counts of issue 11 (102, 67, 158 and 214 trainable variables)."""
    return {
        "mlp_51x32": lambda: keras.Sequential(
            [keras.Input((32,))]
            + [keras.layers.Dense(32, activation="relu") for _ in range(50)]
            + [keras.layers.Dense(32)]),
        "transformer_4x256": _transformer,
        "mobilenetv2_32": lambda: keras.applications.MobileNetV2(
            input_shape=(32, 32, 3), weights=None, classes=10),
        "resnet50_32": lambda: keras.applications.ResNet50(
            input_shape=(32, 32, 3), weights=None, classes=10),
    }


def bench_real_update_step(names=None, rounds=25, inner=2, warmup=3):
    """Interleaved update-step times, Adam vs AdaShift k10, on the shapes of
    each real model's trainable variables, per mode of this backend."""
    builders = real_models()
    out = {}
    for name in names or builders:
        shapes = [tuple(v.shape) for v in builders[name]().trainable_variables]
        keras.utils.clear_session(free_memory=False)
        per_mode = {}
        for mode in modes():
            # φ = mean beside the default max: the same step but for the
            # reduction, which tells the cost of XLA:CPU's max reductions.
            steppers = {
                "adam": make_update_stepper("adam", shapes, mode),
                "k10": make_update_stepper("adashift", shapes, mode,
                                           keep_num=10),
                "k10_mean": make_update_stepper(
                    "adashift", shapes, mode, keep_num=10,
                    spatial_op="mean"),
            }
            times = _interleave(steppers, rounds, inner, warmup)
            per_mode[mode] = {
                "ms": {n: _summary(1e3 * np.asarray(t))
                       for n, t in times.items()},
                "ratio": _ratio(times, "k10", "adam"),
                "mean_ratio": _ratio(times, "k10_mean", "adam"),
            }
        out[name] = {"variables": len(shapes),
                     "params": int(sum(np.prod(s) for s in shapes)),
                     "modes": per_mode}
    return out


def _real_data(model, samples, seed=0):
    rng = np.random.default_rng(seed)
    shape = tuple(model.inputs[0].shape[1:])
    if keras.backend.standardize_dtype(model.inputs[0].dtype) == "int32":
        x = rng.integers(0, 8000, size=(samples,) + shape).astype("int32")
    else:
        x = rng.normal(size=(samples,) + shape).astype("float32")
    classes = model.outputs[0].shape[-1]
    return x, rng.integers(0, classes, size=samples)


def fit_modes(name):
    """`jit_compile` settings to time `model.fit` in: what users get
    ("auto"), and on TensorFlow also XLA on (its "auto" on GPU), except for
    the two keras.applications, whose XLA:CPU compile takes minutes."""
    fast_compile = name in ("mlp_51x32", "transformer_4x256")
    xla = BACKEND == "tensorflow" and fast_compile
    return ["auto", True] if xla else ["auto"]


def bench_real_fit(names=None, rounds=3, samples=128, batch_size=32):
    """Seconds per model.fit epoch, Adam vs AdaShift k10, interleaved."""
    builders = real_models()
    out = {}
    for name in names or builders:
        # keras.applications end in a softmax; the others in logits.
        logits = name not in ("mobilenetv2_32", "resnet50_32")
        out[name] = {
            str(jit): _interleaved_fits(
                builders[name], logits, lambda m: _real_data(m, samples),
                rounds, batch_size, jit_compile=jit)[1]
            for jit in fit_modes(name)
        }
        keras.utils.clear_session(free_memory=False)
    return out


def _interleaved_fits(build, from_logits, data, rounds, batch_size,
                      jit_compile="auto"):
    """The same model compiled with Adam and with AdaShift k10, and their
    seconds per model.fit epoch, interleaved. `data` is `(x, y)` or a
    function of the built model that returns them."""
    models = {}
    for kind in ("adam", "adashift"):
        keras.utils.set_random_seed(0)
        model = build()
        opt = (keras.optimizers.Adam() if kind == "adam"
               else AdaShift(keep_num=10))
        loss = keras.losses.SparseCategoricalCrossentropy(
            from_logits=from_logits)
        model.compile(opt, loss, jit_compile=jit_compile)
        models[kind] = model
    x, y = data(models["adam"]) if callable(data) else data
    steppers = {
        k: (lambda m=m: m.fit(x, y, batch_size=batch_size, epochs=1,
                              verbose=0))
        for k, m in models.items()
    }
    times = _interleave(steppers, rounds, inner=1, warmup=1)
    return models, {
        "s_per_epoch": {k: _summary(t) for k, t in times.items()},
        "ratio": _ratio(times, "adashift", "adam"),
    }


# --- optimizer state memory --------------------------------------------------

_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
             "int32": 4, "int64": 8}


def state_bytes_per_param(n_params=1 << 16):
    """Optimizer variables' bytes / model parameters, from the variables."""
    shapes = shapes_for(n_params)
    variables = [keras.Variable(np.zeros(s, "float32")) for s in shapes]
    true_params = sum(int(np.prod(s)) for s in shapes)
    configs = {
        "adam": lambda: keras.optimizers.Adam(),
        "adashift max k10": lambda: AdaShift(keep_num=10, spatial_op="max"),
        "adashift none k10": lambda: AdaShift(keep_num=10, spatial_op="none"),
        "adashift max k10 bf16": lambda: AdaShift(
            keep_num=10, spatial_op="max", window_dtype="bfloat16"
        ),
        "adashift none k10 bf16": lambda: AdaShift(
            keep_num=10, spatial_op="none", window_dtype="bfloat16"
        ),
        "adashift max k10 beta_1=0": lambda: AdaShift(
            keep_num=10, spatial_op="max", beta_1=0.0
        ),
        "adashift none k10 beta_1=0": lambda: AdaShift(
            keep_num=10, spatial_op="none", beta_1=0.0
        ),
    }
    out = {}
    for name, make in configs.items():
        optimizer = make()
        optimizer.build(variables)
        total = sum(
            int(np.prod(v.shape)) * _ITEMSIZE[
                keras.backend.standardize_dtype(v.dtype)]
            for v in optimizer.variables
        )
        out[name] = total / true_params
    return out


# --- numerics of a bfloat16 window ------------------------------------------


def _digits(flat):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    x = x if flat else x.reshape(-1, 8, 8, 1)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(x))
    x, y = x[idx], y[idx].astype("int32")
    split = int(0.8 * len(x))
    return (x[:split], y[:split]), (x[split:], y[split:])


def _mlp():
    return keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10),
    ])


def bench_bf16_window(epochs=10, batch_size=32):
    """Same init, same batches: float32 vs bfloat16 window, digits MLP."""
    (xt, yt), (xv, yv) = _digits(flat=True)
    keras.utils.set_random_seed(0)
    init = _mlp().get_weights()
    results = {}
    for name, wd in (("float32", None), ("bfloat16", "bfloat16")):
        model = _mlp()
        model.set_weights(init)
        model.compile(
            AdaShift(keep_num=10, window_dtype=wd),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        model.fit(xt, yt, batch_size=batch_size, epochs=epochs,
                  shuffle=False, verbose=0)
        loss, acc = model.evaluate(xv, yv, verbose=0)
        train_loss, train_acc = model.evaluate(xt, yt, verbose=0)
        results[name] = {
            "val_loss": float(loss), "val_acc": float(acc),
            "train_loss": float(train_loss), "train_acc": float(train_acc),
            "weights": model.get_weights(),
        }
    w32, w16 = results["float32"].pop("weights"), results["bfloat16"].pop(
        "weights")
    diffs = [np.max(np.abs(a - b)) for a, b in zip(w32, w16)]
    moved = [np.max(np.abs(a - b)) for a, b in zip(w32, init)]
    results["max_param_diff"] = float(max(diffs))
    results["max_param_move_f32"] = float(max(moved))
    results["val_acc_diff"] = (
        results["bfloat16"]["val_acc"] - results["float32"]["val_acc"])
    results["val_loss_diff"] = (
        results["bfloat16"]["val_loss"] - results["float32"]["val_loss"])
    results["epochs"] = epochs
    return results


# --- end to end --------------------------------------------------------------


def _cnn():
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10),
    ])


def bench_fit(rounds=6, batch_size=64, max_samples=None):
    """Seconds per model.fit epoch, Adam vs AdaShift k10, interleaved.

    `jit_compile` is left at Keras's "auto": what users of this backend get
    (on a CPU-only TensorFlow that means graph mode without XLA).
    """
    (xt, yt), _ = _digits(flat=False)
    if max_samples:
        xt, yt = xt[:max_samples], yt[:max_samples]
    models, timing = _interleaved_fits(_cnn, True, (xt, yt), rounds,
                                       batch_size)
    return {
        "params": int(models["adam"].count_params()),
        "steps_per_epoch": int(np.ceil(len(xt) / batch_size)),
        **timing,
    }


# --- StepMonitor's cost in model.fit -----------------------------------------

MONITOR_EVERY = (1, 10, 100)


def bench_monitor(rounds=4, epochs=4, batch_size=64, max_samples=None,
                  every=MONITOR_EVERY):
    """Seconds per `model.fit` call of `epochs` epochs, the bench CNN with
    AdaShift k10, without and with `StepMonitor(every=k)`, interleaved;
    ratios with ÷ without. Each call is a new fit, whose first batch is
    measured, so a short fit overstates the cost of a large `every`."""
    from keras_adashift.callbacks import StepMonitor

    class Timed(StepMonitor):
        """Also adds up the seconds spent in its own batch hooks."""

        seconds = 0.0

        def on_train_batch_begin(self, batch, logs=None):
            start = time.perf_counter()
            super().on_train_batch_begin(batch, logs)
            self.seconds += time.perf_counter() - start

        def on_train_batch_end(self, batch, logs=None):
            start = time.perf_counter()
            super().on_train_batch_end(batch, logs)
            self.seconds += time.perf_counter() - start

    (xt, yt), _ = _digits(flat=False)
    if max_samples:
        xt, yt = xt[:max_samples], yt[:max_samples]
    keras.utils.set_random_seed(0)
    model = _cnn()
    model.compile(AdaShift(keep_num=10),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    # One model for every contender: the same compiled step, so only the
    # callback differs (training on is harmless: only time is measured).
    callbacks = {"none": []}
    callbacks.update({f"every {k}": [Timed(every=k, warn=False)]
                      for k in every})
    steppers = {
        name: (lambda c=c: model.fit(xt, yt, batch_size=batch_size,
                                     epochs=epochs, verbose=0, callbacks=c))
        for name, c in callbacks.items()
    }
    for name, c in callbacks.items():
        steppers[name]()  # warm-up, then count the hooks' time from zero
        for monitor in c:
            monitor.seconds = 0.0
    times = _interleave(steppers, rounds, inner=1, warmup=0)
    steps = int(np.ceil(len(xt) / batch_size)) * epochs
    return {
        "params": int(model.count_params()),
        "steps_per_fit": steps,
        "s_per_fit": {k: _summary(t) for k, t in times.items()},
        "ratios": {k: _ratio(times, k, "none") for k in callbacks
                   if k != "none"},
        # The monitor's own share of the fit time: less noisy than the
        # ratio on a shared machine, without what Keras does for any batch
        # hook (the logs as Python floats every batch).
        "hook_fraction": {k: c[0].seconds / float(np.sum(times[k]))
                          for k, c in callbacks.items() if c},
    }


# --- the peer implementation -------------------------------------------------


def bench_peer(n_params, rounds=25, inner=2, warmup=3, keep_num=10):
    """pytorch_optimizer.AdaShift vs torch.optim.Adam vs Keras (torch) Adam."""
    import torch
    import pytorch_optimizer

    shapes = shapes_for(n_params)
    rng = np.random.default_rng(0)

    def torch_stepper(make):
        params = [torch.nn.Parameter(torch.from_numpy(
            rng.standard_normal(s).astype("float32"))) for s in shapes]
        for p in params:
            p.grad = torch.from_numpy(
                1e-3 * rng.standard_normal(p.shape).astype("float32"))
        opt = make(params)
        return opt.step

    steppers = {
        "peer_adashift": torch_stepper(lambda p: pytorch_optimizer.AdaShift(
            p, lr=1e-3, keep_num=keep_num)),
        "torch_adam": torch_stepper(lambda p: torch.optim.Adam(p, lr=1e-3)),
    }
    if BACKEND == "torch":
        steppers["keras_adam"] = make_update_stepper("adam", shapes, "torch")
        steppers["keras_adashift"] = make_update_stepper(
            "adashift", shapes, "torch", keep_num=keep_num)
    # Warm-up must pass the peer's keep_num fill steps (it skips work there).
    times = _interleave(steppers, rounds, inner, warmup + keep_num)
    out = {"keep_num": keep_num,
           "ms": {n: _summary(1e3 * np.asarray(t)) for n, t in times.items()},
           "ratios": {"peer_adashift/torch_adam": _ratio(
               times, "peer_adashift", "torch_adam")}}
    if BACKEND == "torch":
        out["ratios"]["peer_adashift/keras_adam"] = _ratio(
            times, "peer_adashift", "keras_adam")
        out["ratios"]["keras_adashift/peer_adashift"] = _ratio(
            times, "keras_adashift", "peer_adashift")
    return out
