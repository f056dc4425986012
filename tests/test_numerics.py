"""Trajectories against implementations that share no code with AdaShift:
a hyperparameter sweep, blocks over spatial_axes, NaN and inf gradients.

Expected values come from `tests/reference.py` (explicit windowed sums in
float64 NumPy), from `pytorch_optimizer.AdaShift` (an outside
implementation), or from formulas written out in the test itself; never from
the optimizer under test. Each case is its own test id; the cases of one
table share one traced step (`run_keras`), computed once and cached.
"""

import functools

import keras
import numpy as np
import pytest
from keras import ops

from conftest import FLOAT
from keras_adashift import AdaShift
from trajectories import LR
from trajectories import SHAPES
from trajectories import Case
from trajectories import assert_case_matches
from trajectories import config
from trajectories import round_to
from trajectories import run_keras
from trajectories import sweep

pytestmark = pytest.mark.usefixtures("floatx_like_the_variables")


def _by_id(tables):
    """(table, index) per case of `tables`, with the cases' ids."""
    pairs = [(t, i) for t, cases in enumerate(tables)
             for i in range(len(cases))]
    return dict(argnames="table, index", argvalues=pairs,
                ids=[tables[t][i].id for t, i in pairs])


# 50 steps wrap even the 10-gradient window four times. The 40-gradient one
# first shifts a gradient out at step 41; 100 steps wrap it twice more.
SWEEPS = (sweep((1, 2, 3, 10), 50), sweep((40,), 100))


@functools.cache
def _sweep_run(table):
    return run_keras(SWEEPS[table])


@pytest.mark.parametrize(**_by_id(SWEEPS))
def test_trajectory_matches_references(table, index):
    assert_case_matches(SWEEPS[table][index], _sweep_run(table)[index])


def _axes_id(axes):
    return "_".join(map(str, axes)) if isinstance(axes, tuple) else str(axes)


_KERNEL, _BIAS, _CONV, _RANK3 = (4, 3), (3,), (2, 2, 2, 3), (2, 2, 3)
# (spatial_op, spatial_axes, keep_num, beta_1,
#  [(shape, the axes one block spans, by hand)])
_PER_AXIS = [
    ("max", 0, 3, 0.9, [(_KERNEL, (0,)), (_BIAS, (0,))]),
    ("mean", 0, 2, 0.5, [(_KERNEL, (0,)), (_BIAS, (0,))]),
    ("max", (0, 1, 2), 10, 0.9, [(_CONV, (0, 1, 2)), (_BIAS, (0,))]),
    ("mean", (0, 1, 2), 1, 0.0, [(_CONV, (0, 1, 2)), (_KERNEL, (0, 1))]),
    ("max", -1, 3, 0.5, [(_KERNEL, (1,)), (_RANK3, (2,))]),
    ("mean", (-2, -1), 2, 0.9, [(_CONV, (2, 3)), (_KERNEL, (0, 1))]),
    ("max", (0, -1), 2, 0.0, [(_RANK3, (0, 2)), (_CONV, (0, 3))]),
]
PER_AXIS = [
    Case(f"spatial_op={op!r} spatial_axes={sa} keep_num={k} beta_1={b1}",
         config(k, b1, 0.9, 1e-10, op, sa), [s for s, _ in var_axes],
         [a for _, a in var_axes], steps=40,
         id=f"{op}-axes{_axes_id(sa)}-keep{k}-b1_{b1}")
    for op, sa, k, b1, var_axes in _PER_AXIS
]


@functools.cache
def _per_axis_run():
    return run_keras(PER_AXIS)


@pytest.mark.parametrize("index", range(len(PER_AXIS)),
                         ids=[c.id for c in PER_AXIS])
def test_per_axis_blocks_match_references(index):
    assert_case_matches(PER_AXIS[index], _per_axis_run()[index])


