"""AdaShift for tf_keras (Keras 2).

    from keras_adashift.tf_keras import AdaShift

For the pipelines that still train with tf_keras (TFX, TF Transform, TF-GNN,
TF Probability; `TF_USE_LEGACY_KERAS=1` with `from tensorflow import keras`).
The class is an adapter: the step is `algorithm.AdaShiftUpdate._update`, the
one the Keras 3 class runs, and the argument checks are `validation`'s. What
is here is tf_keras's contract: `build` with `add_variable_from_reference`,
`update_step(gradient, variable)`, `_var_key` / `_index_dict`, the
distributed apply, `jit_compile` and the config.

Importing this module registers the class with tf_keras
(`keras_adashift>AdaShift` for `load_model`, and `"adashift"` /
`"AdaShift"` for `compile`). It uses Keras 3's `keras.ops` on the
TensorFlow backend (TensorFlow 2.16+ installs Keras 3 beside tf_keras).
"""

import os
import sys
import warnings

if "keras" not in sys.modules:
    # The shared step computes with keras.ops: they must be TensorFlow's.
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        "keras_adashift.tf_keras runs AdaShift's step with Keras 3's "
        "TensorFlow backend, but Keras was imported with backend "
        f"{keras.backend.backend()!r}. Import keras_adashift.tf_keras "
        "before Keras, or set KERAS_BACKEND=tensorflow."
    )

import tensorflow as tf  # noqa: E402

try:
    import tf_keras  # noqa: E402
except ImportError as error:  # pragma: no cover
    raise ImportError(
        "keras_adashift.tf_keras needs the tf_keras package "
        "(`pip install tf-keras`, the version matching TensorFlow)."
    ) from error

from keras_adashift import adashift as _keras3  # noqa: E402
from keras_adashift import validation  # noqa: E402
from keras_adashift.algorithm import AdaShiftUpdate  # noqa: E402
from keras_adashift.algorithm import BlockState  # noqa: E402
from keras_adashift.algorithm import state_dtype  # noqa: E402

__all__ = ["AdaShift"]


