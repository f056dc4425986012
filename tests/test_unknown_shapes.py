"""Gradients whose static shape is partly unknown (TensorFlow): tf.data with
`None` dimensions, `padded_batch`, a `tf.function` with a `None`-dim
`input_signature`, sparse slices of variable-length input, MirroredStrategy.

Each pipeline trains to the same weights as the same batches run eagerly,
where every shape is known; a gradient whose runtime shape is not its
variable's fails loudly and leaves the state as it was.
"""

import functools

import keras
import numpy as np
import pytest

import spawn
from conftest import only_on
from keras_adashift import AdaShift

pytestmark = only_on("tensorflow")

FEATURES, HIDDEN, CLASSES = 4, 6, 2
# (spatial_op, spatial_axes): the reducing φ over a whole variable and per
# output unit, and the element-wise φ.
CONFIGS = {
    "max": ("max", None),
    "mean": ("mean", None),
    "none": ("none", None),
    "max-axes0": ("max", 0),
}
LENGTHS = (3, 5, 4, 6, 3, 5)  # one sequence length per batch


def optimizer(config):
    spatial_op, spatial_axes = CONFIGS[config]
    return AdaShift(learning_rate=0.05, keep_num=2, spatial_op=spatial_op,
                    spatial_axes=spatial_axes)


def sequence_batches(lengths=LENGTHS, size=8, seed=0):
    """Batches of (size, length, FEATURES) floats and int labels."""
    rng = np.random.default_rng(seed)
    return [
        (rng.normal(size=(size, n, FEATURES)).astype("float32"),
         rng.integers(0, CLASSES, size=size).astype("int64"))
        for n in lengths
    ]


def sequence_model():
    # Dense on (batch, time, features): its kernel's gradient comes out of a
    # reshape of `None` dims, so its static shape is (None, HIDDEN).
    return keras.Sequential([
        keras.Input((None, FEATURES)),
        keras.layers.Dense(HIDDEN, activation="relu"),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(CLASSES, activation="softmax"),
    ])


def generator_dataset(batches):
    tf = pytest.importorskip("tensorflow")
    return tf.data.Dataset.from_generator(
        lambda: iter(batches),
        output_signature=(
            tf.TensorSpec((None, None, FEATURES), tf.float32),
            tf.TensorSpec((None,), tf.int64),
        ),
    )


@functools.lru_cache(maxsize=None)
def eager_reference(config, batches_key="sequences"):
    """The weights after the batches run eagerly: every shape is known."""
    keras.utils.set_random_seed(0)
    model = sequence_model()
    initial = model.get_weights()
    model.compile(optimizer=optimizer(config),
                  loss="sparse_categorical_crossentropy", run_eagerly=True)
    for x, y in BATCHES[batches_key]:
        model.train_on_batch(x, y)
    return initial, model.get_weights()


BATCHES = {"sequences": sequence_batches()}


def assert_trained_like(weights, initial, expected, rtol=1e-5):
    assert all(np.isfinite(w).all() for w in weights)
    assert all(not np.allclose(w, i) for w, i in zip(weights, initial))
    for w, e in zip(weights, expected):
        np.testing.assert_allclose(w, e, rtol=rtol, atol=rtol / 10)


# XLA fuses and reorders the float32 reductions; φ = none divides each
# element by its own small v, which carries that rounding (~2e-5 here).
XLA_RTOL = 1e-4


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("config", CONFIGS)
def test_from_generator_none_dims_equals_known_shapes(config, jit_compile):
    initial, expected = eager_reference(config)
    model = sequence_model()
    model.set_weights(initial)
    model.compile(optimizer=optimizer(config),
                  loss="sparse_categorical_crossentropy",
                  jit_compile=jit_compile)
    model.fit(generator_dataset(BATCHES["sequences"]), verbose=0)
    assert_trained_like(model.get_weights(), initial, expected,
                        XLA_RTOL if jit_compile else 1e-5)


@pytest.mark.parametrize("config", ["max", "none"])
def test_from_generator_two_epochs_equals_eager(config):
    # The dataset's cardinality is unknown: each epoch ends on a call that
    # finds no batch. That call must not count a step: the step counts
    # select the window's slots.
    initial, _ = eager_reference(config)
    reference = sequence_model()
    reference.set_weights(initial)
    reference.compile(optimizer=optimizer(config),
                      loss="sparse_categorical_crossentropy",
                      run_eagerly=True)
    for _ in range(2):
        for x, y in BATCHES["sequences"]:
            reference.train_on_batch(x, y)

    model = sequence_model()
    model.set_weights(initial)
    model.compile(optimizer=optimizer(config),
                  loss="sparse_categorical_crossentropy")
    model.fit(generator_dataset(BATCHES["sequences"]), epochs=2, verbose=0)
    assert_trained_like(model.get_weights(), initial,
                        reference.get_weights())
    np.testing.assert_array_equal(
        model.optimizer._step_counts.numpy(), [2 * len(LENGTHS)] * 4)


@pytest.mark.parametrize("config", ["max-axes0", "none"])
def test_padded_batch_equals_eager_padded_batches(config):
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(1)
    # Batches of 6 whose longest sequences differ: 3, 6, 2, 5.
    lengths = np.concatenate([rng.integers(1, top + 1, size=6)
                              for top in (3, 6, 2, 5)])
    lengths[::6] = (3, 6, 2, 5)
    sequences = [rng.normal(size=(n, FEATURES)).astype("float32")
                 for n in lengths]
    labels = rng.integers(0, CLASSES, size=24).astype("int64")
    ds = tf.data.Dataset.from_generator(
        lambda: zip(sequences, labels),
        output_signature=(tf.TensorSpec((None, FEATURES), tf.float32),
                          tf.TensorSpec((), tf.int64)),
    ).padded_batch(6)
    padded = [(x.numpy(), y.numpy()) for x, y in ds]
    assert len({x.shape[1] for x, _ in padded}) > 1  # lengths differ

    reference = sequence_model()
    initial = reference.get_weights()
    reference.compile(optimizer=optimizer(config),
                      loss="sparse_categorical_crossentropy",
                      run_eagerly=True)
    for x, y in padded:
        reference.train_on_batch(x, y)

    model = sequence_model()
    model.set_weights(initial)
    model.compile(optimizer=optimizer(config),
                  loss="sparse_categorical_crossentropy")
    model.fit(ds, verbose=0)
    assert_trained_like(model.get_weights(), initial, reference.get_weights())


