"""The model families of the task suite: data and models, all tiny.

Every data set ships with scikit-learn or is generated with a known rule, and
is made once per suite (seed 0) and shared by every run of its family; the
run's seed sets the weights and the batch order. Each family's metric is
"higher is better" (accuracy, R², or the GAN score), so one threshold rule
serves all of them.
"""

import dataclasses

import keras
import numpy as np

# The text task of issue 12: label = whether one of the signal tokens occurs.
VOCABULARY, SEQUENCE_LENGTH, SIGNAL_TOKENS, SEQUENCES = 2000, 40, 35, 4000


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: how to get its data and build its model.

    `unit_axes` is the `spatial_axes` that gives one block per output unit
    of its layers. `epochs` is the full budget; `quick_epochs` that of
    `--quick`. A GAN family is trained by `gan.train`, not `fit`.
    """

    name: str
    description: str
    metric: str
    threshold: float
    epochs: int
    quick_epochs: int
    batch_size: int
    load: object
    build: object
    loss: str = "sparse_categorical_crossentropy"
    unit_axes: object = 0
    gan: bool = False


def digits_data():
    """sklearn's 8x8 digits in [0, 1], a fixed stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )
    return {"x": x_train, "y": y_train, "x_val": x_val, "y_val": y_val}


def autoencoder_data():
    """The digits as their own targets."""
    data = digits_data()
    return {"x": data["x"], "y": data["x"], "x_val": data["x_val"],
            "y_val": data["x_val"]}


def text_data(seed=0):
    """Token sequences; label 1 iff one of the signal tokens occurs.

    With 35 signal tokens among 2000 and 40 tokens a sequence, about half
    the sequences contain one, so the classes are balanced.
    """
    rng = np.random.default_rng(seed)
    signal = rng.choice(np.arange(1, VOCABULARY), SIGNAL_TOKENS,
                        replace=False)
    x = rng.integers(1, VOCABULARY, (SEQUENCES, SEQUENCE_LENGTH))
    y = np.isin(x, signal).any(axis=1).astype("int32")
    split = SEQUENCES * 4 // 5
    return {"x": x[:split].astype("int32"), "y": y[:split],
            "x_val": x[split:].astype("int32"), "y_val": y[split:]}


def regression_data(seed=0, samples=2000, features=8):
    """y = sin(2 x0) + x1 x2 + 0.5 x3 + noise (sd 0.1), standardised."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, features)).astype("float32")
    y = np.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2] + 0.5 * x[:, 3]
    y = y + 0.1 * rng.standard_normal(samples)
    y = ((y - y.mean()) / y.std()).astype("float32")[:, None]
    split = samples * 4 // 5
    return {"x": x[:split], "y": y[:split], "x_val": x[split:],
            "y_val": y[split:]}


def mlp():
    return keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ], name="mlp")


def convnet():
    return keras.Sequential([
        keras.Input((64,)),
        keras.layers.Reshape((8, 8, 1)),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(10, activation="softmax"),
    ], name="convnet")


def recurrent(layer):
    """Embedding(2000, 32), an LSTM or GRU of 32 units, a sigmoid unit."""
    def build():
        return keras.Sequential([
            keras.Input((SEQUENCE_LENGTH,), dtype="int32"),
            keras.layers.Embedding(VOCABULARY, 32),
            layer(32),
            keras.layers.Dense(1, activation="sigmoid"),
        ], name=layer.__name__.lower())

    return build


def transformer():
    """One encoder block (2 heads, feed-forward 64) and mean pooling.

    No position embedding: the label does not depend on token order.
    """
    tokens = keras.Input((SEQUENCE_LENGTH,), dtype="int32")
    x = keras.layers.Embedding(VOCABULARY, 32)(tokens)
    attended = keras.layers.MultiHeadAttention(2, 16)(x, x)
    x = keras.layers.LayerNormalization()(x + attended)
    hidden = keras.layers.Dense(64, activation="relu")(x)
    x = keras.layers.LayerNormalization()(x + keras.layers.Dense(32)(hidden))
    x = keras.layers.GlobalAveragePooling1D()(x)
    out = keras.layers.Dense(1, activation="sigmoid")(x)
    return keras.Model(tokens, out, name="transformer")


def zero_output_regressor():
    """An MLP whose output layer starts at zero: the layers in front of it
    get exactly zero gradients on the first step."""
    return keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(1, kernel_initializer="zeros"),
    ], name="regression")


def autoencoder():
    return keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(8),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(64, activation="sigmoid"),
    ], name="autoencoder")


def _gan_data():
    from keras_adashift.experiments import gan

    return gan.data()


FAMILIES = {
    family.name: family
    for family in (
        Family("mlp", "MLP 64-64-64-10 on digits", "val accuracy", 0.95,
               epochs=8, quick_epochs=3, batch_size=32, load=digits_data,
               build=mlp),
        Family("convnet", "2-conv CNN on digits", "val accuracy", 0.95,
               epochs=8, quick_epochs=3, batch_size=32, load=digits_data,
               build=convnet, unit_axes=(0, 1, 2)),
        Family("lstm", "Embedding + LSTM(32), signal-token text",
               "val accuracy", 0.9, epochs=5, quick_epochs=2,
               batch_size=64, load=text_data,
               build=recurrent(keras.layers.LSTM),
               loss="binary_crossentropy"),
        Family("gru", "Embedding + GRU(32), signal-token text",
               "val accuracy", 0.9, epochs=5, quick_epochs=2,
               batch_size=64, load=text_data,
               build=recurrent(keras.layers.GRU),
               loss="binary_crossentropy"),
        Family("transformer", "1-block Transformer encoder, same text",
               "val accuracy", 0.9, epochs=5, quick_epochs=2,
               batch_size=64, load=text_data, build=transformer,
               loss="binary_crossentropy"),
        Family("regression", "MLP 8-64-64-1, zero-initialised output",
               "val R²", 0.9, epochs=8, quick_epochs=3, batch_size=32,
               load=regression_data, build=zero_output_regressor,
               loss="mse"),
        Family("autoencoder", "dense 64-32-8-32-64 on digits",
               "val R²", 0.5, epochs=8, quick_epochs=3, batch_size=32,
               load=autoencoder_data, build=autoencoder, loss="mse"),
        Family("wgan", "WGAN-GP on 4 Gaussians in 2-D",
               "-sliced W1", -0.2, epochs=5, quick_epochs=2,
               batch_size=128, load=_gan_data, build=None, loss=None,
               gan=True),
    )
}
