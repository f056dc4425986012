"""Embedding gradients arrive as tf.IndexedSlices on TensorFlow."""

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from conftest import only_on
from keras_adashift import AdaShift

VOCAB, DIM = 7, 3


class OneHotEmbedding(keras.layers.Layer):
    """An Embedding written as one_hot @ kernel: its gradient is dense."""

    def build(self, input_shape):
        self.embeddings = self.add_weight(shape=(VOCAB, DIM), name="emb")

    def call(self, ids):
        return ops.matmul(ops.one_hot(ids, VOCAB), self.embeddings)


def model_with(embedding):
    return keras.Sequential(
        [
            keras.Input((4,), dtype="int32"),
            embedding,
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )


@only_on("tensorflow")
def test_embedding_fit_equals_dense_equivalent():
    rng = np.random.default_rng(0)
    # Repeated ids in a batch: the window must hold their summed gradient.
    # Ids 5 and 6 never occur: their rows must stay untouched.
    x = rng.integers(0, 5, size=(24, 4)).astype("int32")
    y = rng.normal(size=(24, 1)).astype("float32")
    sparse = model_with(keras.layers.Embedding(VOCAB, DIM))
    dense = model_with(OneHotEmbedding())
    dense.set_weights(sparse.get_weights())
    initial = sparse.get_weights()

    with tf.GradientTape() as tape:
        loss = ops.mean(ops.square(sparse(x[:8]) - y[:8]))
    grad = tape.gradient(loss, sparse.trainable_variables[0])
    assert isinstance(grad, tf.IndexedSlices)

    for model in (sparse, dense):
        model.compile(
            optimizer=AdaShift(learning_rate=0.05, keep_num=2), loss="mse"
        )
        model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)
    trained = sparse.get_weights()
    assert not np.allclose(trained[0][:5], initial[0][:5])
    np.testing.assert_array_equal(trained[0][5:], initial[0][5:])
    for s, d in zip(trained, dense.get_weights()):
        np.testing.assert_allclose(s, d, rtol=1e-5, atol=1e-6)
