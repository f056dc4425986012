"""tf.data pipelines feed AdaShift the same batches as NumPy does, on every
backend that takes tf.data: variable-length `padded_batch`, ragged batches
made dense in a `map`, `prefetch` with `repeat` and `steps_per_epoch`; and,
on TensorFlow, a distributed dataset under MirroredStrategy.
"""

import keras
import numpy as np
import pytest

import spawn
from conftest import only_on
from keras_adashift import AdaShift

tf = pytest.importorskip("tensorflow")

FEATURES, EXAMPLES, BATCH, EPOCHS = 4, 24, 6, 2


@pytest.fixture(scope="module")
def sequences():
    """Variable-length float sequences (the longest of each batch differs)
    and int labels."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 7, size=EXAMPLES)
    lengths[::BATCH] = (3, 6, 2, 5)
    xs = [rng.normal(size=(n, FEATURES)).astype("float32") for n in lengths]
    y = rng.integers(0, 2, size=EXAMPLES).astype("int32")
    return xs, y


def padded_numpy_batches(xs, y):
    """What padding each batch to its longest sequence gives, in NumPy."""
    out = []
    for start in range(0, EXAMPLES, BATCH):
        chunk = xs[start:start + BATCH]
        x = np.zeros((len(chunk), max(len(s) for s in chunk), FEATURES),
                     "float32")
        for i, s in enumerate(chunk):
            x[i, :len(s)] = s
        out.append((x, y[start:start + BATCH]))
    assert len({x.shape[1] for x, _ in out}) > 1
    return out


def sequence_model():
    return keras.Sequential([
        keras.Input((None, FEATURES)),
        keras.layers.Dense(5, activation="relu"),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(2),
    ])


def compiled(model):
    model.compile(
        optimizer=AdaShift(learning_rate=0.05, keep_num=3, spatial_axes=0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def reference_weights(initial, batches, epochs=EPOCHS):
    """The batches one by one, each of fully known shape."""
    model = compiled(sequence_model())
    model.set_weights(initial)
    for _ in range(epochs):
        for x, y in batches:
            model.train_on_batch(x, y)
    return model.get_weights()


def fit_and_compare(ds, batches, **fit_kwargs):
    model = compiled(sequence_model())
    initial = model.get_weights()
    model.fit(ds, epochs=EPOCHS, verbose=0, **fit_kwargs)
    weights = model.get_weights()
    assert all(np.isfinite(w).all() for w in weights)
    assert all(not np.allclose(w, i) for w, i in zip(weights, initial))
    for w, e in zip(weights, reference_weights(initial, batches)):
        np.testing.assert_allclose(w, e, rtol=1e-5, atol=1e-6)
    steps = len(batches) * EPOCHS
    np.testing.assert_array_equal(np.array(model.optimizer._step_counts),
                                  [steps] * len(model.trainable_variables))


def test_padded_batch_of_variable_length_equals_numpy(sequences):
    xs, y = sequences
    ds = tf.data.Dataset.from_generator(
        lambda: zip(xs, y),
        output_signature=(tf.TensorSpec((None, FEATURES), tf.float32),
                          tf.TensorSpec((), tf.int32)),
    ).apply(tf.data.experimental.assert_cardinality(EXAMPLES))
    ds = ds.padded_batch(BATCH)
    fit_and_compare(ds, padded_numpy_batches(xs, y))


def test_ragged_to_dense_in_map_equals_numpy(sequences):
    xs, y = sequences
    ragged = tf.ragged.constant([s.tolist() for s in xs], ragged_rank=1,
                                dtype=tf.float32)
    ds = (tf.data.Dataset.from_tensor_slices((ragged, y)).batch(BATCH)
          .map(lambda x, y: (x.to_tensor(), y)))
    fit_and_compare(ds, padded_numpy_batches(xs, y))


def test_prefetch_repeat_with_steps_per_epoch_equals_numpy(sequences):
    xs, y = sequences
    batches = padded_numpy_batches(xs, y)
    ds = tf.data.Dataset.from_generator(
        lambda: iter(batches),
        output_signature=(tf.TensorSpec((None, None, FEATURES), tf.float32),
                          tf.TensorSpec((None,), tf.int32)))
    ds = ds.repeat().prefetch(tf.data.AUTOTUNE)
    fit_and_compare(ds, batches, steps_per_epoch=len(batches))


@only_on("tensorflow")
@pytest.mark.slow
def test_distributed_dataset_mirrored_equals_one_device(tmp_path):
    out = tmp_path / "result.json"
    result = spawn.run("mirrored_tf_data.py", out, result_path=out)
    one, mirrored = result["one"], result["mirrored"]
    assert mirrored["replicas"] == 2
    assert mirrored["per_replica_batch"] == [3, 3]
    assert one["steps"] == mirrored["steps"] == 8
    assert one["step_counts"] == mirrored["step_counts"] == [8] * 4
    assert mirrored["replica_copies_equal"]
    for i, w in zip(one["initial"], one["weights"]):
        assert np.isfinite(w).all() and not np.allclose(i, w)
    for m, o in zip(mirrored["weights"], one["weights"]):
        np.testing.assert_allclose(np.array(m), np.array(o), rtol=1e-5,
                                   atol=1e-6)
