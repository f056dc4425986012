"""`StepMonitor`: what an optimizer's steps do to the model, on any backend.

    from keras_adashift.callbacks import StepMonitor

    model.fit(x, y, callbacks=[StepMonitor()])   # adds step/... to the logs

Every `every` batches the monitor copies the trainable weights before the
batch and compares them with the weights after it, so it measures the step
the optimizer actually took, whatever the optimizer (AdaShift, Adam, SGD,
a `LossScaleOptimizer` around one of them). It runs in Python between steps
and reads the weights as NumPy arrays (as `keras.ops.convert_to_numpy`):
it works under `jit_compile=True`, on TensorFlow, JAX and PyTorch, and
does not change training. The step is measured against Adam's bound
`lr / sqrt(1 - β2)`,
the largest per-element step Adam's second moment allows (with β1 = 0), with
the optimizer's learning rate at that step and its `beta_2` (0.999, Keras
Adam's, for an optimizer without one).

The logs (batch logs from the first measured batch on, epoch logs: the
latest measured values), so that `History`, `CSVLogger`, `TensorBoard` and
any logger placed after the monitor in `callbacks` record them:

- `step/max_over_bound`: the largest per-element |Δθ| / (lr / sqrt(1 - β2));
- `step/rms_over_bound`: the root mean square of Δθ over all elements / the
  same bound;
- `step/update_ratio`: ||Δθ|| / ||θ|| (L2 norms over all weights, θ before
  the step);
- `step/held_fraction` (AdaShift only): the fraction of blocks (of elements
  for `spatial_op="none"`) still on hold after the step, i.e. whose bias
  correction is still 0: no non-zero gradient has left their window yet;
- with `per_layer=True`, the same four per top-level layer:
  `step/<layer name>/max_over_bound`, ...

Warnings (`StepMonitorWarning`, at most one per kind per `fit` or `reset`):

- "spike": `step/max_over_bound > spike_ratio` (default 10);
- "stall": for `stall_windows` measurements in a row (default 3) the steps
  are far below what the learning rate allows (`rms_over_bound <
  stall_ratio`, default 1e-3) or far below the weights (`update_ratio <
  stall_update_ratio`, default 1e-6), and the loss did not improve by more
  than `stall_loss_change` (default 1 %, relative) from the first of them to
  the last; measurements while everything is on hold do not count;
- "hold": AdaShift holds at least `hold_fraction` (default 1.0: all) of its
  blocks later than `keep_num + hold_patience` optimizer steps (default
  `hold_patience`: keep_num).

In a custom training loop, call `begin()` before the step and `end()` after:

    monitor = StepMonitor(every=10)
    monitor.set_model(model)          # or begin(variables, optimizer)
    for x, y in batches:
        monitor.begin()
        loss = train_step(x, y)       # ends in optimizer.apply_gradients
        logs = monitor.end(loss=float(loss))  # {} on an unmeasured step
"""

import collections
import math
import warnings

import keras
import numpy as np

README = "README.md, section \"Troubleshooting\""
NAMES = ("max_over_bound", "rms_over_bound", "update_ratio", "held_fraction")
DEFAULT_BETA_2 = 0.999


class StepMonitorWarning(UserWarning):
    """What `StepMonitor` warns with; filter it with `warnings`."""


def _inner(optimizer):
    """The optimizer that does the step (through `LossScaleOptimizer`)."""
    while getattr(optimizer, "inner_optimizer", None) is not None:
        optimizer = optimizer.inner_optimizer
    return optimizer


def adam_bound(optimizer):
    """`lr / sqrt(1 - β2)` with the optimizer's current learning rate and
    its `beta_2` (0.999 for an optimizer without one)."""
    learning_rate = float(_read(optimizer.learning_rate))
    beta_2 = float(getattr(_inner(optimizer), "beta_2", DEFAULT_BETA_2))
    return learning_rate / math.sqrt(1 - beta_2)


def _read(variable):
    """The variable's value as a NumPy array: may share memory with it.

    The backends' own conversions, as `keras.ops.convert_to_numpy` would,
    without the NumPy 2 `__array__` copy warning that goes with it here.
    """
    value = getattr(variable, "value", variable)
    backend = keras.backend.backend()
    if isinstance(value, (int, float, np.ndarray, np.generic)):
        return np.asarray(value)
    if backend == "tensorflow" and hasattr(value, "numpy"):
        return value.numpy()
    if backend == "torch" and hasattr(value, "detach"):
        value = value.detach()
        if value.dtype.itemsize < 4 and value.is_floating_point():
            value = value.float()  # NumPy has no bfloat16
        return value.cpu().numpy()
    return np.asarray(keras.ops.convert_to_numpy(value))


