"""AdaShift trains KerasHub models built from tiny random configs (no
presets): a BertTextClassifier from NumPy and tf.data (also under XLA), saved
and loaded with its optimizer state, and a GPT-2 causal LM.
"""

import keras
import numpy as np
import pytest

from conftest import only_on
from keras_adashift import AdaShift

keras_hub = pytest.importorskip("keras_hub")

pytestmark = pytest.mark.slow

VOCAB, LENGTH, EXAMPLES, BATCH = 100, 16, 24, 4
BERT = dict(vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=16,
            intermediate_dim=32, max_sequence_length=LENGTH, dropout=0.0)


@pytest.fixture(scope="module")
def bert_data():
    """Integer inputs of the classifier (padded at the end) and labels."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, LENGTH + 1, size=EXAMPLES)
    mask = np.arange(LENGTH)[None] < lengths[:, None]
    x = {
        "token_ids": np.where(mask, rng.integers(1, VOCAB, (EXAMPLES, LENGTH)),
                              0).astype("int32"),
        "segment_ids": (mask & (np.arange(LENGTH)[None] >= lengths[:, None]
                                // 2)).astype("int32"),
        "padding_mask": mask.astype("int32"),
    }
    y = rng.integers(0, 2, size=EXAMPLES).astype("int32")
    return x, y


def bert_classifier():
    backbone = keras_hub.models.BertBackbone(**BERT)
    return keras_hub.models.BertTextClassifier(
        backbone, num_classes=2, preprocessor=None, dropout=0.0)


def compiled(model, **compile_kwargs):
    model.compile(
        optimizer=AdaShift(learning_rate=0.01, keep_num=2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **compile_kwargs,
    )
    return model


def weights(model):
    return [np.array(w) for w in model.get_weights()]


def predict(model, x):
    # A direct call: `predict` compiles one more function per model.
    return np.array(keras.ops.convert_to_numpy(model(x, training=False)))


def assert_trained(before, after):
    assert all(np.isfinite(w).all() for w in after)
    moved = [not np.array_equal(b, a) for b, a in zip(before, after)]
    assert sum(moved) >= 0.9 * len(moved), f"{sum(moved)}/{len(moved)} moved"


def assert_weights_close(actual, expected, rtol=1e-5, atol=1e-6):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def bert_fit(bert_data, tmp_path_factory):
    """One classifier fitted from NumPy and saved; what it gave, as arrays.

    `next` is the weights after one more step of the fitted model (taken
    after saving), for the loaded copies to match.
    """
    x, y = bert_data
    keras.utils.set_random_seed(0)
    model = compiled(bert_classifier())
    initial = weights(model)
    history = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False,
                        verbose=0)
    path = str(tmp_path_factory.mktemp("bert") / "bert.keras")
    model.save(path)
    result = dict(
        initial=initial, final=weights(model), loss=history.history["loss"],
        step_counts=np.array(model.optimizer._step_counts),
        trainable=len(model.trainable_variables), path=path,
        config=model.optimizer.get_config(),
        optimizer=[np.array(v) for v in model.optimizer.variables],
        predictions=predict(model, x),
    )
    model.train_on_batch({k: v[:BATCH] for k, v in x.items()}, y[:BATCH])
    result["next"] = weights(model)
    return result


def test_bert_classifier_fits_from_numpy(bert_fit):
    assert np.isfinite(bert_fit["loss"]).all()
    assert_trained(bert_fit["initial"], bert_fit["final"])
    steps = EXAMPLES // BATCH
    np.testing.assert_array_equal(bert_fit["step_counts"],
                                  [steps] * bert_fit["trainable"])


@only_on("tensorflow")
@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_bert_classifier_tf_data_equals_numpy(bert_data, bert_fit,
                                              jit_compile):
    tf = pytest.importorskip("tensorflow")
    x, y = bert_data
    model = compiled(bert_classifier(), jit_compile=jit_compile)
    model.set_weights(bert_fit["initial"])
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).prefetch(1)
    model.fit(ds, verbose=0)
    assert_trained(bert_fit["initial"], weights(model))
    tol = 1e-4 if jit_compile else 1e-5  # XLA reorders float32 sums
    assert_weights_close(weights(model), bert_fit["final"], rtol=tol,
                         atol=tol)


def assert_same_state(loaded, expected, x, y):
    """Same predictions, same optimizer state, and the same next step."""
    assert isinstance(loaded.optimizer, AdaShift)
    assert loaded.optimizer.get_config() == expected["config"]
    np.testing.assert_allclose(
        predict(loaded, x),
        expected["predictions"], rtol=1e-6, atol=1e-6)
    assert len(loaded.optimizer.variables) == len(expected["optimizer"])
    for a, b in zip(loaded.optimizer.variables, expected["optimizer"]):
        np.testing.assert_array_equal(np.array(a), b, err_msg=a.path)
    # The restored window and moments give the same next step.
    loaded.train_on_batch({k: v[:BATCH] for k, v in x.items()}, y[:BATCH])
    assert_trained(expected["final"], weights(loaded))
    assert_weights_close(weights(loaded), expected["next"])


def test_bert_classifier_save_load_round_trip(bert_data, bert_fit):
    x, y = bert_data
    # A KerasHub task overrides `compile`, so `load_model` leaves it with
    # the task's default compile (Keras warns): compile it again, then load
    # the saved weights, which hold the optimizer's state.
    with pytest.warns(UserWarning, match="compile"):
        loaded = keras.models.load_model(bert_fit["path"])
    loaded.compile(
        optimizer=keras.optimizers.deserialize(
            {"class_name": "keras_adashift>AdaShift",
             "config": bert_fit["config"]}),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    loaded.optimizer.build(loaded.trainable_variables)
    loaded.load_weights(bert_fit["path"])
    assert_same_state(loaded, bert_fit, x, y)


def test_bert_backbone_in_functional_model_load_model_round_trip(
        bert_data, tmp_path):
    # A plain Keras model around the backbone: `load_model` compiles it from
    # the saved config, AdaShift and its state included.
    x, y = bert_data
    backbone = keras_hub.models.BertBackbone(**BERT)
    logits = keras.layers.Dense(2)(backbone(backbone.input)["pooled_output"])
    model = compiled(keras.Model(backbone.input, logits))
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    path = str(tmp_path / "bert_functional.keras")
    model.save(path)
    expected = dict(
        config=model.optimizer.get_config(), final=weights(model),
        optimizer=[np.array(v) for v in model.optimizer.variables],
        predictions=predict(model, x),
    )
    model.train_on_batch({k: v[:BATCH] for k, v in x.items()}, y[:BATCH])
    expected["next"] = weights(model)
    loaded = keras.models.load_model(path)
    assert_same_state(loaded, expected, x, y)


def test_gpt2_causal_lm_takes_steps():
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB, num_layers=1, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=LENGTH, dropout=0.0)
    lm = keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
    lm.compile(optimizer=AdaShift(learning_rate=0.01, keep_num=2))
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, VOCAB, size=(16, LENGTH + 1)).astype("int32")
    x = {"token_ids": tokens[:, :-1],
         "padding_mask": np.ones((16, LENGTH), "int32")}
    before = weights(lm)
    history = lm.fit(x, tokens[:, 1:], batch_size=BATCH, epochs=2,
                     shuffle=False, verbose=0)
    losses = history.history["loss"]
    assert np.isfinite(losses).all()
    assert_trained(before, weights(lm))
    # The tied embedding (a lookup and the output projection) moved.
    embedding = backbone.token_embedding.embeddings
    assert not np.allclose(np.array(embedding), before[0])
    assert losses[1] < losses[0]
