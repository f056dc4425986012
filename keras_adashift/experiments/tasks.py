"""The task suite: every model family (`families.FAMILIES`) trained by Adam,
AMSGrad, AdaShift at its defaults and the AdaShift settings worth knowing,
each for the same number of steps, over several seeds.

The AdaShift variants change one setting at a time around the defaults
(learning rate, blocks per output unit, φ = none, β1, β2, keep_num,
clipping) rather than the full factorial, so that the whole grid fits in
half an hour on two CPU cores.

Per run the suite records the validation metric after each epoch, the
steps to the family's threshold, whether the run diverged, the largest
|weight| and the largest per-element step relative to Adam's bound
`lr / sqrt(1 - β2)`, measured by `keras_adashift.callbacks.StepMonitor`
(the change of the weights across one optimizer step, so it is the same
statistic for every optimizer).
"""

import dataclasses
import math
import time

import keras
import numpy as np

from keras_adashift import AdaShift
from keras_adashift.callbacks import StepMonitor
from keras_adashift.experiments import gan
from keras_adashift.experiments.families import FAMILIES

# Beyond this |weight| a run counts as diverged, even while finite: the
# models here start with weights below 1 and train for a few hundred steps.
DIVERGED_WEIGHT = 1e3
QUICK_CONTENDERS = ("Adam", "AMSGrad", "AdaShift", "AdaShift per-unit")


def contenders(family):
    """The optimizers, by label, as zero-argument factories.

    Adam and AMSGrad at Keras's defaults; AdaShift at its own; then one
    change at a time. φ = none runs at Adam's 1e-3: its element-wise `v`
    has Adam's scale, while φ = max divides a block by its largest entry.
    "+bound" adds `step_bound=1`, the opt-in per-element bound on the step.
    """
    axes = family.unit_axes
    return {
        "Adam": lambda: keras.optimizers.Adam(),
        "AMSGrad": lambda: keras.optimizers.Adam(amsgrad=True),
        "AdaShift": lambda: AdaShift(),
        "AdaShift lr 1e-3": lambda: AdaShift(1e-3),
        "AdaShift lr 3e-2": lambda: AdaShift(3e-2),
        "AdaShift per-unit": lambda: AdaShift(spatial_axes=axes),
        "AdaShift none lr 1e-3": lambda: AdaShift(1e-3, spatial_op="none"),
        "AdaShift β1 0": lambda: AdaShift(beta_1=0.0),
        "AdaShift β2 0.9": lambda: AdaShift(beta_2=0.9),
        "AdaShift n 1": lambda: AdaShift(keep_num=1),
        "AdaShift n 30": lambda: AdaShift(keep_num=30),
        "AdaShift clipnorm 1": lambda: AdaShift(clipnorm=1.0),
        # The two settings whose steps run past Adam's bound, bounded.
        "AdaShift none lr 1e-3 +bound": lambda: AdaShift(
            1e-3, spatial_op="none", step_bound=1.0),
        "AdaShift per-unit +bound": lambda: AdaShift(
            spatial_axes=axes, step_bound=1.0),
    }


class StepStatistics:
    """Over a run, from `keras_adashift.callbacks.StepMonitor`'s measurement
    of every step: per variable the largest per-element step relative to
    Adam's bound (the monitor's `max_over_bound`), the mean over steps of
    the root-mean-square step relative to it (`rms_over_bound`: the typical
    step), and the largest |weight|.

    `update()` after every optimizer step measures the step since the last
    call (or since construction). Returns True once the run diverged (a
    non-finite weight or step, or a weight beyond `DIVERGED_WEIGHT`).
    """

    def __init__(self, variables, optimizer):
        self.variables = list(variables)
        self.optimizer = optimizer
        # No warnings: the suite reports the numbers themselves.
        self.monitor = StepMonitor(every=1, warn=False)
        self.step_ratio = {}
        self._rms_sum = {}
        self.max_abs_weight = {}
        self.steps = 0
        self.diverged = False
        self.monitor.begin(self.variables, optimizer)
        for name, before in zip(_unique_names(self.variables),
                                self.monitor._before):
            self.max_abs_weight[name] = float(
                np.max(np.abs(before), initial=0.0))

    @classmethod
    def for_optimizer(cls, variables, optimizer):
        return cls(variables, optimizer)

    def update(self):
        self.monitor.end()
        for name, record in self.monitor.by_variable.items():
            ratio, weight = record["max_over_bound"], record["max_abs_weight"]
            if not (math.isfinite(ratio) and math.isfinite(weight)
                    and math.isfinite(record["rms_over_bound"])):
                self.diverged = True
                ratio = weight = math.inf
            self.step_ratio[name] = max(self.step_ratio.get(name, 0.0),
                                        ratio)
            self._rms_sum[name] = (self._rms_sum.get(name, 0.0)
                                   + record["rms_over_bound"])
            self.max_abs_weight[name] = max(self.max_abs_weight[name],
                                            weight)
        self.steps += 1
        self.diverged |= self.largest_weight > DIVERGED_WEIGHT
        self.monitor.begin(self.variables, self.optimizer)
        return self.diverged

    @property
    def rms_step_ratio(self):
        """Per variable, the mean over steps of the RMS step / the bound."""
        steps = max(self.steps, 1)
        return {name: total / steps for name, total in self._rms_sum.items()}

    @property
    def largest_step_ratio(self):
        return max(self.step_ratio.values(), default=0.0)

    @property
    def largest_weight(self):
        return max(self.max_abs_weight.values(), default=0.0)


