import json
import math
import numbers
import warnings
from typing import NamedTuple

import keras
import numpy as np
from keras import ops
from keras.distribution import TensorLayout
from keras.src.utils.naming import auto_name

from keras_adashift import gradient_window

if keras.backend.backend() == "torch":
    from keras_adashift import torch_step

SPATIAL_OPS = ("max", "mean", "none")
WINDOW_DTYPES = ("bfloat16", "float32", "float64")

# Version of what the optimizer's variables hold, saved beside them; a file
# without it (keras-adashift 0.1.0) or with other settings is not loaded.
STATE_FORMAT = 2


class VariableState(NamedTuple):
    """The optimizer's state for one model variable.

    `axes` are the axes a block of `v` spans (None: all, `()`: none); a slot
    is None where the configuration does not need it.
    """

    axes: object
    window: object  # (n + 1, *shape): gradients, when m or v needs them
    square_window: object  # (n + 1, *block): φ(g²), for a reducing φ
    momentum: object  # W·m_t, unless β1 = 0 (then m_t = g_t)
    velocity: object  # v, one value per block
    bias_correction: object  # 1 - β2^k per block; 0 while the block holds
    iterations: object  # the updates this variable has received


@keras.saving.register_keras_serializable(package="keras_adashift")
class AdaShift(keras.optimizers.Optimizer):
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
    `LossScaleOptimizer` skips.

    `m` needs no bias correction. It is kept as the plain weighted sum
    `W m_t`, updated in O(1) per step as
    `W m_t = β1 (W m_{t-1} - β1^(n-1) g_{t-n}) + g_t` from the gradients as
    the window stores them, and the `1 / W` is folded into the scalar rate.

    The default learning rate is 10× Keras Adam's: the authors ran
    max-AdaShift at 1e-2 against Adam and AMSGrad at 1e-3 in every experiment
    with a Keras-like setting (MNIST, CIFAR-10, Tiny-ImageNet), since φ = max
    divides by the largest second moment of each block, which shrinks steps.

    State per variable: a window of `n + 1` gradients (the newest is stored
    before the oldest is read, so the window is updated in place), `W m`,
    `v`, the bias correction per block, the variable's step count and, for a
    reducing φ, a window of `φ(g²)` per block, taken as each gradient
    arrives. With `beta_1=0`, `m_t = g_t` needs no window: a reducing φ then
    keeps no full-size state at all, and φ = none only the window. The
    window holds gradients in the variable's dtype (or in `window_dtype`);
    the rest is kept in float32 for 16-bit variables and in the variable's
    dtype otherwise.

    A NaN or inf gradient propagates into the moments and the variable, as
    in Keras's Adam. Wrap the optimizer in
    `keras.optimizers.LossScaleOptimizer` (as `mixed_float16` training does)
    to skip such steps.

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
            root, as in the authors' code). Defaults to `1e-10`.
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
        _check_renamed_arguments(kwargs)
        learning_rate = _check_learning_rate(learning_rate)
        _check_gradient_accumulation_steps(gradient_accumulation_steps)
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
        self.keep_num = _check_keep_num(keep_num)
        self.beta_1 = _check_beta("beta_1", beta_1)
        self.beta_2 = _check_beta("beta_2", beta_2)
        self.epsilon = _check_epsilon(epsilon)
        self.spatial_op = _check_spatial_op(spatial_op)
        self.spatial_axes = _check_spatial_axes(spatial_axes, self.spatial_op)
        self.window_dtype = _check_window_dtype(window_dtype)

    def build(self, var_list):
        """Creates each variable's state (`VariableState`), variable by
        variable, in the order of its fields.

        The order of creation is part of the saved format: optimizer state
        is restored by position.
        """
        if self.built:
            return
        for variable in var_list:
            _check_float_variable(variable)
        super().build(var_list)
        self._states = [
            None if self._overwrite_variable_with_gradient(v)
            else self._add_state(v)
            for v in var_list
        ]

    def _add_state(self, variable):
        axes = _block_axes(self.spatial_op, self.spatial_axes,
                           len(variable.shape))
        dtype = _state_dtype(variable.dtype)
        length = self.keep_num + 1
        reducing = self.spatial_op != "none"
        window = square_window = momentum = None
        if self.beta_1 > 0 or not reducing:
            window = self._add_slot(
                variable, "window", self.window_dtype or variable.dtype,
                window_length=length)
        if reducing:
            square_window = self._add_slot(
                variable, "square_window", dtype, window_length=length,
                reduced_axes=axes)
        if self.beta_1 > 0:
            momentum = self._add_slot(variable, "momentum", dtype)
        return VariableState(
            axes=axes,
            window=window,
            square_window=square_window,
            momentum=momentum,
            velocity=self._add_slot(
                variable, "velocity", dtype, reduced_axes=axes),
            bias_correction=self._add_slot(
                variable, "bias_correction", dtype, reduced_axes=axes),
            iterations=self._add_slot(
                variable, "iterations", "int", reduced_axes=None,
                scalar=True),
        )

    def update_step(self, gradient, variable, learning_rate):
        """Update step given gradient and the associated model variable."""
        state = self._states[self._get_variable_index(variable)]
        dtype = state.velocity.dtype
        n = self.keep_num
        gradient = ops.cast(gradient_window.dense(gradient), dtype)

        step = state.iterations + 1
        self.assign(state.iterations, step)
        # The window has n + 1 slots: g_t goes into its slot first, and
        # g_{t-n} is read from the next one of the updated buffer, so XLA
        # can update the window in place (a read of the slot about to be
        # overwritten makes it copy the whole window). Slots not yet
        # written hold zeros, which keep the blocks on hold.
        newest, oldest = step % (n + 1), (step + 1) % (n + 1)
        if state.window is not None:
            stored = ops.cast(gradient, state.window.dtype)
            gradient_window.write(self, state.window, newest, stored)
            oldest_gradient = ops.cast(
                gradient_window.read(state.window, oldest), dtype)
        if state.square_window is None:
            oldest_square = ops.square(oldest_gradient)
        else:
            # φ is taken as each gradient arrives and kept per block: the
            # reduction then reads the gradient rather than a window slot,
            # which XLA:CPU otherwise materializes before reducing.
            gradient_window.write(self, state.square_window, newest,
                                  self._spatial(gradient, state))
            oldest_square = gradient_window.read(state.square_window, oldest)

        # Constants as tensors of the state dtype: a Python float given to
        # an `ops` function would become floatx (float32) on some backends.
        beta_1, beta_2, epsilon = (
            ops.convert_to_tensor(x, dtype)
            for x in (self.beta_1, self.beta_2, self.epsilon)
        )
        weight_sum, oldest_weight = self._momentum_weights()
        if state.momentum is None:
            update = gradient
        else:
            # m adds the gradient as the window holds it, so that it later
            # subtracts exactly what it added.
            m = state.momentum
            update = (beta_1 * (m - oldest_weight * oldest_gradient)
                      + ops.cast(stored, dtype))
            self.assign(m, update)
        v = beta_2 * state.velocity + (1 - beta_2) * oldest_square
        self.assign(state.velocity, v)
        # c = 1 - β2^k, counted from the step v turned non-zero (0 before):
        # the recursion has no cancellation, unlike 1 - β2^k in float32.
        # v, c >= 0: a block moves where v + c is not 0 (`!= 0` rather than
        # `> 0`: a NaN in v reaches the variable instead of holding its
        # block silently forever).
        c = state.bias_correction
        moving = ops.not_equal(v + c, 0)
        c = ops.where(moving, beta_2 * c + (1 - beta_2), 0)
        self.assign(state.bias_correction, c)
        # The hold is applied to the block-sized rate, not the full-size
        # update, and a held block's rate is a selected 0, so nothing is
        # 0/0 even with epsilon 0. The authors' floor max(1e-8, c) never
        # binds on a moving block: there c >= 1 - β2 >= 2^-24 (β2 is
        # validated below 1 in float32); a held block divides by 1.
        lr = ops.cast(learning_rate, dtype) / weight_sum
        denominator = ops.sqrt(v / ops.where(moving, c, 1))
        rate = ops.where(moving, lr / (denominator + epsilon), 0)
        self.assign_sub(
            variable, ops.cast(update * rate, variable.dtype)
        )

    def apply(self, grads, trainable_variables=None):
        # Before Keras's own steps (accumulation, clipping, weight decay):
        # a gradient of the wrong shape must not touch any state.
        if trainable_variables is not None:
            trainable_variables = list(trainable_variables)
        for gradient, variable in zip(
            grads, trainable_variables or self._trainable_variables
        ):
            _check_gradient_shape(gradient, variable)
        return super().apply(grads, trainable_variables)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        if keras.backend.backend() == "torch":
            states = [self._states[self._get_variable_index(v)]
                      for v in trainable_variables]
            return torch_step.update(
                states, grads, trainable_variables, learning_rate, self
            )
        return super()._backend_update_step(
            grads, trainable_variables, learning_rate
        )

    def _momentum_weights(self):
        """`W = Σ_{i<n} β1^i` and the weight `β1^(n-1)` of `g_{t-n}` in W·m."""
        n, beta_1 = self.keep_num, self.beta_1
        if beta_1 == 0:
            return 1.0, 0.0
        return (1 - beta_1**n) / (1 - beta_1), beta_1 ** (n - 1)

    def _spatial(self, gradient, state):
        """φ(gradient²) over each block, shaped like the velocity."""
        axes = state.axes
        shape = tuple(state.velocity.shape)
        block_size = math.prod(
            gradient.shape if axes is None
            else [gradient.shape[a] for a in axes]
        )
        if block_size == 0:
            # An empty block has no gradient to feed v: it stays on hold.
            return ops.zeros(shape, gradient.dtype)
        if self.spatial_op == "max" and keras.backend.backend() == "tensorflow":
            # max(g²) as the larger of max(g)² and min(g)². TensorFlow's
            # XLA:CPU hands plain reductions to a vectorized kernel that
            # reads g once, but writes g² (or |g|) out in full first.
            phi = ops.maximum(
                *(
                    ops.square(reduce(gradient, axis=axes, keepdims=True))
                    for reduce in (ops.max, ops.min)
                )
            )
        elif self.spatial_op == "max":
            phi = ops.max(ops.square(gradient), axis=axes, keepdims=True)
        else:
            # A sum over a count: Keras's torch `mean` loses float64 precision.
            phi = ops.sum(ops.square(gradient), axis=axes, keepdims=True)
            phi = phi / block_size
        # Keras's torch reductions drop `keepdims` when `axis` is None.
        return ops.reshape(phi, shape)

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

        Settings that change what the state means (`spatial_op`, which slots
        exist) and every shape are checked before anything is assigned, so a
        load that fails leaves the optimizer as it was.
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
        expected = self._state_format()
        if saved != expected:
            differing = {k: (saved.get(k), v) for k, v in expected.items()
                         if saved.get(k) != v}
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
                "window_dtype": self.window_dtype,
            }
        )
        return config