@tf_keras.saving.register_keras_serializable(package="keras_adashift")
class AdaShift(AdaShiftUpdate, tf_keras.optimizers.Optimizer):
    """AdaShift (Zhou et al., ICLR 2019) for tf_keras.

    The same optimizer as `keras_adashift.AdaShift` (see its documentation
    and the README): the same arguments, checks, semantics (the hold per
    block, steps per variable, blocks over `spatial_axes`, `step_bound`,
    `window_dtype`, β1 = 0 without a window) and the same state, in the same
    order and shapes. The step itself is shared with the Keras 3 class.

    Args:
        learning_rate, keep_num, beta_1, beta_2, epsilon, spatial_op,
        spatial_axes, step_bound, window_dtype: as in
            `keras_adashift.AdaShift`.
        weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema,
        ema_momentum, ema_overwrite_frequency, jit_compile, name: tf_keras's
            own (`jit_compile`, True by default, takes effect only where a
            GPU is present, as for tf_keras's optimizers; then the whole step
            of all variables runs as one XLA computation).
        loss_scale_factor, gradient_accumulation_steps: Keras 3 arguments
            tf_keras's optimizers do not have. Only `None` is accepted (so a
            Keras 3 config loads); use
            `tf_keras.mixed_precision.LossScaleOptimizer` for loss scaling.
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
        jit_compile=True,
        name="AdaShift",
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        **kwargs,
    ):
        validation.check_renamed_arguments(kwargs)
        learning_rate = validation.check_learning_rate(learning_rate)
        for argument, given in (
            ("loss_scale_factor", loss_scale_factor),
            ("gradient_accumulation_steps", gradient_accumulation_steps),
        ):
            if given is not None:
                raise ValueError(
                    f"Argument `{argument}` is a Keras 3 optimizer argument "
                    "that tf_keras's optimizers do not have; only None is "
                    "accepted here (for loss scaling use "
                    "tf_keras.mixed_precision.LossScaleOptimizer). "
                    f"Received: {argument}={given!r}"
                )
        super().__init__(
            name=name,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            jit_compile=jit_compile,
            **kwargs,
        )
        self._learning_rate = self._build_learning_rate(learning_rate)
        self._set_hyperparameters(keep_num, beta_1, beta_2, epsilon,
                                  spatial_op, spatial_axes, step_bound,
                                  window_dtype)

    # --- the state -----------------------------------------------------------

    def build(self, var_list):
        """Creates the state in the Keras 3 class's order and shapes: per
        variable its `VariableState` slots (decided by the Keras 3 class's
        `_add_state`), then the step counts and the `BlockState`."""
        if getattr(self, "_built", False):
            return
        var_list = list(var_list)
        for variable in var_list:
            validation.check_float_variable(variable)
        super().build(var_list)
        self._built = True
        reducing = self.spatial_op != "none"
        states, start, dtypes = [], 0, set()
        for position, variable in enumerate(var_list):
            state = _keras3.AdaShift._add_state(self, variable, position,
                                                start)
            states.append(state)
            if reducing:
                start = state.blocks[1]
            dtypes.add(keras.backend.standardize_dtype(
                state_dtype(_true_dtype(variable))))
        # Not tracked as attributes: the variables are in `self._variables`,
        # which tf_keras saves and checkpoints by position.
        self._states = self._no_dependency(states)
        self._step_counts = self.add_variable(
            (len(var_list),), dtype="int64", name="step_counts")
        blocks = None
        if reducing:
            dtype = "float64" if "float64" in dtypes else "float32"
            blocks = BlockState(
                square_window=self.add_variable(
                    (self.keep_num, start), dtype=dtype,
                    name="square_window"),
                velocity=self.add_variable((start,), dtype=dtype,
                                           name="velocity"),
                bias_correction=self.add_variable(
                    (start,), dtype=dtype, name="bias_correction"),
            )
        self._blocks = self._no_dependency(blocks)

    def _add_slot(self, variable, name, dtype, window_length=None):
        """A slot placed like `variable` (tf_keras's
        `add_variable_from_reference`); `window_length` adds a leading
        axis. A dtype other than the variable's (a `window_dtype`, float32
        state of a 16-bit variable) is made beside it the same way."""
        shape = tuple(variable.shape)
        if window_length is not None:
            shape = (window_length,) + shape
        dtype = tf.as_dtype(keras.backend.standardize_dtype(dtype))
        if dtype == _true_dtype(variable):
            return self.add_variable_from_reference(variable, name,
                                                    shape=shape)
        strategy = tf.distribute.get_strategy()
        with strategy.extended.colocate_vars_with(variable):
            slot = tf.Variable(
                tf.zeros(shape, dtype),
                name=f"{name}/{variable._shared_name}",
                trainable=False,
            )
        self._variables.append(slot)
        return slot

    def _get_variable_index(self, variable):
        return self._index_dict[self._var_key(variable)]

    def assign(self, variable, value):
        """`variable.assign`; `tf.IndexedSlices` as a scatter (one window
        slot), as Keras 3's `optimizer.assign` does."""
        if isinstance(value, tf.IndexedSlices):
            variable.scatter_update(value)
        else:
            variable.assign(value)

    def assign_sub(self, variable, value):
        if isinstance(value, tf.IndexedSlices):
            variable.scatter_sub(value)
        else:
            variable.assign_sub(value)

    # --- the step ------------------------------------------------------------

    def apply_gradients(self, grads_and_vars, name=None,
                        skip_gradients_aggregation=False, **kwargs):
        # A gradient of the wrong shape must not touch any state.
        grads_and_vars = list(grads_and_vars)
        for gradient, variable in grads_and_vars:
            validation.check_gradient_shape(gradient, variable)
        return super().apply_gradients(
            grads_and_vars, name=name,
            skip_gradients_aggregation=skip_gradients_aggregation, **kwargs)

    def update_step(self, gradient, variable):
        """Update step given gradient and the associated model variable."""
        self._update([gradient], [variable], self.learning_rate)

    def _distributed_apply_gradients_fn(self, distribution, grads_and_vars,
                                        **kwargs):
        # All variables in one `_update`: what they share is computed once
        # and their blocks are updated together, as in the Keras 3 class.
        grads, variables = (list(x) for x in zip(*grads_and_vars))
        if self.jit_compile and not tf.distribute.has_strategy():
            # One XLA computation for the whole step. The key retraces it
            # per list of variables, as tf_keras's `_update_step_xla` does.
            self._update_xla(grads, variables,
                             tuple(self._var_key(v) for v in variables))
        else:
            # In cross-replica context: each variable's update runs on each
            # of its devices; the blocks' update once, on the (all-reduced,
            # identical) gradients of the first replica. Under a strategy
            # the step runs without XLA.
            def for_each(update, variable, args):
                distribution.extended.update(variable, update, args=args,
                                             group=False)

            self._update(
                grads, variables, self.learning_rate, for_each,
                local=lambda g: distribution.experimental_local_results(g)[0])
        if self.use_ema:
            self._update_model_variables_moving_average(variables)
            if self.ema_overwrite_frequency:
                overwrite = (self.iterations + 1
                             ) % self.ema_overwrite_frequency == 0
                tf.cond(
                    tf.cast(overwrite, tf.bool),
                    true_fn=lambda: (
                        self._overwrite_model_variables_with_average_value(
                            variables)),
                    false_fn=lambda: None,
                )
        return self.iterations.assign_add(1)

    @tf.function(jit_compile=True, autograph=False)
    def _update_xla(self, grads, variables, key):
        self._update(grads, variables, self.learning_rate)

    # --- saving --------------------------------------------------------------

    def save_own_variables(self, store):
        super().save_own_variables(store)
        store[_keras3._FORMAT_KEY] = _keras3._encode(self._state_format())

    def load_own_variables(self, store):
        """Loads the state saved by `save_own_variables`, all or nothing:
        other settings or shapes raise before anything is assigned."""
        key = _keras3._FORMAT_KEY
        keys = [k for k in store.keys() if k != key]
        if key not in store.keys():
            warnings.warn(
                f"Skipping variable loading for optimizer '{self.name}': the "
                "saved state has no keras-adashift format record (another "
                "optimizer saved it). The model's weights load; the "
                "optimizer starts afresh.",
                stacklevel=2,
            )
            return
        saved = _keras3._decode(store[key])
        expected = self._state_format()
        if saved != expected:
            raise ValueError(
                f"Cannot load the state of optimizer '{self.name}': it was "
                "saved with other settings, which change what the state "
                f"holds. Saved: {saved}, this optimizer: {expected}."
            )
        if len(keys) != len(self.variables):
            return super().load_own_variables({k: store[k] for k in keys})
        values = [store[str(i)] for i in range(len(self.variables))]
        for variable, value in zip(self.variables, values):
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"Cannot load the state of optimizer '{self.name}': "
                    f"variable {variable.name} has shape "
                    f"{tuple(variable.shape)}, the saved value "
                    f"{tuple(value.shape)} (saved with another keep_num, "
                    "spatial_axes or model?). Nothing was loaded."
                )
        for variable, value in zip(self.variables, values):
            variable.assign(value)

    def _state_format(self):
        return _keras3.AdaShift._state_format(self)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "learning_rate": self._serialize_hyperparameter(
                    self._learning_rate),
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


def _true_dtype(variable):
    """A variable's storage dtype (an AutoCastVariable reports its cast
    dtype inside a layer's call)."""
    return tf.as_dtype(getattr(variable, "true_dtype", variable.dtype))


class _RegisteredName(str):
    """`"adashift"` / `"AdaShift"` in tf_keras's custom objects.

    tf_keras's compile config keeps the `optimizer` argument as given, and
    `load_model` turns a string found in the custom objects into the object
    registered for it: with the class registered, a model compiled with
    `"adashift"` would load as `compile(optimizer=AdaShift)` (the class),
    which tf_keras refuses. This string builds an AdaShift from a config
    (what `compile("adashift")` asks of it) and stays a string on load.
    """

    def from_config(self, config, custom_objects=None):
        return AdaShift.from_config(config, custom_objects)


_custom_objects = tf_keras.utils.get_custom_objects()
for _name in ("adashift", "AdaShift"):
    _custom_objects.setdefault(_name, _RegisteredName(_name))
del _custom_objects, _name