# Axes a variable lacks are skipped; a variable left with none is one block;
# negative axes count from the back (the AdaShift docstring).
# spatial_axes -> per rank 0..4 with SHAPES' shapes: (the axes the reference
# reduces, the shape of the variable's blocks).
_LOWER_RANKS = {
    (0, 1, 2): [(None, ()), ((0,), (1,)), ((0, 1), (1, 1)),
                ((0, 1, 2), (1, 1, 1)), ((0, 1, 2), (1, 1, 1, 3))],
    0: [(None, ()), ((0,), (1,)), ((0,), (1, 3)), ((0,), (1, 2, 3)),
        ((0,), (1, 2, 2, 3))],
    -1: [(None, ()), ((0,), (1,)), ((1,), (4, 1)), ((2,), (2, 2, 1)),
         ((3,), (2, 2, 2, 1))],
    (2, 3): [(None, ()), (None, (1,)), (None, (1, 1)), ((2,), (2, 2, 1)),
             ((2, 3), (2, 2, 1, 1))],
    (1, -1): [(None, ()), ((0,), (1,)), ((1,), (4, 1)),
              ((1, 2), (2, 1, 1)), ((1, 3), (2, 1, 2, 1))],
    (-3,): [(None, ()), (None, (1,)), (None, (1, 1)), ((0,), (1, 2, 3)),
            ((1,), (2, 1, 2, 3))],
}
LOWER_RANKS = [
    Case(f"spatial_op={op!r} spatial_axes={spatial_axes}",
         config(2, 0.5, 0.9, 1e-10, op, spatial_axes),
         [SHAPES[r] for r in sorted(SHAPES)], [a for a, _ in per_rank],
         steps=12, id=f"{op}-axes{_axes_id(spatial_axes)}")
    for op, (spatial_axes, per_rank) in zip(
        ("max", "mean") * 3, _LOWER_RANKS.items())
]


@functools.cache
def _lower_ranks_run():
    """The trajectories, and per case the shape of its velocity."""
    opts = []
    results = run_keras(LOWER_RANKS, opts_out=opts)
    velocity_shapes = [
        [tuple(v.shape) for v in opt.variables
         if v.path == f"{opt.name}/velocity"]
        for opt, _ in opts
    ]
    return results, velocity_shapes


@pytest.mark.parametrize("index", range(len(LOWER_RANKS)),
                         ids=[c.id for c in LOWER_RANKS])
def test_spatial_axes_for_lower_ranks(index):
    results, velocity_shapes = _lower_ranks_run()
    per_rank = list(_LOWER_RANKS.values())[index]
    # One velocity per block, all variables' blocks in one vector.
    assert velocity_shapes[index] == [
        (sum(int(np.prod(s)) for _, s in per_rank),)]
    assert_case_matches(LOWER_RANKS[index], results[index], oracle=False)


def _history(grads, theta0, opt):
    variable = keras.Variable(theta0, dtype=FLOAT)
    out = []
    for g in grads:
        opt.apply_gradients([(ops.convert_to_tensor(g, FLOAT), variable)])
        out.append(np.asarray(ops.convert_to_numpy(variable)))
    return np.stack(out)


def test_non_finite_gradients_propagate_like_adam():
    """NaN/inf gradients are not filtered (the AdaShift docstring)."""
    rng = np.random.default_rng(5)
    theta0 = round_to(rng.normal(size=(4, 3)), FLOAT)

    # NaN after warm-up, spatial_op "max".
    keep_num, bad = 2, 4
    grads = rng.normal(size=(9, 4, 3))
    grads[bad - 1, 0, 0] = np.nan
    history = _history(grads, theta0, AdaShift(LR, keep_num=keep_num))
    adam = _history(grads, theta0, keras.optimizers.Adam(LR))
    assert np.all(np.isfinite(history[:bad - 1]))
    # Through m the NaN element goes NaN at once and stays NaN: the
    # incremental m never sheds it, even after the window moves on.
    assert np.all(np.isnan(history[bad - 1:, 0, 0]))
    assert np.all(np.isnan(adam[bad - 1:, 0, 0]))
    # Through v = max over the block, the whole variable goes NaN once the
    # NaN gradient is shifted out of the window, not before.
    assert np.all(np.isfinite(history[bad - 1:bad + keep_num - 1, 1:]))
    assert np.all(np.isnan(history[bad + keep_num - 1:]))

    # inf with element-wise v: only that element leaves the finite range.
    grads = rng.normal(size=(6, 4, 3))
    grads[3, 1, 2] = np.inf
    history = _history(grads, theta0,
                       AdaShift(LR, keep_num=2, spatial_op="none"))
    assert np.all(np.isfinite(history[:3]))
    assert not np.any(np.isfinite(history[3:, 1, 2]))
    history[:, 1, 2] = 0.0
    assert np.all(np.isfinite(history))

    # NaN during warm-up: the other elements still wait for the window.
    # Whether the NaN element shows before step keep_num + 1 is not
    # specified by the docstring (the warm-up mask is a zero rate, and
    # 0 * NaN is NaN), so it is not asserted.
    keep_num = 3
    grads = rng.normal(size=(keep_num + 1, 4, 3))
    grads[0, 0, 0] = np.nan
    history = _history(grads, theta0, AdaShift(LR, keep_num=keep_num))
    for t in range(keep_num):
        assert np.array_equal(history[t].ravel()[1:], theta0.ravel()[1:]), (
            f"finite elements moved at warm-up step {t + 1}")
    assert np.all(np.isnan(history[keep_num]))