def _unique_names(variables):
    """Variable paths (TF's raw variables have names only), made unique."""
    names = []
    for variable in variables:
        name = getattr(variable, "path", None) or variable.name
        while name in names:
            name += "'"
        names.append(name)
    return names


class _Tracker(keras.callbacks.Callback):
    """Feeds `StepStatistics` after every batch; stops a diverged run."""

    def on_train_begin(self, logs=None):
        model = self.model  # on JAX, copies fit's state into the variables
        self.statistics = StepStatistics.for_optimizer(
            model.trainable_variables, model.optimizer
        )

    def on_train_batch_end(self, batch, logs=None):
        self.model  # on JAX, copies the step's state into the variables
        loss = (logs or {}).get("loss", 0.0)
        if self.statistics.update() or not math.isfinite(float(loss)):
            self.statistics.diverged = True
            self.model.stop_training = True


@dataclasses.dataclass
class Run:
    family: str
    contender: str
    seed: int
    curve: list  # the validation metric after each epoch (NaN: diverged)
    steps_per_epoch: int
    threshold: float
    diverged: bool
    max_abs_weight: float
    max_step_ratio: float
    step_ratio_by_variable: dict
    rms_step_ratio_by_variable: dict
    max_abs_weight_by_variable: dict
    seconds: float

    @property
    def final(self):
        return self.curve[-1]

    @property
    def steps_to_threshold(self):
        """Steps until the first epoch that reached the threshold, or None.
        """
        for epoch, value in enumerate(self.curve, 1):
            if value >= self.threshold:
                return epoch * self.steps_per_epoch
        return None

    def to_json(self):
        out = dataclasses.asdict(self)
        out["final"] = self.final
        out["steps_to_threshold"] = self.steps_to_threshold
        return _json_safe(out)


def train(family, make_optimizer, seed, epochs, data, label="optimizer"):
    """One run of `family` with a fresh optimizer; returns a `Run`."""
    # Fresh layer names, so that a variable has the same path in every run.
    keras.utils.clear_session(free_memory=False)
    start = time.perf_counter()
    if family.gan:
        curve, statistics = gan.train(
            make_optimizer, seed, epochs, family.batch_size, data["x"],
            StepStatistics.for_optimizer,
        )
        steps_per_epoch = gan.GENERATOR_STEPS_PER_EPOCH
    else:
        curve, statistics = _fit(family, make_optimizer, seed, epochs, data)
        steps_per_epoch = math.ceil(len(data["x"]) / family.batch_size)
    curve = curve + [math.nan] * (epochs - len(curve))
    return Run(
        family=family.name, contender=label, seed=seed, curve=curve,
        steps_per_epoch=steps_per_epoch, threshold=family.threshold,
        diverged=statistics.diverged,
        max_abs_weight=statistics.largest_weight,
        max_step_ratio=statistics.largest_step_ratio,
        step_ratio_by_variable=statistics.step_ratio,
        rms_step_ratio_by_variable=statistics.rms_step_ratio,
        max_abs_weight_by_variable=statistics.max_abs_weight,
        seconds=time.perf_counter() - start,
    )


def _fit(family, make_optimizer, seed, epochs, data):
    keras.utils.set_random_seed(seed)
    model = family.build()
    model.compile(
        optimizer=make_optimizer(), loss=family.loss,
        metrics=["accuracy"] if "accuracy" in family.metric else None,
    )
    tracker = _Tracker()
    history = model.fit(
        data["x"], data["y"], batch_size=family.batch_size, epochs=epochs,
        validation_data=(data["x_val"], data["y_val"]), verbose=0,
        callbacks=[tracker],
    ).history
    if "accuracy" in family.metric:
        curve = history.get("val_accuracy", [])
    else:  # R² from the mean squared error, over all outputs
        y_val = data["y_val"]
        variance = np.mean((y_val - y_val.mean(axis=0)) ** 2)
        curve = [1 - loss / variance for loss in history.get("val_loss", [])]
    curve = [float(value) for value in curve]
    if tracker.statistics.diverged and curve:
        curve[-1] = math.nan  # the epoch it diverged in did not finish
    return curve, tracker.statistics


