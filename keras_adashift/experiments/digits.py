"""Small networks on scikit-learn's 8x8 digits (1797 images, ships with it).

The paper's MNIST runs (an MLP 784-256-256-10, max-AdaShift at lr 1e-2 with
n = 10 and β1 = 0 against Adam and AMSGrad at 1e-3) scaled to a data set
that needs no download: the MLP takes 64 inputs, and a small CNN reads the
8x8 images.
"""

import dataclasses
import time

import keras
import numpy as np

from keras_adashift import AdaShift

MODELS = ("mlp", "cnn")
TARGET_ACCURACY = 0.95


def load(seed=0, test_size=0.25):
    """The digits as float32 in [0, 1], split once, stratified, by `seed`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    return train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=y
    )


def build_model(kind="mlp"):
    """The MLP 64-256-256-10 or a two-convolution CNN on the 8x8 images."""
    if kind == "mlp":
        layers = [
            keras.Input((64,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    elif kind == "cnn":
        layers = [
            keras.Input((64,)),
            keras.layers.Reshape((8, 8, 1)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    else:
        raise ValueError(f"model must be one of {MODELS}: {kind!r}")
    return keras.Sequential(layers, name=kind)


def default_optimizers():
    """The paper's MNIST settings, by label, as zero-argument factories."""
    return {
        "max-AdaShift": lambda: AdaShift(1e-2, keep_num=10, beta_1=0.0),
        # Element-wise v has Adam's scale, so Adam's learning rate.
        "AdaShift (none)": lambda: AdaShift(
            1e-3, keep_num=10, beta_1=0.0, spatial_op="none"
        ),
        "Adam": lambda: keras.optimizers.Adam(1e-3),
        "AMSGrad": lambda: keras.optimizers.Adam(1e-3, amsgrad=True),
        "SGD": lambda: keras.optimizers.SGD(1e-1),
    }


@dataclasses.dataclass
class Run:
    model: str
    optimizer: str
    seed: int
    train_accuracy: list  # per epoch
    test_accuracy: list  # per epoch
    seconds: float

    @property
    def epochs_to_target(self):
        """First epoch (1-based) with test accuracy >= 95 %, or None."""
        for epoch, accuracy in enumerate(self.test_accuracy, 1):
            if accuracy >= TARGET_ACCURACY:
                return epoch
        return None


def train(model="mlp", optimizer=None, seed=0, epochs=20, batch_size=32,
          data=None):
    """Trains one model; returns a `Run` with per-epoch accuracies.

    `optimizer` is a Keras optimizer instance (default: AdaShift with its
    defaults). The data split is fixed (`load(0)`) unless `data` is given;
    `seed` sets the weights and the batch order.
    """
    keras.utils.set_random_seed(seed)
    x_train, x_test, y_train, y_test = data if data is not None else load()
    network = build_model(model)
    network.compile(
        optimizer=optimizer if optimizer is not None else AdaShift(),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    history = network.fit(
        x_train,
        y_train,
        epochs=epochs,
        batch_size=batch_size,
        validation_data=(x_test, y_test),
        verbose=0,
    )
    return Run(
        model=model,
        optimizer=type(network.optimizer).__name__,
        seed=seed,
        train_accuracy=[float(a) for a in history.history["accuracy"]],
        test_accuracy=[float(a) for a in history.history["val_accuracy"]],
        seconds=time.perf_counter() - start,
    )


def compare(models=MODELS, optimizers=None, seeds=(0, 1, 2), epochs=20,
            progress=True):
    """Every model x optimizer x seed; returns the list of `Run`s."""
    optimizers = optimizers if optimizers is not None else default_optimizers()
    data = load()
    jobs = [
        (m, label, s) for m in models for label in optimizers for s in seeds
    ]
    if progress:
        from tqdm.auto import tqdm

        jobs = tqdm(jobs, desc="digits runs", unit="run")
    runs = []
    for model, label, seed in jobs:
        run = train(model, optimizers[label](), seed, epochs, data=data)
        run.optimizer = label
        runs.append(run)
    return runs


def summarize(runs):
    """Per (model, optimizer): final test accuracy mean and sd over seeds,
    and epochs to 95 % test accuracy (median over seeds that reach it)."""
    groups = {}
    for run in runs:
        groups.setdefault((run.model, run.optimizer), []).append(run)
    rows = []
    for (model, optimizer), group in groups.items():
        final = np.array([r.test_accuracy[-1] for r in group])
        reached = [r.epochs_to_target for r in group
                   if r.epochs_to_target is not None]
        rows.append(
            {
                "model": model,
                "optimizer": optimizer,
                "seeds": len(group),
                "test_accuracy_mean": float(final.mean()),
                "test_accuracy_sd": float(final.std(ddof=1))
                if len(group) > 1 else 0.0,
                "epochs_to_95_test_median": float(np.median(reached))
                if reached else None,
                "seeds_reaching_95": len(reached),
                "seconds_per_run": float(np.mean([r.seconds for r in group])),
            }
        )
    return rows


def table(rows):
    lines = [
        f"{'model':<5} {'optimizer':<16} {'test acc (mean ± sd)':>21} "
        f"{'epochs to 95% test':>19}"
    ]
    for row in rows:
        epochs = row["epochs_to_95_test_median"]
        reach = (
            f"{epochs:g} ({row['seeds_reaching_95']}/{row['seeds']})"
            if epochs is not None else f"never (0/{row['seeds']})"
        )
        lines.append(
            f"{row['model']:<5} {row['optimizer']:<16} "
            f"{row['test_accuracy_mean']:>13.4f} ± "
            f"{row['test_accuracy_sd']:.4f}"
            f" {reach:>19}"
        )
    return "\n".join(lines)


def plot(runs, path):
    """Test accuracy per epoch, one column per model.

    Each optimizer: the mean over seeds as a line and min..max over seeds
    as a band, with its own colour, line style and marker (identical curves
    stay visible). The top row shows the whole range, a diverged run
    included; the bottom row zooms on the best curves, its range in its
    title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from keras_adashift.experiments.plotting import plot_seeds, styles

    models = list(dict.fromkeys(r.model for r in runs))
    labels = list(dict.fromkeys(r.optimizer for r in runs))
    fig, axes = plt.subplots(
        2, len(models), figsize=(5.5 * len(models), 7.5), squeeze=False
    )
    for column, model in enumerate(models):
        best = 0.0
        for label, style in zip(labels, styles(len(labels))):
            curves = [r.test_accuracy for r in runs
                      if r.model == model and r.optimizer == label]
            if not curves:
                continue
            epochs = np.arange(1, len(curves[0]) + 1)
            for ax in axes[:, column]:
                plot_seeds(ax, epochs, curves, label, style)
            best = np.nanmax([best, *np.asarray(curves).ravel()])
        low = max(0.0, best - 0.1)
        axes[1, column].set_ylim(low, min(1.0, best + 0.01))
        for row, ax in enumerate(axes[:, column]):
            ax.axhline(TARGET_ACCURACY, color="grey", lw=0.5, ls="--")
            ax.set(xlabel="epoch", ylabel="test accuracy",
                   title=f"digits, {model}" if row == 0
                   else f"zoom: test accuracy {low:.2f} to {best:.2f}")
        axes[0, column].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