def custom_loop_step(model, opt, jit_compile, traced_shapes):
    tf = pytest.importorskip("tensorflow")
    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    @tf.function(
        input_signature=[tf.TensorSpec((None, None, FEATURES), tf.float32),
                         tf.TensorSpec((None,), tf.int64)],
        jit_compile=jit_compile,
    )
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        traced_shapes.extend(tuple(g.shape.as_list()) for g in grads)
        opt.apply(grads, model.trainable_variables)
        return loss

    return step


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_tf_function_input_signature_apply_equals_eager(jit_compile):
    config = "max-axes0"
    initial, expected = eager_reference(config)
    model = sequence_model()
    model.set_weights(initial)
    opt = optimizer(config)
    traced = []
    step = custom_loop_step(model, opt, jit_compile, traced)
    for x, y in BATCHES["sequences"]:
        step(x, y)
    # The kernel's gradient had a partial static shape.
    assert (None, HIDDEN) in traced
    assert int(opt.iterations.numpy()) == len(LENGTHS)
    assert_trained_like(model.get_weights(), initial, expected,
                        XLA_RTOL if jit_compile else 1e-5)


def embedding_model(vocab=12):
    return keras.Sequential([
        keras.Input((None,), dtype="int32"),
        keras.layers.Embedding(vocab, 3),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(CLASSES, activation="softmax"),
    ])


@pytest.mark.parametrize("config", ["max", "none"])
def test_embedding_slices_of_variable_length_input(config):
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(2)
    # Ids 9..11 never occur: their rows must not move.
    batches = [(rng.integers(0, 9, size=(4, n)).astype("int32"),
                rng.integers(0, CLASSES, size=4).astype("int64"))
               for n in (3, 5, 2, 4, 6, 3)]
    ds = tf.data.Dataset.from_generator(
        lambda: iter(batches),
        output_signature=(tf.TensorSpec((None, None), tf.int32),
                          tf.TensorSpec((None,), tf.int64)),
    )
    model = embedding_model()
    with tf.GradientTape() as tape:
        out = model(batches[0][0])
    assert isinstance(tape.gradient(out, model.trainable_variables[0]),
                      tf.IndexedSlices)
    initial = model.get_weights()

    reference = embedding_model()
    reference.set_weights(initial)
    reference.compile(optimizer=optimizer(config),
                      loss="sparse_categorical_crossentropy",
                      run_eagerly=True)
    for x, y in batches:
        reference.train_on_batch(x, y)

    model.compile(optimizer=optimizer(config),
                  loss="sparse_categorical_crossentropy")
    model.fit(ds, verbose=0)
    trained = model.get_weights()
    np.testing.assert_array_equal(trained[0][9:], initial[0][9:])
    assert not np.allclose(trained[0][:9], initial[0][:9])
    for w, e in zip(trained, reference.get_weights()):
        assert np.isfinite(w).all()
        np.testing.assert_allclose(w, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", ["max", "none"])
def test_runtime_shape_mismatch_raises_and_keeps_state(config):
    tf = pytest.importorskip("tensorflow")
    variable = keras.Variable(np.ones((4, 3), "float32"))
    opt = optimizer(config)
    opt.build([variable])

    @tf.function(input_signature=[tf.TensorSpec((None, 3), tf.float32)])
    def step(gradient):
        opt.apply([gradient], [variable])

    step(tf.fill((4, 3), 0.5))  # the right shape: a step
    # Keras's own `iterations` counts the failed call too (so does Adam's, in
    # a graph): only AdaShift's state is checked.
    own = [v for v in opt.variables if v is not opt.iterations]
    before = [v.numpy().copy() for v in own]
    with pytest.raises(tf.errors.InvalidArgumentError):
        step(tf.fill((5, 3), 0.5))
    np.testing.assert_array_equal(variable.numpy(), np.ones((4, 3)))
    for v, b in zip(own, before):
        np.testing.assert_array_equal(v.numpy(), b, err_msg=v.path)


@pytest.mark.slow
def test_mirrored_none_dims_equals_one_device(tmp_path):
    out = tmp_path / "result.json"
    result = spawn.run("mirrored_unknown_shapes.py", out, result_path=out)
    assert sorted(result) == ["max-axes0", "none"]
    for config in result:
        one, mirrored = result[config]["one"], result[config]["mirrored"]
        assert mirrored["replicas"] == 2
        assert mirrored["kernel_gradient_shape"][0] is None
        assert one["iterations"] == mirrored["iterations"]
        assert mirrored["replica_drift"] <= 1e-6, mirrored["replica_drift"]
        for i, w in zip(one["initial"], one["weights"]):
            assert np.isfinite(w).all() and not np.allclose(i, w)
        # The replicas' gradients are summed in another order: φ = none
        # divides each element by its own small v, which carries that.
        rtol = 1e-4 if config == "none" else 1e-6
        for m, o in zip(mirrored["weights"], one["weights"]):
            np.testing.assert_allclose(np.array(m), np.array(o), rtol=rtol,
                                       atol=rtol)