# `compile(optimizer="adashift")`, as for Keras's own optimizers; the saved
# format uses the registered name `keras_adashift>AdaShift`.
keras.saving.get_custom_objects().setdefault("adashift", AdaShift)

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
    return _variable_name(variable).replace("/", "_").replace(":", "_")


def _state_dtype(dtype):
    """Moments accumulate, so 16-bit variables keep them in float32."""
    if keras.backend.standardize_dtype(dtype) in ("float16", "bfloat16"):
        return "float32"
    return dtype


def _block_axes(spatial_op, spatial_axes, rank):
    """The axes φ reduces for a variable of this rank (None: all of them)."""
    if spatial_op == "none":
        return ()
    if spatial_axes is None:
        return None
    axes = tuple(sorted({a % rank for a in spatial_axes if -rank <= a < rank}))
    return axes or None


def _variable_name(variable):
    return getattr(variable, "path", None) or variable.name


def _check_float_variable(variable):
    dtype = keras.backend.standardize_dtype(variable.dtype)
    if not keras.backend.is_float_dtype(dtype):
        raise ValueError(
            f"AdaShift can only train float variables. Variable "
            f"{_variable_name(variable)} has dtype {dtype}; make it "
            "non-trainable or give it a float dtype."
        )


def _check_gradient_shape(gradient, variable):
    """A gradient must have its variable's shape (or be its row slices)."""
    if gradient is None or not hasattr(gradient, "shape"):
        return
    expected = tuple(variable.shape)
    if tuple(gradient.shape) == expected:
        return
    got = gradient_window.static_shape(gradient)
    if got is None:
        return
    if len(got) != len(expected) or any(
        g is not None and g != e for g, e in zip(got, expected)
    ):
        raise ValueError(
            f"The gradient of variable {_variable_name(variable)} has shape "
            f"{got}, the variable {expected}. AdaShift keeps a window of "
            "past gradients per variable, so each gradient must have its "
            "variable's shape."
        )


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_learning_rate(learning_rate):
    if not _is_real(learning_rate):
        return learning_rate  # a schedule or a callable: Keras checks these
    if not math.isfinite(learning_rate) or learning_rate < 0:
        raise ValueError(
            "Argument `learning_rate` must be a finite float >= 0, a "
            "LearningRateSchedule or a callable. "
            f"Received: learning_rate={learning_rate!r}"
        )
    return float(learning_rate)