def run(families=None, contenders_of=contenders, seeds=(0, 1, 2),
        quick=False, epochs=None, progress=True):
    """Runs every family x contender x seed; returns the list of `Run`s.

    `contenders_of(family)` gives the factories by label (default: all of
    `contenders`; with `quick`, the `QUICK_CONTENDERS`). `epochs` overrides
    each family's budget. The GAN family needs TensorFlow and is skipped
    on other backends.
    """
    names = list(families or FAMILIES)
    if not gan.available():
        names = [n for n in names if not FAMILIES[n].gan]
    jobs = []
    for name in names:
        family = FAMILIES[name]
        options = contenders_of(family)
        if quick and contenders_of is contenders:
            options = {k: options[k] for k in QUICK_CONTENDERS}
        budget = epochs or (family.quick_epochs if quick else family.epochs)
        jobs += [(family, label, options[label], seed, budget)
                 for label in options for seed in seeds]
    data = {}
    runs = []
    for family, label, make, seed, budget in _progress(jobs, progress):
        if family.name not in data:  # made once, shared by every run
            data[family.name] = family.load()
        runs.append(train(family, make, seed, budget, data[family.name],
                          label))
    return runs


def summarize(runs):
    """Per (family, contender): the final metric over the seeds that did
    not diverge (mean, sd, min, max; `diverged` counts the others, which
    have no final value), steps to the threshold
    (median over the seeds that reach it), diverged seeds, the largest
    |weight| and step ratio over seeds."""
    groups = {}
    for run in runs:
        groups.setdefault((run.family, run.contender), []).append(run)
    rows = []
    for (family, contender), group in groups.items():
        final = np.array([r.final for r in group], dtype="float64")
        final = final[np.isfinite(final)]
        reached = [r.steps_to_threshold for r in group
                   if r.steps_to_threshold is not None]
        rows.append(_json_safe({
            "family": family,
            "contender": contender,
            "seeds": len(group),
            "final_mean": float(np.mean(final)) if final.size else None,
            "final_sd": float(np.std(final, ddof=1))
            if final.size > 1 else 0.0,
            "final_min": float(np.min(final)) if final.size else None,
            "final_max": float(np.max(final)) if final.size else None,
            "steps_to_threshold_median": float(np.median(reached))
            if reached else None,
            "seeds_reaching_threshold": len(reached),
            "diverged": sum(r.diverged for r in group),
            "max_abs_weight": max(r.max_abs_weight for r in group),
            "max_step_ratio": max(r.max_step_ratio for r in group),
            "seconds_per_run": float(np.mean([r.seconds for r in group])),
        }))
    return rows


def table(rows):
    """The summary as text, one block per family."""
    lines = []
    for family in dict.fromkeys(row["family"] for row in rows):
        spec = FAMILIES[family]
        lines += ["", f"{family}: {spec.description} ({spec.metric}, "
                  f"threshold {spec.threshold:g})",
                  f"  {'contender':<28} {'final (mean ± sd)':>18} "
                  f"{'steps to thr.':>14} {'div.':>5} {'max |w|':>9} "
                  f"{'step/bound':>10}"]
        for row in rows:
            if row["family"] != family:
                continue
            final = "nan" if row["final_mean"] is None else (
                f"{row['final_mean']:.3f} ± {row['final_sd'] or 0:.3f}")
            steps = row["steps_to_threshold_median"]
            reach = (f"{steps:g} ({row['seeds_reaching_threshold']}/"
                     f"{row['seeds']})" if steps is not None
                     else f"never (0/{row['seeds']})")
            lines.append(
                f"  {row['contender']:<28} {final:>18} {reach:>14} "
                f"{row['diverged']:>3}/{row['seeds']} "
                f"{_short(row['max_abs_weight']):>9} "
                f"{_short(row['max_step_ratio']):>10}"
            )
    return "\n".join(lines[1:])


def _short(value):
    return "inf" if value is None else f"{value:.3g}"


def plot(runs, folder):
    """One PNG per family; returns their paths.

    Left, the validation metric per epoch: the mean over seeds as a line,
    min to max as a band, each contender with its own colour, line style
    and marker, so that identical curves stay visible. Right, every seed's
    final value as a dot, per contender (a diverged seed as a red x on the
    left edge). The axes are autoscaled to the finite values.
    """
    from keras_adashift.experiments.plotting import plot_family

    paths = []
    for family in dict.fromkeys(r.family for r in runs):
        path = folder / f"{family}.png"
        plot_family(FAMILIES[family], [r for r in runs if r.family == family],
                    path)
        paths.append(path)
    return paths


def _progress(jobs, enabled):
    if not enabled:
        return jobs
    from tqdm.auto import tqdm

    return tqdm(jobs, desc="task runs", unit="run")


def _json_safe(value):
    """NaN and inf as None (JSON has neither)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
