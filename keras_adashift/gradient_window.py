"""One-slot reads and writes of the gradient window, in place on every backend.

AdaShift keeps its recent gradients in a `(keep_num + 1, *shape)` slot.
Each step writes one slice and reads one slice. Written functionally, XLA and
TensorFlow's graph runtime copy the whole window to do that; these functions
use each backend's in-place primitive instead:

- TensorFlow graph: a scatter to write, a gather on the handle to read.
  After the first gather or scatter a resource variable is in copy-on-read
  mode, so a dense read of the window would copy all of it every step.
- TensorFlow under XLA (`jit_compile=True`): `dynamic_update_slice` to write,
  as on JAX. XLA lowers the scatter to one too, but with a `select` that
  skips out-of-bounds indices and so also reads the old slot: 6% of the
  step at 4M parameters.
- PyTorch: `index_copy_` under `no_grad`, and indexing, which is a view
  (for `update_step`; `torch_step` writes every window at once, into views).
- JAX: `dynamic_update_slice`/`dynamic_slice`, which XLA performs in place on
  the donated state of Keras's JAX trainer.

The optimizer writes the newest gradient first and then reads the oldest
from the updated buffer, a different slot of a window one slot longer than
`keep_num`. A read of the slot about to be overwritten, in the same step,
would make XLA copy the whole window to keep the old value alive.
"""

import contextlib
import math

import keras
from keras import backend
from keras import ops

_BACKEND = backend.backend()

if _BACKEND == "tensorflow":
    import tensorflow as tf

    # Looked up once, and optional: TensorFlow exports it for Keras under
    # `tf.__internal__`, which a release may move. Without it the window is
    # written with the scatter, which is right under XLA too, only slower.
    _enclosing_xla_context = getattr(
        getattr(tf, "__internal__", None), "get_enclosing_xla_context", None
    )
elif _BACKEND == "torch":
    import torch
elif _BACKEND == "jax":
    from jax.experimental import sparse as jax_sparse


def dense(gradient, shape):
    """The dense gradient of a variable of `shape`: the window holds every
    entry of each step's gradient (repeated `tf.IndexedSlices` indices are
    summed).

    On TensorFlow the result has `shape` as its static shape: a model fed
    sequences of variable length (tf.data with `None` dimensions) gets
    gradients whose static shape is partly unknown, while the variable's is
    always known. `tf.ensure_shape` also checks it when the step runs.
    """
    if _BACKEND == "tensorflow":
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.convert_to_tensor(gradient)
        if not gradient.shape.is_fully_defined():
            gradient = tf.ensure_shape(gradient, shape)
        return gradient
    if _BACKEND == "jax" and isinstance(gradient, jax_sparse.JAXSparse):
        return gradient.todense()
    return gradient


def after(tensors):
    """A context whose ops run only once `tensors` exist: TensorFlow's
    graphs otherwise run a stateful op that needs no input of the step
    (the step counts' increment) even when the step's input fails."""
    if _BACKEND == "tensorflow":
        return tf.control_dependencies(tensors)
    return contextlib.nullcontext()


def static_shape(gradient):
    """The gradient's dense shape as far as it is known before running
    (None for an unknown dimension or rank); slices have unknown rows."""
    if _BACKEND == "tensorflow":
        if isinstance(gradient, tf.IndexedSlices):
            rows = gradient.values.shape[1:]
            return None if rows.rank is None else (None, *rows.as_list())
        shape = tf.TensorShape(gradient.shape)
        return None if shape.rank is None else tuple(shape.as_list())
    return tuple(gradient.shape)


def spatial(gradient, axes, shape, spatial_op):
    """φ(gradient²) over each block, the reduced `axes` (None: all), as an
    array of the blocks' `shape`."""
    block_size = math.prod(
        gradient.shape if axes is None else [gradient.shape[a] for a in axes]
    )
    if block_size == 0:
        # An empty block has no gradient to feed v: it stays on hold.
        return ops.zeros(shape, gradient.dtype)
    if spatial_op == "max" and _BACKEND == "tensorflow":
        # max(g²) as the larger of max(g)² and min(g)². TensorFlow's
        # XLA:CPU hands plain reductions to a vectorized kernel that reads g
        # once, but writes g² (or |g|) out in full first.
        phi = ops.maximum(
            *(ops.square(reduce(gradient, axis=axes, keepdims=True))
              for reduce in (ops.max, ops.min))
        )
    elif spatial_op == "max":
        phi = ops.max(ops.square(gradient), axis=axes, keepdims=True)
    else:
        # A sum over a count: Keras's torch `mean` loses float64 precision.
        phi = ops.sum(ops.square(gradient), axis=axes, keepdims=True)
        phi = phi / block_size
    # Keras's torch reductions drop `keepdims` when `axis` is None.
    return ops.reshape(phi, shape)


def backend_value(variable):
    """What the backend computes with: a Keras 3 variable's `.value`; a
    `tf.Variable` (tf_keras's optimizer state) or a tensor as it is."""
    if isinstance(variable, keras.Variable):
        return variable.value
    return variable


def colocated(optimizer, variable):
    """Places a slot beside its variable, as Keras's own slots are."""
    if _BACKEND == "tensorflow":
        return optimizer._distribution_strategy.extended.colocate_vars_with(
            backend_value(variable)
        )
    return contextlib.nullcontext()


def write(optimizer, window, slot, value):
    """Stores `value` at `window[slot]`, leaving the other slots untouched."""
    if _BACKEND == "torch":
        # Torch runs eagerly, once per variable and step: `.to` costs a
        # fraction of `ops.cast` there.
        target = window.value
        with torch.no_grad():
            target.index_copy_(
                0, slot.reshape(1).to(torch.long), value.to(target.dtype)[None]
            )
        return
    value = ops.cast(value, window.dtype)
    if _BACKEND == "tensorflow" and not _in_xla():
        slot = tf.reshape(tf.cast(slot, "int32"), [1])
        # No dense_shape: `tf.shape(window)` would read the whole window,
        # a full copy once the variable is in copy-on-read mode.
        optimizer.assign(window, tf.IndexedSlices(value[None], slot))
    else:
        start = _start(slot, len(window.shape))
        optimizer.assign(window, ops.slice_update(
            backend_value(window), start, value[None]))


def read(window, slot):
    """`window[slot]`, without a dense read of the window."""
    if _BACKEND == "tensorflow":
        # The handle, not `sparse_read`: inside a tf.distribute update it is
        # this replica's copy of a MirroredVariable, which has no sparse_read.
        variable = backend_value(window)
        return tf.raw_ops.ResourceGather(
            resource=variable.handle,
            indices=tf.cast(slot, "int32"),
            dtype=variable.dtype,
        )
    if _BACKEND == "torch":
        return window.value[slot]
    start = _start(slot, len(window.shape))
    return ops.slice(backend_value(window), start,
                     (1,) + tuple(window.shape[1:]))[0]


def _in_xla():
    """Whether TensorFlow traces for XLA (`tf.function(jit_compile=True)`)."""
    return (
        _enclosing_xla_context is not None
        and _enclosing_xla_context() is not None
    )


def _start(slot, rank):
    """`(slot, 0, ..., 0)` as one int32 array: JAX wants one index dtype,
    and Python zeros turn int64 under `jax_enable_x64`."""
    return ops.pad(ops.reshape(ops.cast(slot, "int32"), (1,)), [(0, rank - 1)])