# Names users bring from other optimizers (tf.keras 1, torch, the paper).
RENAMED_ARGUMENTS = {"lr": "learning_rate", "eps": "epsilon",
                     "betas": "beta_1 and beta_2", "n": "keep_num",
                     "reduce_func": "spatial_op"}


def _check_renamed_arguments(kwargs):
    for old, new in RENAMED_ARGUMENTS.items():
        if old in kwargs:
            raise ValueError(
                f"Argument `{old}` is not an AdaShift argument: use "
                f"`{new}`. Received: {old}={kwargs[old]!r}"
            )


def _check_gradient_accumulation_steps(steps):
    if steps is None:
        return
    if not _is_int(steps) or steps < 2:
        raise ValueError(
            "Argument `gradient_accumulation_steps` must be None or an int "
            f">= 2. Received: gradient_accumulation_steps={steps!r}"
        )


# Slot indices are int32 on JAX (and in the window writes).
MAX_KEEP_NUM = 2**31 - 2


def _check_keep_num(keep_num):
    if not _is_int(keep_num) or not 1 <= keep_num <= MAX_KEEP_NUM:
        raise ValueError(
            "Argument `keep_num` must be an int in [1, 2**31 - 2] (the "
            f"number of gradients in the window). Received: "
            f"keep_num={keep_num!r}"
        )
    return int(keep_num)


