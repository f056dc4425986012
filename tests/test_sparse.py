"""Sparse gradients equal the dense gradient they stand for: tf.IndexedSlices
(repeated indices, Embedding under a tape and in fit) and JAX's BCOO.
"""

import keras
import numpy as np
import pytest
from keras import ops

from conftest import only_on
from keras_adashift import AdaShift
from reference import adashift_trajectory
from trajectories import LR
from trajectories import RTOL
from trajectories import assert_trajectory_close

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
    tf = pytest.importorskip("tensorflow")
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


def _sparse_case(steps=8):
    rng = np.random.default_rng(7)
    theta0 = rng.normal(size=(5, 3))
    indices = [rng.integers(0, 5, size=6) for _ in range(steps)]
    values = [rng.normal(size=(6, 3)) * 10 ** rng.uniform(-2, 2)
              for _ in range(steps)]
    dense = []
    for idx, val in zip(indices, values):
        d = np.zeros((5, 3))
        np.add.at(d, idx, val)  # a repeated row counts once per occurrence
        dense.append(d)
    return theta0, indices, values, dense


@only_on("tensorflow")
@pytest.mark.usefixtures("floatx_like_the_variables")
def test_indexed_slices_with_repeated_indices_equal_dense_sum():
    tf = pytest.importorskip("tensorflow")
    theta0, indices, values, dense = _sparse_case()
    assert any(len(set(i)) < len(i) for i in indices)
    kwargs = dict(learning_rate=LR, keep_num=2, beta_1=0.5, beta_2=0.9,
                  spatial_axes=-1)
    sparse_var = keras.Variable(theta0, dtype="float64")
    dense_var = keras.Variable(theta0, dtype="float64")
    sparse_opt, dense_opt = AdaShift(**kwargs), AdaShift(**kwargs)
    got_sparse, got_dense = [], []
    for idx, val, d in zip(indices, values, dense):
        slices = tf.IndexedSlices(tf.constant(val), tf.constant(idx),
                                  dense_shape=tf.constant([5, 3]))
        sparse_opt.apply_gradients([(slices, sparse_var)])
        dense_opt.apply_gradients([(tf.constant(d), dense_var)])
        got_sparse.append(sparse_var.numpy())
        got_dense.append(dense_var.numpy())
    expected = np.stack(adashift_trajectory(
        theta0, dense, learning_rate=LR, keep_num=2, beta_1=0.5, beta_2=0.9,
        axes=(1,)))
    assert_trajectory_close(np.stack(got_sparse), np.stack(got_dense),
                            theta0, 1e-14, "IndexedSlices vs dense")
    assert_trajectory_close(np.stack(got_dense), expected, theta0,
                            RTOL["float64"], "dense vs reference")


@only_on("tensorflow")
@pytest.mark.usefixtures("floatx_like_the_variables")
def test_embedding_sparse_gradients_match_densified_training():
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(3)
    x = rng.integers(0, 7, size=(8, 4)).astype("int32")
    y = rng.normal(size=(8, 1))

    def model():
        inputs = keras.Input(shape=(4,), dtype="int32")
        h = keras.layers.Embedding(7, 3, dtype="float64")(inputs)
        h = keras.layers.Flatten(dtype="float64")(h)
        outputs = keras.layers.Dense(1, dtype="float64")(h)
        return keras.Model(inputs, outputs)

    def optimizer():
        return AdaShift(learning_rate=2.0**-4, keep_num=2, beta_1=0.5,
                        spatial_axes=-1)

    fitted, sparse, densified = model(), model(), model()
    initial = fitted.get_weights()
    for m in (sparse, densified):
        m.set_weights(initial)
    loss_fn = keras.losses.MeanSquaredError()

    def tape_step(m, opt, densify):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, m(x, training=True))
        grads = tape.gradient(loss, m.trainable_variables)
        assert isinstance(grads[0], tf.IndexedSlices)
        if densify:
            grads = [tf.convert_to_tensor(g) for g in grads]
        opt.apply_gradients(zip(grads, m.trainable_variables))

    sparse_opt, dense_opt = optimizer(), optimizer()
    steps = 6
    for _ in range(steps):
        tape_step(sparse, sparse_opt, densify=False)
        tape_step(densified, dense_opt, densify=True)
        for a, b in zip(sparse.get_weights(), densified.get_weights()):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)

    fitted.compile(optimizer=optimizer(), loss="mse")
    fitted.fit(x, y, batch_size=8, epochs=steps, shuffle=False, verbose=0)
    for a, b in zip(fitted.get_weights(), densified.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    # The embedding must have been updated, or the comparison proves little.
    assert not np.allclose(densified.get_weights()[0], initial[0])


@only_on("jax")
def test_jax_bcoo_gradient_equals_dense():
    import jax.numpy as jnp
    from jax.experimental import sparse

    theta = np.arange(15, dtype="float32").reshape(5, 3) / 10 - 0.7
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=(5, 3)).astype("float32") for _ in range(5)]
    for g in grads:
        g[[1, 3]] = 0  # rows without a gradient
    trajectories = []
    for to_sparse in (False, True):
        w = keras.Variable(theta, name="embedding")
        optimizer = AdaShift(learning_rate=0.1, keep_num=2)
        trajectory = []
        for g in grads:
            g = jnp.asarray(g)
            optimizer.apply_gradients(
                [(sparse.BCOO.fromdense(g) if to_sparse else g, w)])
            trajectory.append(ops.convert_to_numpy(w).copy())
        trajectories.append(trajectory)
    dense, sparse_ = trajectories
    assert not np.allclose(dense[-1], theta)
    for t, (d, s) in enumerate(zip(dense, sparse_)):
        np.testing.assert_allclose(s, d, rtol=1e-6, atol=1e-6,
                                   err_msg=f"step {t + 1}")
