import json
import math
import warnings

import keras
import numpy as np
from keras import ops
from keras.distribution import TensorLayout
from keras.src.utils.naming import auto_name

from keras_adashift import gradient_window
from keras_adashift import validation
from keras_adashift.algorithm import AdaShiftUpdate
from keras_adashift.algorithm import BlockState
from keras_adashift.algorithm import VariableState
from keras_adashift.algorithm import block_axes
from keras_adashift.algorithm import block_shape
from keras_adashift.algorithm import state_dtype

# Version of what the optimizer's variables hold, saved beside them; a file
# without it (keras-adashift 0.1.0) or with other settings is not loaded.
STATE_FORMAT = 3


@keras.saving.register_keras_serializable(package="keras_adashift")
class AdaShift(AdaShiftUpdate, keras.optimizers.Optimizer):
    """Optimizer that implements the AdaShift algorithm.

    AdaShift (Zhou et al., 2019) is Adam with the second moment built from a
    gradient `keep_num` steps old, so that the step size no longer correlates
    with the current gradient: Adam's cause of non-convergence. The old
    gradient can be reduced over a block of parameters first (the spatial
    operation φ). With window length `n = keep_num` and `W = Σ_{i<n} β1^i`:

    ```
    m_t = Σ_{i=0}^{n-1} β1^i g_{t-i} / W
    v_t = β2 v_{t-1} + (1 - β2) φ(g_{t-n}²)
    θ_t = θ_{t-1} - lr · m_t / (sqrt(v_t / max(1e-8, 1 - β2^k)) + ε)
    ```

    As in the authors' code, each block of `v` (each element for φ = none)
    holds its parameters still until its `v` is positive, and `k` counts
    the steps since then. Gradients that have not reached `v` yet count as
    zero, so with non-zero gradients the parameters first move at step
    `n + 1`, with `k = t - n`; a block whose first gradients are exactly
    zero (in front of a zero-initialised layer, an embedding row not seen
    yet) waits until a non-zero one has left the window, rather than
    dividing `m` by ε.

    Steps are counted per variable: `t` is the number of updates that gave
    this variable a gradient. A variable left without one (Keras skips a
    `None` gradient) keeps its window, moments and hold as they were; so do
    the micro-batches of gradient accumulation and the steps that
    `LossScaleOptimizer` skips. With `gradient_accumulation_steps=k` the
    first steps' hold thus lasts `keep_num × k` batches.

    `m` needs no bias correction. It is kept as the plain weighted sum
    `W m_t`, updated in O(1) per step as
    `W m_t = β1 (W m_{t-1} - β1^(n-1) g_{t-n}) + g_t` from the gradients as
    the window stores them, and the `1 / W` is folded into the scalar rate.

    The default learning rate is 10× Keras Adam's: the authors ran
    max-AdaShift at 1e-2 against Adam and AMSGrad at 1e-3 in every experiment
    with a Keras-like setting (MNIST, CIFAR-10, Tiny-ImageNet), since φ = max
    divides by the largest second moment of each block, which shrinks steps.

    State: per variable a window of `n + 1` gradients (the newest is stored
    before the oldest is read, so the window is updated in place) and `W m`;
    a step count per variable; and for a reducing φ, the blocks of all
    variables in one vector each: `v`, its bias correction and a window of
    the last `n` values of `φ(g²)`, taken as each gradient arrives. Each
    step updates all blocks at once, so a model of many small variables
    costs little more than Adam. With `beta_1=0`, `m_t = g_t` needs no
    window: a reducing φ then keeps no full-size state at all. φ = none keeps
    `v` and its bias correction per element, beside the window. The window
    holds gradients in the variable's dtype (or in `window_dtype`); the rest
    is kept in float32 for 16-bit variables and in the variable's dtype
    otherwise (the blocks: float64 if any variable is float64). That is
    about `keep_num + 2` times the model's parameters, which
    `model.summary()` counts as "Optimizer params" (Adam: 2 times).

    A NaN or inf gradient propagates into the moments and the variable, as
    in Keras's Adam; so does a gradient whose square overflows, from the
    step it reaches `v`. Wrap the optimizer in
    `keras.optimizers.LossScaleOptimizer` (as `mixed_float16` training does)
    to skip non-finite steps. Squares and `v` below the dtype's smallest
    normal number count as zero on every backend.

    Args:
        learning_rate: A float, a
            `keras.optimizers.schedules.LearningRateSchedule` instance, or a
            callable that takes no arguments and returns the value to use.
            Defaults to `0.01`.
        keep_num: Positive int, the window length `n`: how many recent
            gradients form `m`, and how old the gradient that feeds `v` is.
            Defaults to `10`.
        beta_1: Float in `[0, 1)`, the decay of the weights of the gradients
            in the window. `0` makes `m_t = g_t`. Defaults to `0.9`.
        beta_2: Float in `[0, 1)`, the decay rate of the second moment.
            Defaults to `0.999`.
        epsilon: Non-negative float added to `sqrt(v̂)` (outside the square
            root, as in the authors' code). With `0`, a block whose `v` has
            decayed to 0 takes no step. Defaults to `1e-10`.
        spatial_op: The spatial operation φ applied to the squared shifted
            gradient: `"max"` or `"mean"` over each block of parameters, or
            `"none"` for element-wise second moments. Defaults to `"max"`.
        spatial_axes: The axes a block spans, counted from the front (or from
            the back when negative). `None` makes each variable one block, as
            in the authors' code. An int or a tuple reduces only over those
            axes, keeping one second moment per index of the others: `0` for
            a Dense kernel `(in, out)` or `(0, 1, 2)` for a Conv2D kernel gives
            one block per output unit. Axes a variable does not have are
            skipped, and a variable left with none (a bias under `(0, 1, 2)`
            keeps axis 0; a scalar has none) is one block. Only valid with a
            reducing `spatial_op`. Defaults to `None`.
        step_bound: A float in `(0, 3.4e38]`, or None: off, the default
            (the authors' algorithm). When set, each element's step is
            clipped to `step_bound · |lr| / sqrt(1 - β2)`: the largest step
            Adam's `v_t` allows (with β1 = 0), which AdaShift's `v_t`, built
            from old gradients only, does not bound. It keeps a parameter whose
            recent gradients are far larger than its old ones (rare tokens'
            embedding rows, recurrent kernels) from jumping; the state is
            unchanged. With `spatial_op="none"`, `1.0` trained the LSTM task
            of `keras-adashift tasks` as well as Adam, not reliably the GRU;
            see the README's "Choosing settings".
        window_dtype: Optional dtype for the gradient window: `"bfloat16"`
            halves its memory for float32 variables (`m` is then the weighted
            sum of the rounded gradients; φ is taken before rounding).
            `"float16"` is refused: it overflows above 65504. Defaults to
            `None` (the variable's dtype, exact).
        {{base_optimizer_keyword_args}}

    References:
        - [Zhou et al., 2019](https://arxiv.org/abs/1810.00143), AdaShift:
          Decorrelation and Convergence of Adaptive Learning Rate Methods
          (ICLR 2019).
        - The authors' code: https://github.com/QingruZhang/AdaShift_Release
    """

    def __init__(
        self,
        learning_rate=0.01,
        keep_num=10,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-10,
        spatial_op="max",
        spatial_axes=None,
        step_bound=None,
        window_dtype=None,
        weight_decay=None,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        name=None,
        **kwargs,
    ):
        validation.check_renamed_arguments(kwargs)
        learning_rate = validation.check_learning_rate(learning_rate)
        validation.check_gradient_accumulation_steps(
            gradient_accumulation_steps)
        super().__init__(
            learning_rate=learning_rate,
            name=auto_name("adashift") if name is None else name,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            **kwargs,
        )
        self._set_hyperparameters(keep_num, beta_1, beta_2, epsilon,
                                  spatial_op, spatial_axes, step_bound,
                                  window_dtype)

    def build(self, var_list):
        """Creates the state: per variable its `VariableState` slots, in
        the order of the fields, then the step counts and the `BlockState`.

        The order of creation is part of the saved format: optimizer state
        is restored by position.
        """
        if self.built:
            return
        for variable in var_list:
            validation.check_float_variable(variable)
        super().build(var_list)
        reducing = self.spatial_op != "none"
        self._states, start, dtypes = [], 0, set()
        for position, variable in enumerate(var_list):
            if self._overwrite_variable_with_gradient(variable):
                self._states.append(None)
                continue
            state = self._add_state(variable, position, start)
            self._states.append(state)
            if reducing:
                start = state.blocks[1]
            dtypes.add(state_dtype(variable.dtype))
        self._step_counts = self.add_variable(
            (len(var_list),), dtype="int", name="step_counts")
        self._blocks = None
        if reducing:
            # One dtype for all blocks: the widest of the variables' states.
            dtype = "float64" if "float64" in dtypes else "float32"
            self._blocks = BlockState(
                square_window=self.add_variable(
                    (self.keep_num, start), dtype=dtype,
                    name="square_window"),
                velocity=self.add_variable((start,), dtype=dtype,
                                           name="velocity"),
                bias_correction=self.add_variable(
                    (start,), dtype=dtype, name="bias_correction"),
            )

    def _add_state(self, variable, position, start):
        axes = block_axes(self.spatial_op, self.spatial_axes,
                          len(variable.shape))
        dtype = state_dtype(variable.dtype)
        blocks = window = momentum = velocity = bias_correction = None
        if axes != ():  # a reducing φ
            shape = block_shape(variable.shape, axes)
            blocks = (start, start + math.prod(shape), shape)
        if self.beta_1 > 0 or blocks is None:
            window = self._add_slot(
                variable, "window", self.window_dtype or variable.dtype,
                window_length=self.keep_num + 1)
        if self.beta_1 > 0:
            momentum = self._add_slot(variable, "momentum", dtype)
        if blocks is None:
            velocity, bias_correction = (
                self._add_slot(variable, name, dtype)
                for name in ("velocity", "bias_correction"))
        return VariableState(position, tuple(variable.shape), axes, blocks,
                             window, momentum, velocity, bias_correction)

    def update_step(self, gradient, variable, learning_rate):
        """Update step given gradient and the associated model variable."""
        self._update([gradient], [variable], learning_rate)

    def apply(self, grads, trainable_variables=None):
        # Lists, Python or NumPy numbers and arrays and other backends'
        # tensors become this backend's tensors, as Keras's TF and JAX
        # optimizers take them (the torch kernels need torch tensors).
        grads = [g if g is None or ops.is_tensor(g)
                 else ops.convert_to_tensor(g) for g in grads]
        # Before Keras's own steps (accumulation, clipping, weight decay):
        # a gradient of the wrong shape must not touch any state.
        if trainable_variables is not None:
            trainable_variables = list(trainable_variables)
        for gradient, variable in zip(
            grads, trainable_variables or self._trainable_variables
        ):
            validation.check_gradient_shape(gradient, variable)
        return super().apply(grads, trainable_variables)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        # All variables in one call: what they share is computed once, and
        # the blocks of all of them are updated together.
        if keras.backend.backend() == "torch":
            from keras_adashift import torch_step

            states = [self._states[self._get_variable_index(v)]
                      for v in trainable_variables]
            return torch_step.update(
                states, self._blocks, self._step_counts, grads,
                trainable_variables, self._plan(learning_rate),
                self.spatial_op)
        if keras.backend.backend() == "tensorflow":
            return super()._backend_update_step(
                grads, trainable_variables, learning_rate)
        self._update(grads, trainable_variables, learning_rate)

    def _distributed_tf_update_step(self, distribution, grads_and_vars,
                                    learning_rate):
        # TensorFlow: in cross-replica context. Each variable's update runs
        # on each of its devices; the blocks' update runs once, on the
        # (all-reduced, identical) gradients of the first replica.
        def for_each(update, variable, args):
            distribution.extended.update(variable, update, args=args,
                                         group=False)

        grads, variables = zip(*grads_and_vars)
        self._update(
            grads, variables, learning_rate, for_each,
            local=lambda g: distribution.experimental_local_results(g)[0])

    def _add_slot(
        self, variable, name, dtype, window_length=None, reduced_axes=(),
        scalar=False,
    ):
        """A slot shaped, laid out and placed like `variable`.

        `window_length` adds a leading axis; `reduced_axes` (None: all) are
        kept with size 1, and `scalar` drops every axis. Under
        `keras.distribution` the slot is sharded like the variable, with the
        added and reduced axes replicated.
        """
        rank = len(variable.shape)
        if reduced_axes is None:
            reduced_axes = range(rank)
        shape = [1 if i in reduced_axes else d
                 for i, d in enumerate(variable.shape)]
        leading = [] if window_length is None else [window_length]
        layout = getattr(variable, "_layout", None)
        if layout is not None:
            axes = [None if i in reduced_axes else a
                    for i, a in enumerate(layout.axes)]
            layout = TensorLayout(
                [None] * len(leading) + ([] if scalar else axes),
                layout.device_mesh,
            )
        with gradient_window.colocated(self, variable):
            return self.add_variable(
                shape=() if scalar else tuple(leading + shape),
                dtype=dtype,
                layout=layout,
                name=f"{_slot_prefix(variable)}_{name}",
            )

    def save_own_variables(self, store):
        super().save_own_variables(store)
        store[_FORMAT_KEY] = _encode(self._state_format())

    def load_own_variables(self, store):
        """Loads the state saved by `save_own_variables`, all or nothing.

        Settings that change what the state means (`spatial_op`,
        `spatial_axes`, which slots exist) and every shape are checked
        before anything is assigned, so a load that fails leaves the
        optimizer as it was.
        """
        keys = [k for k in store.keys() if k != _FORMAT_KEY]
        if _FORMAT_KEY not in store.keys():
            warnings.warn(
                f"Skipping variable loading for optimizer '{self.name}': the "
                "saved state has no keras-adashift format record, so it was "
                "saved by keras-adashift 0.1.0 (whose state differs) or by "
                "another optimizer. The model's weights load; the optimizer "
                "starts afresh (its hold keeps the first steps safe).",
                stacklevel=2,
            )
            return
        saved = _decode(store[_FORMAT_KEY])
        if saved.get("format") == 2:
            warnings.warn(
                f"Skipping variable loading for optimizer '{self.name}': the "
                "state was saved by keras-adashift 0.2.0, which kept each "
                "variable's blocks in slots of their own. The model's "
                "weights load; the optimizer starts afresh (its hold keeps "
                "the first steps safe).",
                stacklevel=2,
            )
            return
        expected = self._state_format()
        # A setting the file does not record (`spatial_axes` before 0.4.0)
        # is left to the shape checks below.
        differing = {k: (saved[k], v) for k, v in expected.items()
                     if k in saved and saved[k] != v}
        if differing or saved.get("format") != STATE_FORMAT:
            raise ValueError(
                f"Cannot load the state of optimizer '{self.name}': it was "
                "saved with other settings, which change what the state "
                "holds. (saved, this optimizer): "
                + ", ".join(f"{k}={a!r} vs {b!r}"
                            for k, (a, b) in differing.items())
            )
        if len(keys) != len(self.variables):
            return super().load_own_variables(
                {k: store[k] for k in keys})
        values = [store[str(i)] for i in range(len(self.variables))]
        for variable, value in zip(self.variables, values):
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"Cannot load the state of optimizer '{self.name}': "
                    f"variable {variable.path} has shape "
                    f"{tuple(variable.shape)}, the saved value "
                    f"{tuple(value.shape)} (saved with another keep_num, "
                    "spatial_axes or model?). Nothing was loaded."
                )
        for variable, value in zip(self.variables, values):
            variable.assign(value)

    def _state_format(self):
        return {
            "format": STATE_FORMAT,
            "spatial_op": self.spatial_op,
            "momentum": self.beta_1 > 0,
            # Blocks over other axes can have the same shapes (a square
            # kernel's rows and columns) and mean something else.
            "spatial_axes": (None if self.spatial_axes is None
                             else list(self.spatial_axes)),
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "keep_num": self.keep_num,
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "spatial_op": self.spatial_op,
                "spatial_axes": self.spatial_axes,
                "step_bound": self.step_bound,
                "window_dtype": self.window_dtype,
            }
        )
        return config


# `compile(optimizer="adashift")` and `"AdaShift"`, as for Keras's own
# optimizers (`keras.optimizers.get`, `deserialize`); the saved format uses
# the registered name `keras_adashift>AdaShift`.
for _name in ("adashift", "AdaShift"):
    keras.saving.get_custom_objects().setdefault(_name, AdaShift)
del _name

if AdaShift.__doc__ is not None:  # None under `python -OO`
    AdaShift.__doc__ = AdaShift.__doc__.replace(
        "{{base_optimizer_keyword_args}}",
        keras.src.optimizers.optimizer.base_optimizer_keyword_args,
    )

_FORMAT_KEY = "keras_adashift_format"


def _encode(record):
    return np.frombuffer(json.dumps(record, sort_keys=True).encode(), "uint8")


def _decode(array):
    return json.loads(np.asarray(array, dtype="uint8").tobytes().decode())


def _slot_prefix(variable):
    """Keras's slot naming: the variable's path with `/` made `_`."""
    name = validation.variable_name(variable)
    return name.replace("/", "_").replace(":", "_")
