"""What a tf_keras user relies on: compile by instance and by name, fit,
train_on_batch and custom loops on every execution path (eager, graph,
XLA), sparse gradients, mixed precision, validation, config and state."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import keras_adashift
from keras_adashift import gradient_window
from keras_adashift.tf_keras import AdaShift
from tfk_helpers import data
from tfk_helpers import tiny_model

KEEP = 3
STEPS = 8  # the window fills at 3; 5 moving steps
BATCH = 8


def _weights(model):
    return [np.array(w) for w in model.get_weights()]


def test_tf_keras_from_tensorflow_is_tf_keras():
    # TF_USE_LEGACY_KERAS=1: `from tensorflow import keras` is tf_keras, the
    # pipeline users' import, and our class is one of its optimizers.
    from tensorflow import keras as tf_dot_keras

    assert tf_dot_keras.Sequential is tf_keras.Sequential
    assert isinstance(AdaShift(), tf_dot_keras.optimizers.Optimizer)


@pytest.mark.parametrize("identifier", ["adashift", "AdaShift", "instance"])
def test_compile_by_name_or_instance(identifier):
    from tensorflow import keras as tf_dot_keras

    model = tiny_model()
    opt = AdaShift(keep_num=2) if identifier == "instance" else identifier
    model.compile(optimizer=opt, loss="mse")
    assert type(model.optimizer) is AdaShift
    assert type(tf_dot_keras.optimizers.get(identifier
                                            if identifier != "instance"
                                            else opt)) is AdaShift
    x, y = data(16)
    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0)
    assert int(model.optimizer.iterations) == 4


def _eager_reference(x, y, **kwargs):
    """A GradientTape loop, eagerly: the weights after each step."""
    model = tiny_model()
    opt = AdaShift(keep_num=KEEP, **kwargs)
    loss_fn = tf_keras.losses.MeanSquaredError()
    out = []
    for i in range(STEPS):
        xb, yb = x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        out.append(_weights(model))
    return out, model, opt


@pytest.fixture
def xla_spy(monkeypatch):
    """Records whether each window write was traced for XLA."""
    seen = []
    original = gradient_window._in_xla

    def spy():
        seen.append(original())
        return seen[-1]

    monkeypatch.setattr(gradient_window, "_in_xla", spy)
    return seen


@pytest.mark.parametrize("path", ["fit", "fit_xla", "train_on_batch",
                                  "tape_graph", "tape_xla_optimizer"])
def test_every_path_takes_the_eager_steps(path, xla_spy):
    x, y = data(STEPS * BATCH)
    expected, _, _ = _eager_reference(x, y)
    assert not any(xla_spy)
    del xla_spy[:]
    model = tiny_model()
    opt = AdaShift(keep_num=KEEP)
    if path in ("fit", "fit_xla", "train_on_batch"):
        model.compile(optimizer=opt, loss="mse",
                      jit_compile=path == "fit_xla")
    if path.startswith("fit"):
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    elif path == "train_on_batch":
        for i in range(STEPS):
            model.train_on_batch(x[i * BATCH:(i + 1) * BATCH],
                                 y[i * BATCH:(i + 1) * BATCH])
    else:
        if path == "tape_xla_optimizer":
            # tf_keras turns jit_compile off without a GPU; forced on, the
            # optimizer runs its whole step as one XLA computation.
            opt.jit_compile = True
        loss_fn = tf_keras.losses.MeanSquaredError()

        @tf.function
        def step(xb, yb):
            with tf.GradientTape() as tape:
                loss = loss_fn(yb, model(xb, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))

        for i in range(STEPS):
            step(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH])
    xla = path in ("fit_xla", "tape_xla_optimizer")
    assert xla_spy and all(xla_spy) == xla and any(xla_spy) == xla
    assert int(opt.iterations) == STEPS
    np.testing.assert_array_equal(opt._step_counts.numpy(), STEPS)
    tol = 1e-5 if xla else 1e-6
    for got, want in zip(_weights(model), expected[-1]):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    # Held for KEEP steps, then moving.
    first = tiny_model().get_weights()
    np.testing.assert_array_equal(expected[KEEP - 1][0], first[0])
    assert not np.allclose(expected[KEEP][0], first[0])


def test_jit_compile_follows_tf_keras():
    # On by default where tf_keras allows it (a GPU), off otherwise; the
    # config records what is in effect.
    gpu = bool(tf.config.list_physical_devices("GPU"))
    assert AdaShift().jit_compile == gpu
    assert AdaShift(jit_compile=False).jit_compile is False
    assert AdaShift().get_config()["jit_compile"] == gpu


def _embedding_model(spatial_op):
    model = tf_keras.Sequential([
        tf_keras.Input((5,), dtype="int32"),
        tf_keras.layers.Embedding(10, 3),
        tf_keras.layers.GlobalAveragePooling1D(),
        tf_keras.layers.Dense(1),
    ])
    return model, AdaShift(keep_num=2, spatial_op=spatial_op)


@pytest.mark.parametrize("spatial_op", ["max", "none"])
@pytest.mark.parametrize("graph", [False, True])
def test_indexed_slices_equal_their_dense_gradient(spatial_op, graph):
    rng = np.random.default_rng(0)
    # Repeated ids in a batch (the slices' values must be summed); ids 8
    # and 9 never appear.
    x = rng.integers(0, 8, size=(6, 4, 5)).astype("int32")
    y = rng.normal(size=(6, 4, 1)).astype("float32")
    runs = []
    for densify in (False, True):
        tf_keras.utils.set_random_seed(0)
        model, opt = _embedding_model(spatial_op)
        kinds = []

        def step(xb, yb):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((model(xb) - yb) ** 2)
            grads = tape.gradient(loss, model.trainable_variables)
            kinds.append(type(grads[0]).__name__)
            if densify:
                grads = [tf.convert_to_tensor(g) for g in grads]
            opt.apply_gradients(zip(grads, model.trainable_variables))

        if graph:
            step = tf.function(step)
        for xb, yb in zip(x, y):
            step(xb, yb)
        assert kinds[0] == "IndexedSlices"
        runs.append((_weights(model), model))
    (sparse, model), (dense, _) = runs
    for a, b in zip(sparse, dense):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    table = sparse[0]
    initial = model.layers[0].embeddings  # moved rows differ from others
    if spatial_op == "none":
        # Rows never seen hold (their gradients are zeros).
        tf_keras.utils.set_random_seed(0)
        fresh, _ = _embedding_model(spatial_op)
        np.testing.assert_array_equal(table[8:], fresh.get_weights()[0][8:])
        assert not np.allclose(table[:8], fresh.get_weights()[0][:8])
    assert initial is not None


def test_mixed_float16_skips_an_overflowing_step_untouched():
    tf_keras.mixed_precision.set_global_policy("mixed_float16")
    model = tiny_model()
    model.compile(optimizer=AdaShift(keep_num=2), loss="mse")
    opt = model.optimizer
    assert isinstance(opt, tf_keras.mixed_precision.LossScaleOptimizer)
    assert type(opt.inner_optimizer) is AdaShift
    x, y = data(32)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    inner = opt.inner_optimizer
    # float32 weights, float32 state.
    assert all(v.dtype == tf.float32 for v in inner.variables[1:]
               if v.dtype.is_floating)
    state = [v.numpy().copy() for v in inner.variables]
    weights = _weights(model)
    scale = float(opt.loss_scale)
    grads = [tf.fill(v.shape, np.float32(np.inf))
             for v in model.trainable_variables]
    opt.apply_gradients(zip(grads, model.trainable_variables))
    assert float(opt.loss_scale) == scale / 2
    # tf_keras's LossScaleOptimizer counts the skipped step in the inner
    # optimizer's `iterations` (variable 0); AdaShift's own state, its step
    # counts included, is untouched.
    assert int(inner.iterations) == 5
    for before, after in zip(state[1:], inner.variables[1:]):
        np.testing.assert_array_equal(before, after.numpy())
    for before, after in zip(weights, _weights(model)):
        np.testing.assert_array_equal(before, after)
    # A finite step then counts as the next one.
    model.fit(x[:BATCH], y[:BATCH], batch_size=BATCH, verbose=0)
    assert int(inner.iterations) == 6
    np.testing.assert_array_equal(inner._step_counts.numpy(), 5)


def test_mixed_bfloat16_trains_with_float32_state():
    tf_keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = tiny_model()
    model.compile(optimizer=AdaShift(keep_num=2), loss="mse")
    assert type(model.optimizer) is AdaShift
    x, y = data(32)
    before = _weights(model)
    history = model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert all(v.dtype in (tf.float32, tf.int64)
               for v in model.optimizer.variables)
    assert not np.allclose(before[0], _weights(model)[0])


def _slots(optimizer):
    """(shape, dtype) of the state after the iteration counter(s)."""
    skip = 1 if isinstance(optimizer, tf_keras.optimizers.Optimizer) else 2
    return [(tuple(v.shape), keras.backend.standardize_dtype(v.dtype))
            for v in optimizer.variables[skip:]]


@pytest.mark.parametrize("kwargs", [
    {}, {"spatial_op": "none"}, {"beta_1": 0.0},
    {"spatial_op": "none", "beta_1": 0.0}, {"spatial_axes": 0},
    {"window_dtype": "bfloat16"}, {"spatial_op": "mean", "keep_num": 1},
], ids=str)
def test_state_layout_is_the_keras3_one(kwargs):
    shapes = [(4, 3), (3,), (2, 2, 3), ()]
    tfk = AdaShift(**kwargs)
    tfk.build([tf.Variable(np.zeros(s, "float32")) for s in shapes])
    k3 = keras_adashift.AdaShift(**kwargs)
    k3.build([keras.Variable(np.zeros(s, "float32")) for s in shapes])
    assert _slots(tfk) == _slots(k3)
    assert tfk.variables[0] is tfk.iterations


_BAD = [
    dict(keep_num=0), dict(keep_num=2.0), dict(beta_1=1.0),
    dict(beta_2=-0.1), dict(epsilon=-1.0), dict(spatial_op="sum"),
    dict(spatial_axes=(0, 0)), dict(spatial_op="none", spatial_axes=0),
    dict(step_bound=0.0), dict(window_dtype="float16"),
    dict(window_dtype="int8"), dict(learning_rate=-1.0),
    dict(learning_rate=float("nan")), dict(lr=0.1), dict(betas=(0.9, 0.99)),
    dict(eps=1e-8), dict(n=3), dict(reduce_func="max"),
]


@pytest.mark.parametrize("kwargs", _BAD, ids=str)
def test_bad_arguments_raise_the_keras3_message(kwargs):
    with pytest.raises(ValueError) as keras3_error:
        keras_adashift.AdaShift(**kwargs)
    with pytest.raises(ValueError) as tf_keras_error:
        AdaShift(**kwargs)
    assert str(tf_keras_error.value) == str(keras3_error.value)


def test_keras3_only_arguments_are_refused_unless_none():
    AdaShift(loss_scale_factor=None, gradient_accumulation_steps=None)
    for name in ("loss_scale_factor", "gradient_accumulation_steps"):
        with pytest.raises(ValueError, match=name):
            AdaShift(**{name: 2})


def test_build_and_apply_checks_raise_the_keras3_message():
    def errors(optimizer, make_variable):
        out = []
        with pytest.raises(ValueError) as e:
            optimizer.build([make_variable(np.zeros(3, "int32"), "c")])
        out.append(str(e.value))
        var = make_variable(np.zeros((2, 3), "float32"), "w")
        with pytest.raises(ValueError) as e:
            optimizer.apply_gradients([(tf.zeros((3, 2)), var)])
        out.append(str(e.value))
        return out, var

    def tf_variable(value, name):
        return tf.Variable(value, name=name, trainable=value.dtype.kind == "f")

    tfk, var = errors(AdaShift(), tf_variable)
    k3, _ = errors(keras_adashift.AdaShift(),
                   lambda v, name: keras.Variable(v, name=name))
    assert "int32" in tfk[0] and "(3, 2)" in tfk[1]
    # The same text, but for how each Keras names the variable.
    assert tfk[0].replace("c:0", "c") == k3[0]
    assert tfk[1].replace("w:0", "w") == k3[1]
    # A refused gradient touches no state.
    opt = AdaShift()
    with pytest.raises(ValueError):
        opt.apply_gradients([(tf.zeros((3, 2)), var)])
    assert int(opt.iterations) == 0


def test_config_round_trip_and_schedule():
    schedule = tf_keras.optimizers.schedules.ExponentialDecay(0.02, 10, 0.5)
    opt = AdaShift(learning_rate=schedule, keep_num=4, beta_1=0.5,
                   beta_2=0.9, epsilon=1e-8, spatial_op="mean",
                   spatial_axes=(0, 1), step_bound=2.0,
                   window_dtype="bfloat16", clipnorm=1.0, use_ema=True,
                   name="mine")
    config = opt.get_config()
    again = AdaShift.from_config(dict(config))
    assert again.get_config() == config
    assert config["keep_num"] == 4 and config["spatial_axes"] == (0, 1)
    assert isinstance(again._learning_rate,
                      tf_keras.optimizers.schedules.ExponentialDecay)
    # The schedule drives the step: lr at step 0 is 0.02.
    assert float(again.learning_rate) == pytest.approx(0.02)
    plain = AdaShift(learning_rate=0.05).get_config()
    assert plain["learning_rate"] == pytest.approx(0.05)
    assert AdaShift.from_config(plain).learning_rate.numpy() == \
        pytest.approx(0.05)


def test_ema_averages_the_weights():
    model = tiny_model()
    opt = AdaShift(keep_num=1, use_ema=True, ema_momentum=0.5)
    x, y = data(32)
    for i in range(4):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x[i * BATCH:(i + 1) * BATCH])
                                   - y[i * BATCH:(i + 1) * BATCH]) ** 2)
        variables = model.trainable_variables
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
    averages = [a.numpy() for a in opt._model_variables_moving_average]
    weights = _weights(model)
    assert len(averages) == len(weights)
    assert not np.allclose(averages[0], weights[0])
    opt.finalize_variable_values(model.trainable_variables)
    for a, w in zip(averages, _weights(model)):
        np.testing.assert_allclose(a, w)


def test_weight_decay_and_clipping_match_keras3():
    # tf_keras's own decay and clipping around the shared step: the same
    # numbers as the Keras 3 class on the same gradients.
    rng = np.random.default_rng(1)
    theta = rng.normal(size=(4, 3)).astype("float32")
    grads = [rng.normal(size=(4, 3)).astype("float32") * 5 for _ in range(6)]
    kw = dict(keep_num=2, weight_decay=0.1, clipnorm=1.0)
    a = tf.Variable(theta)
    b = keras.Variable(theta)
    tfk, k3 = AdaShift(**kw), keras_adashift.AdaShift(**kw)
    for g in grads:
        tfk.apply_gradients([(tf.constant(g), a)])
        k3.apply_gradients([(tf.constant(g), b)])
    np.testing.assert_allclose(a.numpy(), np.asarray(b), rtol=1e-6)
    assert not np.allclose(a.numpy(), theta)
