"""AdaShift's step: the state records, the shared math and the update.

Both optimizer classes (Keras 3's `keras_adashift.AdaShift` and tf_keras's
`keras_adashift.tf_keras.AdaShift`) hold the same state in the same records
and take their step from `AdaShiftUpdate`; torch's multi-tensor step
(`torch_step`) uses the same records and `second_moment`. Nothing here
imports an optimizer class.
"""

import math
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from keras_adashift import gradient_window
from keras_adashift import validation


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

    Three edges, the same on every backend:
    - φ(g²) and v below the dtype's smallest normal number count as 0, as
      TensorFlow and XLA flush them on the CPU (|g| < 1.1e-19 in float32).
    - With ε = 0 a moving block whose v has decayed to 0 (its old
      gradients were 0 for long; `m` is 0 too) takes no step, not 0/0.
    - An infinite v (a gradient whose square overflowed, |g| > 1.8e19 in
      float32) gives a NaN rate, so the variable turns NaN as under Adam,
      instead of freezing its block silently forever.
    """
    beta_2 = plan.beta_2
    tiny = np.finfo(keras.backend.standardize_dtype(velocity.dtype)).tiny
    oldest_square = ops.where(oldest_square < tiny, 0, oldest_square)
    v = beta_2 * velocity + (1 - beta_2) * oldest_square
    v = ops.where(v < tiny, 0, v)
    moving = ops.not_equal(v + bias_correction, 0)
    c = ops.where(moving, beta_2 * bias_correction + (1 - beta_2), 0)
    scale = ops.sqrt(v / ops.where(moving, c, 1)) + plan.epsilon
    rate = ops.where(ops.isinf(scale), np.nan, plan.learning_rate / scale)
    rate = ops.where(ops.logical_and(moving, ops.not_equal(scale, 0)), rate,
                     0)
    return v, c, rate


def state_dtype(dtype):
    """Moments accumulate, so 16-bit variables keep them in float32."""
    if keras.backend.standardize_dtype(dtype) in ("float16", "bfloat16"):
        return "float32"
    return dtype


def block_axes(spatial_op, spatial_axes, rank):
    """The axes φ reduces for a variable of this rank (None: all of them)."""
    if spatial_op == "none":
        return ()
    if spatial_axes is None:
        return None
    axes = tuple(sorted({a % rank for a in spatial_axes if -rank <= a < rank}))
    return axes or None


def block_shape(shape, axes):
    """The shape of a variable's blocks: 1 along the axes a block spans."""
    return tuple(1 if axes is None or i in axes else d
                 for i, d in enumerate(shape))


class AdaShiftUpdate:
    """The AdaShift step of a list of variables, for an optimizer class that
    provides the hyperparameters (`keep_num`, `beta_1`, `beta_2`,
    `epsilon`, `spatial_op`, `step_bound`), the state built by `build`
    (`_states`, `_blocks`, `_step_counts`), `_get_variable_index` and
    `assign` / `assign_sub` (which write `tf.IndexedSlices` as scatters).
    """

    def _set_hyperparameters(self, keep_num, beta_1, beta_2, epsilon,
                             spatial_op, spatial_axes, step_bound,
                             window_dtype):
        """AdaShift's own arguments, checked (`validation`), as plain
        attributes: the same checks and messages in both classes."""
        self.keep_num = validation.check_keep_num(keep_num)
        self.beta_1 = validation.check_beta("beta_1", beta_1)
        self.beta_2 = validation.check_beta("beta_2", beta_2)
        self.epsilon = validation.check_epsilon(epsilon)
        self.spatial_op = validation.check_spatial_op(spatial_op)
        self.spatial_axes = validation.check_spatial_axes(
            spatial_axes, self.spatial_op)
        self.step_bound = validation.check_step_bound(step_bound)
        self.window_dtype = validation.check_window_dtype(window_dtype)

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

        # Dense, in the variables' shapes, once. No state changes before
        # all of them exist: a call whose input ran out (the end of an
        # epoch of unknown length) or whose gradient has another runtime
        # shape then leaves the state as it was, the step counts included.
        checked = [gradient_window.dense(local(g) if local else g, s.shape)
                   for g, s in zip(grads, states)]
        if local is None:
            grads = checked
        with gradient_window.after(checked):
            newest, oldest = self._advance(states)
            rates = [None] * len(states)
            if self._blocks is not None:
                rates = self._update_blocks(
                    checked, states, plan(self._blocks.velocity.dtype))
            for k, (gradient, variable, state) in enumerate(
                    zip(grads, variables, states)):
                args = (gradient, newest[k], oldest[k], rates[k])

                def update(variable, gradient, newest, oldest, rate,
                           state=state):
                    self._update_variable(
                        variable, gradient, state, newest, oldest, rate,
                        plan(state_dtype(variable.dtype)))

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
            # |lr|: a negative rate (ascent) must not reverse the clip.
            step_limit = ops.abs(learning_rate) * (
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
        variable's rate, shaped like its blocks. `grads` are dense, in their
        variables' shapes (as `_update` checks them).

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
                gradient = ops.cast(given[state.position], dtype)
                phis.append(gradient_window.spatial(
                    gradient, state.axes, (stop - start,), self.spatial_op))
            else:
                phis.append(ops.zeros((stop - start,), dtype))
            mask += [state.position in given] * (stop - start)
        phi = ops.concatenate(phis) if len(phis) > 1 else phis[0]
        old = BlockState(*map(gradient_window.backend_value, blocks))
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