def _copy(variable):
    value = _read(variable)
    if value.dtype.itemsize < 4 or value.dtype.kind != "f":
        return value.astype("float32")  # bfloat16 (ml_dtypes), float16
    return np.array(value, copy=True)  # torch on CPU: a view of the weight


def _ratio(step, bound):
    if bound > 0:
        return step / bound
    return 0.0 if step == 0 else math.inf


class StepMonitor(keras.callbacks.Callback):
    """Measures the optimizer's step every `every` batches; see the module.

    Args:
        every: Measure one batch in `every` (the first batch of `fit` is
            measured). The default, 100, cost at most 3 % of `fit` time in
            `benchmarks/` (`python benchmarks/run.py`); 1 measures every
            step.
        per_layer: Also log each top-level layer's values, named
            `step/<layer>/<value>`.
        spike_ratio: Warn when an element's step exceeds this many times
            Adam's bound. `None` turns the warning off.
        stall_ratio, stall_update_ratio, stall_windows, stall_loss_change:
            Warn when `stall_windows` measurements in a row have
            `rms_over_bound < stall_ratio` or `update_ratio <
            stall_update_ratio` and the loss did not fall by more than
            `stall_loss_change` (relative) across them. `None` for
            `stall_windows` turns the warning off.
        hold_fraction, hold_patience: Warn when AdaShift still holds at
            least `hold_fraction` of its blocks after more than
            `keep_num + hold_patience` steps (`None`: keep_num).
            `hold_fraction=None` turns the warning off.
        warn: False records the warnings in `messages` without issuing
            them.

    After each measurement `latest` holds the logged values and
    `by_variable` each variable's (by path, in order; a repeated path gets
    a `'`): `max_over_bound`,
    `rms_over_bound`, `update_ratio`, `max_abs_weight` and, for AdaShift,
    `held_fraction`. `messages` maps the kinds warned about in this fit
    ("spike", "stall", "hold") to their text. With `steps_per_execution`
    above 1 the measured "step" spans that many optimizer steps.
    """

    def __init__(self, every=100, per_layer=False, spike_ratio=10.0,
                 stall_ratio=1e-3, stall_update_ratio=1e-6, stall_windows=3,
                 stall_loss_change=0.01, hold_fraction=1.0,
                 hold_patience=None, warn=True):
        super().__init__()
        if int(every) < 1:
            raise ValueError(f"`every` must be a positive int; got {every}")
        self.every = int(every)
        self.per_layer = per_layer
        self.spike_ratio = spike_ratio
        self.stall_ratio = stall_ratio
        self.stall_update_ratio = stall_update_ratio
        self.stall_windows = stall_windows
        self.stall_loss_change = stall_loss_change
        self.hold_fraction = hold_fraction
        self.hold_patience = hold_patience
        self.warn = warn
        self.reset()

    # --- state ------------------------------------------------------------

    def reset(self):
        """Forgets the last fit: counters, values, snapshots, warnings."""
        self.latest = {}
        self.by_variable = {}
        self.by_layer = {}
        self.messages = {}
        self._count = 0
        self._before = None
        self._variables = None
        self._optimizer = None
        self._bound = None
        self._groups = None
        self._recent = collections.deque(maxlen=self.stall_windows or 1)

    # --- custom loops -----------------------------------------------------

    def begin(self, variables=None, optimizer=None):
        """Call before an optimizer step: copies the weights if this step
        is measured. `variables` and `optimizer` default to the model's
        (`set_model`). Returns whether the step is measured."""
        measured = self._count % self.every == 0
        self._count += 1
        if not measured:
            self._before = None
            return False
        if variables is None or optimizer is None:
            model = self.model  # on JAX: copies fit's state into variables
            variables = model.trainable_variables if variables is None \
                else variables
            optimizer = model.optimizer if optimizer is None else optimizer
        variables = list(variables)
        if self._variables is None or len(variables) != len(self._variables) \
                or any(a is not b for a, b in zip(variables, self._variables)):
            self._variables = variables
            self._groups = self._layer_groups(variables)
        self._optimizer = optimizer
        self._bound = adam_bound(optimizer)  # the rate of this step
        self._before = [_copy(v) for v in variables]
        return True

    def end(self, loss=None):
        """Call after the step begun with `begin()`: measures it, warns if
        needed, and returns the values (the `step/...` logs; `{}` when the
        step was not measured)."""
        if self._before is None:
            return {}
        if self._model is not None and keras.backend.backend() == "jax":
            self.model  # the step's weights, from fit's JAX state
        before, self._before = self._before, None
        self.latest = self._measure(before)
        self._check(loss)
        return dict(self.latest)

    # --- Keras callback hooks ----------------------------------------------

    def on_train_begin(self, logs=None):
        self.reset()

    def on_train_batch_begin(self, batch, logs=None):
        self.begin()

    def on_train_batch_end(self, batch, logs=None):
        if self._before is not None:
            loss = None if logs is None else logs.get("loss")
            self.end(loss=loss)
        if logs is not None:
            logs.update(self.latest)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(self.latest)

    def on_train_end(self, logs=None):
        # Keep the numbers, drop what refers to the model or its weights.
        self._before = self._variables = self._optimizer = None
        self._groups = None

    # --- the measurement ---------------------------------------------------

    def _layer_groups(self, variables):
        """Per variable, its top-level layer's name (or its path's parent)
        and its path."""
        owner = {}
        model = self._model
        for layer in getattr(model, "layers", None) or ():
            for variable in layer.trainable_variables:
                owner.setdefault(id(variable), layer.name)
        groups, paths = [], set()
        for variable in variables:
            path = getattr(variable, "path", None) or variable.name
            while path in paths:  # two models' variables may share a path
                path += "'"
            paths.add(path)
            layer = owner.get(id(variable))
            if layer is None:
                layer = path.rsplit("/", 1)[0] if "/" in path else path
            groups.append((layer, path))
        return groups

    def _held(self, variables):
        """Per variable (held, total) blocks of an AdaShift, or None."""
        optimizer = _inner(self._optimizer)
        states = getattr(optimizer, "_states", None)
        if states is None or not hasattr(optimizer, "keep_num"):
            return None
        blocks = getattr(optimizer, "_blocks", None)
        shared = None
        if blocks is not None:
            shared = _read(blocks.bias_correction)
        counts = []
        for variable in variables:
            try:
                state = states[optimizer._get_variable_index(variable)]
            except (KeyError, IndexError, AttributeError):
                state = None
            if state is None:
                counts.append((0, 0))
            elif state.blocks is not None:
                start, stop, _ = state.blocks
                part = shared[start:stop]
                counts.append((int(np.sum(part == 0)), part.size))
            else:
                part = _read(state.bias_correction)
                counts.append((int(np.sum(part == 0)), part.size))
        return counts

    def _measure(self, before):
        bound = self._bound
        variables = self._variables
        held = self._held(variables)
        # per layer ("" for all): [max |Δ|, Σ Δ², Σ θ², elements, held, blocks]
        totals = {"": [0.0, 0.0, 0.0, 0, 0, 0]}
        self.by_variable = {}
        for k, (variable, old) in enumerate(zip(variables, before)):
            layer, path = self._groups[k]
            step = np.subtract(_read(variable), old, dtype="float64")
            largest = float(np.max(np.abs(step), initial=0.0))
            if math.isnan(largest):
                largest = math.inf
            squares = float(np.sum(np.square(step)))
            weights = float(np.sum(np.square(old, dtype="float64")))
            on_hold, blocks = held[k] if held is not None else (0, 0)
            record = _values(largest, squares, weights, step.size, bound)
            record["max_abs_weight"] = float(
                np.max(np.abs(old + step), initial=0.0))
            if blocks:
                record["held_fraction"] = on_hold / blocks
            self.by_variable[path] = record
            for name in ("", layer):
                total = totals.setdefault(name, [0.0, 0.0, 0.0, 0, 0, 0])
                total[0] = max(total[0], largest)
                total[1] += squares
                total[2] += weights
                total[3] += step.size
                total[4] += on_hold
                total[5] += blocks
        self.by_layer = {}
        for name, (largest, squares, weights, count, on_hold, blocks) in \
                totals.items():
            values = _values(largest, squares, weights, count, bound)
            if held is not None:
                values["held_fraction"] = on_hold / blocks if blocks else 0.0
            if name:
                self.by_layer[name] = values
            else:
                overall = values
        out = {f"step/{key}": value for key, value in overall.items()}
        if self.per_layer:
            for name, values in self.by_layer.items():
                out.update((f"step/{name}/{key}", value)
                           for key, value in values.items())
        return out

    # --- the warnings ------------------------------------------------------

    def _layers(self, value, keep, smallest=False):
        """`name (value)` of the layers whose `value` passes `keep`, the
        largest (or smallest) first, at most 5."""
        found = sorted(
            ((values[value], name) for name, values in self.by_layer.items()
             if value in values and keep(values[value])),
            reverse=not smallest)
        return ", ".join(f"{name} ({number:.3g})" for number, name in
                         found[:5])

    def _step(self):
        try:
            return int(_read(_inner(self._optimizer).iterations))
        except Exception:  # an optimizer without iterations
            return self._count

    def _issue(self, kind, text):
        if kind in self.messages:
            return
        self.messages[kind] = text
        if self.warn:
            warnings.warn(text, StepMonitorWarning, stacklevel=3)

    def _check(self, loss):
        values = self.latest
        step = self._step()
        bound = self._bound
        largest = values["step/max_over_bound"]
        if self.spike_ratio is not None and not largest <= self.spike_ratio:
            self._issue("spike", (
                f"StepMonitor: at step {step} an element moved "
                f"{largest:.3g}× Adam's bound lr/sqrt(1 - beta_2) = "
                f"{bound:.3g} (warning above {self.spike_ratio:g}×); largest "
                f"in layers: {self._layers('max_over_bound', lambda x: not x <= self.spike_ratio)}. "  # noqa: E501
                f"Single weights jump: see {README}, \"Weights grow or the "
                f"loss diverges\" (AdaShift: step_bound=1.0, a lower "
                f"learning_rate, or clipnorm=1.0)."))
        held = values.get("step/held_fraction")
        optimizer = _inner(self._optimizer)
        on_hold = (held is not None and self.hold_fraction is not None
                   and held >= self.hold_fraction)
        if on_hold:
            keep_num = getattr(optimizer, "keep_num", 0)
            patience = keep_num if self.hold_patience is None \
                else self.hold_patience
            if step > keep_num + patience:
                self._issue("hold", (
                    f"StepMonitor: at step {step} (keep_num={keep_num}) "
                    f"{100 * held:.0f}% of AdaShift's blocks are still on "
                    f"hold (their bias correction is 0: no non-zero gradient "
                    f"has left their window yet), in layers: "
                    f"{self._layers('held_fraction', lambda x: x >= self.hold_fraction)}. "  # noqa: E501
                    f"Their gradients are exactly 0 (a zero-initialised "
                    f"layer, unused inputs): see {README}, \"The first "
                    f"steps do nothing\"."))
            self._recent.clear()  # the hold, not a stall
            return
        if not self.stall_windows:
            return
        self._recent.append((values["step/rms_over_bound"],
                             values["step/update_ratio"],
                             None if loss is None else float(loss)))
        if len(self._recent) < self.stall_windows:
            return
        small = all(rms < self.stall_ratio or ratio < self.stall_update_ratio
                    for rms, ratio, _ in self._recent)
        first, last = self._recent[0][2], self._recent[-1][2]
        flat = True
        change = ""
        if first is not None and last is not None:
            flat = not (first - last > self.stall_loss_change * abs(first))
            change = (f", and the loss went from {first:.6g} to {last:.6g} "
                      f"(a fall of at most {100 * self.stall_loss_change:g}% "
                      f"counts as not moving)")
        if small and flat:
            rms = max(r for r, _, _ in self._recent)
            ratio = max(u for _, u, _ in self._recent)
            self._issue("stall", (
                f"StepMonitor: training looks stalled at step {step}: over "
                f"the last {self.stall_windows} measured steps the RMS step "
                f"was at most {rms:.3g}× Adam's bound lr/sqrt(1 - beta_2) = "
                f"{bound:.3g} (warning below {self.stall_ratio:g}×) or the "
                f"update/weight ratio at most {ratio:.3g} (warning below "
                f"{self.stall_update_ratio:g}){change}; smallest RMS steps "
                f"in layers: {self._layers('rms_over_bound', lambda x: True, smallest=True)}. "  # noqa: E501
                f"See {README}, \"Learning is slow\" (a larger "
                f"learning_rate; AdaShift: keep_num=1, spatial_axes=0)."))


def _values(largest, squares, weights, count, bound):
    """The logged values from the sums of one variable or layer."""
    return {
        "max_over_bound": _ratio(largest, bound),
        "rms_over_bound": _ratio(math.sqrt(squares / count), bound)
        if count else 0.0,
        "update_ratio": _norm_ratio(squares, weights),
    }


def _norm_ratio(squares, weights):
    if weights > 0:
        return math.sqrt(squares / weights)
    return 0.0 if squares == 0 else math.inf
