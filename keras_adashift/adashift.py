import math
import numbers

import keras
from keras import ops
from keras.distribution import TensorLayout

from keras_adashift import gradient_window

if keras.backend.backend() == "torch":
    from keras_adashift import torch_step

SPATIAL_OPS = ("max", "mean", "none")


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
    θ_t = θ_{t-1} - lr · m_t / (sqrt(v_t / (1 - β2^(t-n))) + ε)
    ```

    Steps 1 to `n` only fill the window: the first update of the parameters
    happens at step `n + 1`. `m` needs no bias correction. It is kept as the
    plain weighted sum `W m_t`, updated in O(1) per step as
    `W m_t = β1 (W m_{t-1} - β1^(n-1) g_{t-n}) + g_t`, and the `1 / W` is
    folded into the scalar step size.

    The default learning rate is 10× Keras Adam's: the authors ran
    max-AdaShift at 1e-2 against Adam and AMSGrad at 1e-3 in every experiment
    with a Keras-like setting (MNIST, CIFAR-10, Tiny-ImageNet), since φ = max
    divides by the largest second moment of each block, which shrinks steps.

    State: a window of `n + 1` slots (the newest gradient is stored before
    the oldest is read, so the window is updated in place), `W m`, `v`, and for
    a reducing φ a window of `φ(g²)` per block, taken as each gradient
    arrives. The window holds gradients in the variable's dtype (or in
    `window_dtype`); the rest is kept in float32 for 16-bit variables and in
    the variable's dtype otherwise.

    A NaN or inf gradient propagates into the moments and the variable (from
    the step it arrives, warm-up included), as in Keras's Adam. Wrap the
    optimizer in `keras.optimizers.LossScaleOptimizer` (as `mixed_float16`
    training does) to skip such steps: a skipped step does not touch the
    window or the moments.

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
        window_dtype: Optional dtype for the gradient window, e.g.
            `"bfloat16"` to halve its memory for float32 variables. Defaults
            to `None` (the variable's dtype, exact).
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
        name="adashift",
        **kwargs,
    ):
        learning_rate = _check_learning_rate(learning_rate)
        super().__init__(
            learning_rate=learning_rate,
            name=name,
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
        """Creates the window, the window of φ(g²), `m` and `v` per variable.

        The order of creation is part of the saved format: optimizer state
        is restored by position.
        """
        if self.built:
            return
        super().build(var_list)
        self._block_axes = [
            _block_axes(self.spatial_op, self.spatial_axes, len(v.shape))
            for v in var_list
        ]
        window_dtypes = [self.window_dtype or v.dtype for v in var_list]
        self._windows = [
            self._add_slot(
                v, "window", dtype, window_length=self.keep_num + 1
            )
            for v, dtype in zip(var_list, window_dtypes)
        ]
        if self.spatial_op != "none":
            self._square_windows = [
                self._add_slot(
                    v,
                    "square_window",
                    _state_dtype(v.dtype),
                    window_length=self.keep_num + 1,
                    reduced_axes=axes,
                )
                for v, axes in zip(var_list, self._block_axes)
            ]
        self._momentums = [
            self._add_slot(v, "momentum", _state_dtype(v.dtype))
            for v in var_list
        ]
        self._velocities = [
            self._add_slot(
                v, "velocity", _state_dtype(v.dtype), reduced_axes=axes
            )
            for v, axes in zip(var_list, self._block_axes)
        ]

    def update_step(self, gradient, variable, learning_rate):
        """Update step given gradient and the associated model variable."""
        index = self._get_variable_index(variable)
        m = self._momentums[index]
        v = self._velocities[index]
        dtype = m.dtype
        n = self.keep_num

        gradient = ops.cast(gradient_window.dense(gradient), dtype)
        step = self.iterations + 1
        # The window has n + 1 slots: g_t goes into its slot first, and
        # g_{t-n} is read from another one of the updated buffer, so XLA
        # can update the window in place (a read of the slot about to be
        # overwritten makes it copy the whole window). Slots not yet
        # written hold zeros: the warm-up.
        newest, oldest = step % (n + 1), (step - n) % (n + 1)
        window = self._windows[index]
        gradient_window.write(self, window, newest, gradient)
        oldest_gradient = ops.cast(gradient_window.read(window, oldest), dtype)
        if self.spatial_op == "none":
            oldest_square = ops.square(oldest_gradient)
        else:
            # φ is taken as each gradient arrives and kept per block: the
            # reduction then reads the gradient rather than a window slot,
            # which XLA:CPU otherwise materializes before reducing.
            squares = self._square_windows[index]
            gradient_window.write(
                self, squares, newest, self._spatial(gradient, index)
            )
            oldest_square = gradient_window.read(squares, oldest)

        # Constants as tensors of the state dtype: a Python float meeting a
        # float64 tensor would otherwise become float32 first on some backends.
        beta_1, beta_2, epsilon = (
            ops.convert_to_tensor(x, dtype)
            for x in (self.beta_1, self.beta_2, self.epsilon)
        )
        # `m` holds W·m_t: unnormalized, its update has one full-size
        # product fewer, and 1/W goes into the scalar rate below.
        weight_sum, oldest_weight = (
            ops.convert_to_tensor(x, dtype) for x in self._momentum_weights()
        )
        self.assign(
            m, beta_1 * (m - oldest_weight * oldest_gradient) + gradient
        )
        self.assign(v, beta_2 * v + (1 - beta_2) * oldest_square)

        # The step is held until the window is full. Masking the scalar rate
        # and the block-sized denominator (not the full-size update) keeps
        # the masked warm-up steps finite even with epsilon 0.
        age = step - n  # how many second-moment terms v holds
        active = age > 0
        bias_correction = 1 - ops.power(
            beta_2, ops.cast(ops.maximum(age, 1), dtype)
        )
        lr = ops.where(active, ops.cast(learning_rate, dtype) / weight_sum, 0)
        denominator = ops.where(
            active, ops.sqrt(v / bias_correction) + epsilon, 1
        )
        self.assign_sub(
            variable, ops.cast(m * (lr / denominator), variable.dtype)
        )

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        if keras.backend.backend() == "torch":
            return torch_step.update(
                self, grads, trainable_variables, learning_rate
            )
        return super()._backend_update_step(
            grads, trainable_variables, learning_rate
        )

    def _momentum_weights(self):
        """`W = Σ_{i<n} β1^i` and the weight `β1^(n-1)` of `g_{t-n}` in W·m."""
        n = self.keep_num
        return sum(self.beta_1**i for i in range(n)), self.beta_1 ** (n - 1)

    def _spatial(self, gradient, index):
        """φ(gradient²) over each block, shaped like the velocity."""
        axes = self._block_axes[index]
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
            block_size = math.prod(
                gradient.shape if axes is None
                else [gradient.shape[a] for a in axes]
            )
            phi = ops.sum(ops.square(gradient), axis=axes, keepdims=True)
            phi = phi / block_size
        # Keras's torch reductions drop `keepdims` when `axis` is None.
        return ops.reshape(phi, self._velocities[index].shape)

    def _add_slot(
        self, variable, name, dtype, window_length=None, reduced_axes=()
    ):
        """A slot shaped and laid out like `variable`.

        `window_length` adds a leading axis; `reduced_axes` (None: all) are
        kept with size 1. Under `keras.distribution` the slot is sharded like
        the variable, with the added and reduced axes replicated.
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
                [None] * len(leading) + axes, layout.device_mesh
            )
        return self.add_variable(
            shape=tuple(leading + shape),
            dtype=dtype,
            layout=layout,
            name=f"{_slot_prefix(variable)}_{name}",
        )

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


AdaShift.__doc__ = AdaShift.__doc__.replace(
    "{{base_optimizer_keyword_args}}",
    keras.src.optimizers.optimizer.base_optimizer_keyword_args,
)


def _slot_prefix(variable):
    """Keras's slot naming: the variable's path with `/` made `_`."""
    path = getattr(variable, "path", None) or variable.name
    return path.replace("/", "_").replace(":", "_")


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


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


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


def _check_keep_num(keep_num):
    if not isinstance(keep_num, numbers.Integral) or isinstance(
        keep_num, bool
    ) or keep_num < 1:
        raise ValueError(
            "Argument `keep_num` must be a positive int (the number of "
            f"gradients in the window). Received: keep_num={keep_num!r}"
        )
    return int(keep_num)


def _check_beta(name, beta):
    if not _is_real(beta) or not 0 <= beta < 1:
        raise ValueError(
            f"Argument `{name}` must be a float in [0, 1). "
            f"Received: {name}={beta!r}"
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


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_window_dtype(window_dtype):
    if window_dtype is None:
        return None
    try:
        dtype = keras.backend.standardize_dtype(window_dtype)
    except ValueError:
        dtype = None
    if dtype not in ("float16", "bfloat16", "float32", "float64"):
        raise ValueError(
            "Argument `window_dtype` must be None or one of 'float16', "
            "'bfloat16', 'float32', 'float64'. "
            f"Received: window_dtype={window_dtype!r}"
        )
    return dtype