def _check_beta(name, beta):
    # Below 1 in float32 too: β2 = 1 in float32 makes v̂ 0/0.
    if not _is_real(beta) or not 0 <= beta < 1 or np.float32(beta) >= 1:
        raise ValueError(
            f"Argument `{name}` must be a float in [0, 1) that stays below "
            f"1 in float32 (at most 1 - 2**-24). Received: {name}={beta!r}"
        )
    return float(beta)


def _check_epsilon(epsilon):
    if not _is_real(epsilon) or not math.isfinite(epsilon) or epsilon < 0:
        raise ValueError(
            "Argument `epsilon` must be a finite float >= 0. "
            f"Received: epsilon={epsilon!r}"
        )
    return float(epsilon)


def _check_spatial_op(spatial_op):
    if spatial_op not in SPATIAL_OPS:
        raise ValueError(
            f"Argument `spatial_op` must be one of {SPATIAL_OPS}. "
            f"Received: spatial_op={spatial_op!r}"
        )
    return spatial_op


def _check_spatial_axes(spatial_axes, spatial_op):
    if spatial_axes is None:
        return None
    axes = (spatial_axes,) if _is_int(spatial_axes) else spatial_axes
    if (
        not isinstance(axes, (tuple, list))
        or not axes
        or not all(_is_int(a) for a in axes)
        or len(set(axes)) != len(axes)
    ):
        raise ValueError(
            "Argument `spatial_axes` must be None, an int or a non-empty "
            "tuple of distinct ints (the axes one block spans). "
            f"Received: spatial_axes={spatial_axes!r}"
        )
    if spatial_op == "none":
        raise ValueError(
            "Argument `spatial_axes` needs a reducing `spatial_op` "
            f"('max' or 'mean'); spatial_op='none' has no blocks. "
            f"Received: spatial_axes={spatial_axes!r}"
        )
    return tuple(int(a) for a in axes)


def _check_window_dtype(window_dtype):
    if window_dtype is None:
        return None
    try:
        dtype = keras.backend.standardize_dtype(window_dtype)
    except ValueError:
        dtype = None
    if dtype == "float16":
        raise ValueError(
            "Argument `window_dtype` cannot be 'float16': gradients above "
            "65504 overflow to inf and tiny ones lose their digits; use "
            "'bfloat16' (float32's range) to halve the window's memory. "
            f"Allowed: None or one of {WINDOW_DTYPES}. "
            f"Received: window_dtype={window_dtype!r}"
        )
    if dtype not in WINDOW_DTYPES:
        raise ValueError(
            f"Argument `window_dtype` must be None or one of {WINDOW_DTYPES}."
            f" Received: window_dtype={window_dtype!r}"
        )
    return dtype
