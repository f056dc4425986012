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

SPATIAL_OPS = ("max", "mean", "none")
WINDOW_DTYPES = ("bfloat16", "float32", "float64")

# Version of what the optimizer's variables hold, saved beside them; a file
# without it (keras-adashift 0.1.0) or with other settings is not loaded.
STATE_FORMAT = 3


class VariableState(NamedTuple):
    """The optimizer's state for one model variable.

    `axes` are the axes a block of `v` spans (None: all, `()`: none). With a
    reducing φ, `v` lives in the `BlockState`, at `blocks` (start, stop and
    the block shape); with φ = none it is element-wise, here. A slot is None
    where the configuration does not need it.
    """

    position: int  # this variable's entry in the step counts
    shape: tuple  # the variable's: a gradient's static shape may be partial
    axes: object
    blocks: object
    window: object  # (n + 1, *shape): gradients, when m or v needs them
    momentum: object  # W·m_t, unless β1 = 0 (then m_t = g_t)
    velocity: object  # φ = none: v per element
    bias_correction: object  # φ = none: 1 - β2^k per element; 0 on hold


class BlockState(NamedTuple):
    """What a reducing φ keeps per block, every variable's blocks in one
    vector: one update for all of them, not a few tiny ones per variable."""

    square_window: object  # (n, blocks): φ(g²) of the last n steps, oldest 1st
    velocity: object  # v
    bias_correction: object  # 1 - β2^k; 0 while the block holds


class StepPlan(NamedTuple):
    """What every variable's update shares in one step, as tensors."""

    learning_rate: object  # lr / W: the 1/W of m folded in
    beta_1: object
    beta_2: object
    epsilon: object
    oldest_weight: object  # β1^(n-1), the weight of g_{t-n} in W·m
    step_limit: object  # step_bound · lr / sqrt(1 - β2), or None


def second_moment(velocity, bias_correction, oldest_square, plan):
    """v, its bias correction c = 1 - β2^k and the rate lr / (W (√v̂ + ε)).

    c counts from the step v turns non-zero (0 before): the recursion has
    no cancellation, unlike 1 - β2^k in float32. v, c >= 0: a block moves
    where v + c is not 0 (`!= 0` rather than `> 0`: a NaN in v reaches the
    variable instead of holding its block silently forever). A held block's
    rate is a selected 0, so nothing is 0/0 even with epsilon 0. The
    authors' floor max(1e-8, c) never binds on a moving block: there
    c >= 1 - β2 >= 2^-24 (β2 is validated below 1 in float32).
    """
    beta_2 = plan.beta_2
    v = beta_2 * velocity + (1 - beta_2) * oldest_square
    moving = ops.not_equal(v + bias_correction, 0)
    c = ops.where(moving, beta_2 * bias_correction + (1 - beta_2), 0)
    denominator = ops.sqrt(v / ops.where(moving, c, 1))
    rate = ops.where(moving, plan.learning_rate / (denominator + plan.epsilon),
                     0)
    return v, c, rate


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
    otherwise (the blocks: float64 if any variable is float64).

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
        step_bound: Optional positive float, off by default (the authors'
            algorithm). When set, each element's step is clipped to
            `step_bound · lr / sqrt(1 - β2)`: the largest step Adam's `v_t`
            allows (with β1 = 0), which AdaShift's `v_t`, built from old
            gradients only, does not bound. It keeps a parameter whose
            recent gradients are far larger than its old ones (rare tokens'
            embedding rows, recurrent kernels) from jumping; the state is
            unchanged. `1.0` made `spatial_op="none"` train the LSTM and
            GRU tasks of `keras-adashift tasks`; see the README's "Choosing
            settings".
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
        self.step_bound = _check_step_bound(step_bound)
        self.window_dtype = _check_window_dtype(window_dtype)

    def build(self, var_list):
        """Creates the state: per variable its `VariableState` slots, in
        the order of the fields, then the step counts and the `BlockState`.

        The order of creation is part of the saved format: optimizer state
        is restored by position.
        """
        if self.built:
            return
        for variable in var_list:
            _check_float_variable(variable)
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
            dtypes.add(_state_dtype(variable.dtype))
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
        axes = _block_axes(self.spatial_op, self.spatial_axes,
                           len(variable.shape))
        dtype = _state_dtype(variable.dtype)
        blocks = window = momentum = velocity = bias_correction = None
        if axes != ():  # a reducing φ
            shape = _block_shape(variable.shape, axes)
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

    def _update(self, grads, variables, learning_rate, for_each=None,
                local=None):
        """One AdaShift step of `variables`."""
        states = [self._states[self._get_variable_index(v)]
                  for v in variables]
        plans = {}

        def plan(dtype):
            if dtype not in plans:
                plans[dtype] = self._plan(learning_rate, dtype)
            return plans[dtype]

        newest, oldest = self._advance(states)
        rates = [None] * len(states)
        if self._blocks is not None:
            rates = self._update_blocks(
                [local(g) if local else g for g in grads], states,
                plan(self._blocks.velocity.dtype))
        for k, (gradient, variable, state) in enumerate(
                zip(grads, variables, states)):
            args = (gradient, newest[k], oldest[k], rates[k])

            def update(variable, gradient, newest, oldest, rate,
                       state=state):
                self._update_variable(
                    variable, gradient, state, newest, oldest, rate,
                    plan(_state_dtype(variable.dtype)))

            if for_each is None:
                update(variable, *args)
            else:
                for_each(update, variable, args)

    def _plan(self, learning_rate, dtype=None):
        """The `StepPlan` as tensors of `dtype`, or (None) as Python floats
        with a float64 learning rate, for torch's multi-tensor kernels."""
        n, beta_1 = self.keep_num, self.beta_1
        if beta_1 == 0:
            weight_sum, oldest_weight = 1.0, 0.0
        else:
            weight_sum = (1 - beta_1**n) / (1 - beta_1)
            oldest_weight = beta_1 ** (n - 1)
        constants = (beta_1, self.beta_2, self.epsilon, oldest_weight)
        learning_rate = ops.cast(learning_rate, dtype or "float64")
        step_limit = None
        if self.step_bound is not None:
            step_limit = learning_rate * (
                self.step_bound / math.sqrt(1 - self.beta_2))
        if dtype is None:
            return StepPlan(learning_rate / weight_sum, *constants, step_limit)
        # Constants as tensors of the state dtype: a Python float given to
        # an `ops` function would become floatx (float32) on some backends.
        return StepPlan(
            learning_rate / weight_sum,
            *(ops.convert_to_tensor(x, dtype) for x in constants), step_limit)

    def _advance(self, states):
        """Counts a step for each of these variables; returns the window
        slots of their newest and their oldest gradient.

        The window has n + 1 slots: g_t goes into its slot first, and
        g_{t-n} is read from the next one of the updated buffer, so XLA can
        update the window in place (a read of the slot about to be
        overwritten makes it copy the whole window). Slots not yet written
        hold zeros, which keep the blocks on hold.
        """
        length = self.keep_num + 1
        positions = [s.position for s in states]
        stepped = np.zeros(self._step_counts.shape, "int32")
        stepped[positions] = 1
        counts = self._step_counts + ops.convert_to_tensor(
            stepped, self._step_counts.dtype)
        self.assign(self._step_counts, counts)
        if all(s.window is None for s in states):
            return [None] * len(states), [None] * len(states)
        counts = ops.take(counts, positions)
        return (ops.unstack(counts % length),
                ops.unstack((counts + 1) % length))

    def _update_blocks(self, grads, states, plan):
        """Adds φ(g_t²) to the window of φ and updates v and its bias
        correction for the blocks of every variable at once; returns each
        variable's rate, shaped like its blocks.

        A variable without a gradient this step keeps its blocks as they
        were. φ is taken as each gradient arrives, so the window holds only
        block-sized values.
        """
        blocks = self._blocks
        dtype = blocks.velocity.dtype
        given = {s.position: g for g, s in zip(grads, states)}
        phis, mask = [], []
        for state in self._states:
            if state is None:
                continue
            start, stop, _ = state.blocks
            if state.position in given:
                gradient = ops.cast(gradient_window.dense(
                    given[state.position], state.shape), dtype)
                phis.append(gradient_window.spatial(
                    gradient, state.axes, (stop - start,), self.spatial_op))
            else:
                phis.append(ops.zeros((stop - start,), dtype))
            mask += [state.position in given] * (stop - start)
        phi = ops.concatenate(phis) if len(phis) > 1 else phis[0]
        old = BlockState(*(x.value for x in blocks))
        window = ops.concatenate([old.square_window[1:], phi[None]])
        v, c, rate = second_moment(old.velocity, old.bias_correction,
                                   old.square_window[0], plan)
        if not all(mask):
            mask = ops.convert_to_tensor(np.array(mask))
            window = ops.where(mask, window, old.square_window)
            v = ops.where(mask, v, old.velocity)
            c = ops.where(mask, c, old.bias_correction)
        self.assign(blocks.square_window, window)
        self.assign(blocks.velocity, v)
        self.assign(blocks.bias_correction, c)
        return [ops.reshape(rate[s.blocks[0]:s.blocks[1]], s.blocks[2])
                for s in states]

    def _update_variable(self, variable, gradient, state, newest, oldest,
                         rate, plan):
        """Writes g_t into the variable's window, updates W·m and, for
        φ = none, v; then moves the variable by `rate · W·m`."""
        dtype = plan.beta_2.dtype
        gradient = ops.cast(gradient_window.dense(gradient, state.shape),
                            dtype)
        if state.window is not None:
            stored = ops.cast(gradient, state.window.dtype)
            gradient_window.write(self, state.window, newest, stored)
            oldest_gradient = ops.cast(
                gradient_window.read(state.window, oldest), dtype)
        if state.blocks is None:
            v, c, rate = second_moment(
                state.velocity, state.bias_correction,
                ops.square(oldest_gradient), plan)
            self.assign(state.velocity, v)
            self.assign(state.bias_correction, c)
        else:
            rate = ops.cast(rate, dtype)
        if state.momentum is None:
            update = gradient
        else:
            # m adds the gradient as the window holds it, so that it later
            # subtracts exactly what it added.
            m = state.momentum
            update = (plan.beta_1 * (m - plan.oldest_weight * oldest_gradient)
                      + ops.cast(stored, dtype))
            self.assign(m, update)
        step = update * rate
        if plan.step_limit is not None:
            step = ops.clip(step, -plan.step_limit, plan.step_limit)
        self.assign_sub(variable, ops.cast(step, variable.dtype))

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
                "step_bound": self.step_bound,
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


def _block_shape(shape, axes):
    """The shape of a variable's blocks: 1 along the axes a block spans."""
    return tuple(1 if axes is None or i in axes else d
                 for i, d in enumerate(shape))


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


def _check_step_bound(step_bound):
    if step_bound is None:
        return None
    if (not _is_real(step_bound) or not math.isfinite(step_bound)
            or step_bound <= 0):
        raise ValueError(
            "Argument `step_bound` must be None (off) or a finite float > 0 "
            "(a multiple of learning_rate / sqrt(1 - beta_2)). "
            f"Received: step_bound={step_bound!r}"
        )
    return float(step_bound)


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
