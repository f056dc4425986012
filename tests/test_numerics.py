"""AdaShift's numbers against implementations it does not share code with.

Expected values come from `tests/reference.py` (explicit windowed sums in
float64 NumPy), from `pytorch_optimizer.AdaShift` (an outside
implementation), or from formulas written out in the test itself; never from
the optimizer under test. Whole trajectories are compared (the parameters
after every step), because a wrong window slot or bias correction can cancel
out by the last step.

JAX runs with float64 disabled, so there the variables are float32 and the
tolerances are float32 ones.
"""

import dataclasses
import zlib

import keras
import numpy as np
import pytest
from keras import ops

from conftest import BACKEND
from conftest import only_on
from keras_adashift import AdaShift
from reference import adashift_trajectory

FLOAT = "float32" if BACKEND == "jax" else "float64"

# Trajectory errors are measured against the largest |θ| seen so far (see
# `_compare`). float64 runs agree to ~1e-15 of that; float32 ones lose up to
# ~1e-6 per step when a gradient 10^6 times larger than the current ones
# leaves the incremental sum for m, and errors add up over 100 steps.
RTOL = {"float64": 1e-11, "float32": 2e-5}

# A power of two: exact in every float dtype, so the learning_rate variable
# (created in floatx, float32) gives float64 runs the same lr as the
# float64 reference.
LR = 2.0**-6

SHAPES = {0: (), 1: (3,), 2: (4, 3), 3: (2, 2, 3), 4: (2, 2, 2, 3)}
SPATIAL_OPS = ("max", "mean", "none")

# The fastest path of each backend carries the big sweeps; the other paths
# are shown to agree with it in the execution-path tests.
FAST_PATH = {"tensorflow": "graph", "jax": "jit", "torch": "eager"}


@pytest.fixture(autouse=True)
def _floatx_like_the_variables():
    # Keras's torch backend turns Python floats into floatx tensors, so
    # float64 runs need floatx float64 for the optimizer's constants (β1, β2,
    # 1/W) to keep float64 precision. What happens under the default floatx
    # has a test of its own.
    previous = keras.config.floatx()
    keras.config.set_floatx(FLOAT)
    yield
    keras.config.set_floatx(previous)


def _np_dtype(dtype):
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def _round(x, dtype):
    """The float64 values of `x` once stored in `dtype`."""
    return np.asarray(x).astype(_np_dtype(dtype)).astype(np.float64)


def config(keep_num, beta_1, beta_2=0.999, epsilon=1e-10, spatial_op="max",
           spatial_axes=None, **extra):
    return dict(keep_num=keep_num, beta_1=beta_1, beta_2=beta_2,
                epsilon=epsilon, spatial_op=spatial_op,
                spatial_axes=spatial_axes, **extra)


@dataclasses.dataclass
class Case:
    """One optimizer, its variables, and the gradients it will see.

    `axes` holds, per variable, the axes the reference should reduce,
    written by hand (None: the whole variable is one block).
    """

    label: str
    kwargs: dict
    shapes: list
    axes: list
    steps: int
    dtype: str = FLOAT
    lr: float = LR
    decades: float = 3.0

    def __post_init__(self):
        rng = np.random.default_rng(zlib.crc32(self.label.encode()))
        self.thetas = [_round(rng.normal(size=s), self.dtype)
                       for s in self.shapes]
        self.grads = []
        for s in self.shapes:
            scale = 10.0 ** rng.uniform(-self.decades, self.decades,
                                        size=(self.steps,) + (1,) * len(s))
            g = rng.normal(size=(self.steps,) + s) * scale
            self.grads.append(_round(g, self.dtype))

    def what(self, i):
        shape = self.shapes[i]
        return (f"[{self.label}] variable {i} rank {len(shape)} "
                f"shape {shape} blocks over axes {self.axes[i]}")


def run_keras(cases, path=None, opts_out=None):
    """Per case, per variable: the parameters after each step, (steps, *shape).

    All cases share one traced/compiled step on the graph, XLA and jit
    paths, so tracing is paid once per run rather than once per config.
    """
    path = path or FAST_PATH[BACKEND]
    steps = cases[0].steps
    assert all(c.steps == steps for c in cases)
    opts, var_lists = [], []
    for ci, c in enumerate(cases):
        variables = [
            keras.Variable(t.astype(_np_dtype(c.dtype)), dtype=c.dtype,
                           name=f"c{ci}_v{i}")
            for i, t in enumerate(c.thetas)
        ]
        opt = AdaShift(learning_rate=c.lr, **c.kwargs)
        opt.build(variables)
        opts.append(opt)
        var_lists.append(variables)
    if opts_out is not None:
        opts_out.extend(zip(opts, var_lists))
    grads = [
        [
            [ops.convert_to_tensor(g[t].astype(_np_dtype(c.dtype)),
                                   dtype=c.dtype) for g in c.grads]
            for c in cases
        ]
        for t in range(steps)
    ]
    out = [[np.empty((steps,) + s) for s in c.shapes] for c in cases]

    def record(t, values):
        for ci, vals in enumerate(values):
            for i, v in enumerate(vals):
                out[ci][i][t] = np.asarray(ops.convert_to_numpy(v),
                                           dtype=np.float64)

    if path == "eager":
        for t in range(steps):
            for opt, variables, g in zip(opts, var_lists, grads[t]):
                opt.apply_gradients(zip(g, variables))
            record(t, var_lists)
    elif path in ("graph", "xla"):
        import tensorflow as tf

        @tf.function(jit_compile=path == "xla")
        def step(gs):
            for opt, variables, g in zip(opts, var_lists, gs):
                opt.apply_gradients(zip(g, variables))

        for t in range(steps):
            step(grads[t])
            record(t, var_lists)
    elif path == "jit":
        import jax

        @jax.jit
        def step(train, state, gs):
            new_train, new_state = [], []
            for opt, tv, sv, g in zip(opts, train, state, gs):
                a, b = opt.stateless_apply(sv, g, tv)
                new_train.append(a)
                new_state.append(b)
            return new_train, new_state

        train = [[v.value for v in vs] for vs in var_lists]
        state = [[v.value for v in opt.variables] for opt in opts]
        for t in range(steps):
            train, state = step(train, state, grads[t])
            record(t, train)
    else:
        raise ValueError(path)
    return out


def reference(case, i):
    kw = case.kwargs
    return np.stack(adashift_trajectory(
        case.thetas[i], list(case.grads[i]), learning_rate=case.lr,
        keep_num=kw["keep_num"], beta_1=kw["beta_1"], beta_2=kw["beta_2"],
        epsilon=kw["epsilon"], spatial_op=kw["spatial_op"],
        axes=case.axes[i]))


def torch_oracle(case, i):
    """pytorch_optimizer.AdaShift on the same variable and gradients."""
    torch = pytest.importorskip("torch")
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    kw = case.kwargs
    op, axes = kw["spatial_op"], case.axes[i]
    if op == "none":
        reduce_func = None
    elif axes is None:
        reduce_func = torch.max if op == "max" else torch.mean
    elif op == "max":
        def reduce_func(x):
            return torch.amax(x, dim=axes, keepdim=True)
    else:
        def reduce_func(x):
            return torch.mean(x, dim=axes, keepdim=True)
    param = torch.nn.Parameter(torch.tensor(case.thetas[i],
                                            dtype=torch.float64))
    opt = pytorch_optimizer.AdaShift(
        [param], lr=case.lr, betas=(kw["beta_1"], kw["beta_2"]),
        keep_num=kw["keep_num"], reduce_func=reduce_func, eps=kw["epsilon"])
    out = []
    for g in case.grads[i]:
        param.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        out.append(param.detach().numpy().copy())
    return np.stack(out)


def _compare(actual, expected, theta0, rtol, what, failures):
    """Records a failure unless every step is within rtol of the largest |θ|
    seen so far (a NaN anywhere also fails)."""
    steps = len(expected)
    a = np.asarray(actual).reshape(steps, -1)
    e = np.asarray(expected).reshape(steps, -1)
    scale = np.maximum.accumulate(np.abs(e).max(axis=1))
    scale = np.maximum(scale, max(np.abs(theta0).max(), 1e-3))
    err = np.abs(a - e).max(axis=1)
    bad = np.flatnonzero(~(err <= rtol * scale))
    if bad.size:
        t = bad[0]
        failures.append(
            f"{what}: {bad.size} of {steps} steps off, first at step {t + 1}:"
            f" max |error| {err[t]:.3g} > {rtol:g} * {scale[t]:.3g}"
            f"\n  got      {a[t][:6]}\n  expected {e[t][:6]}")


def _check_cases(cases, results, oracle=True):
    failures = []
    for case, per_var in zip(cases, results):
        rtol = RTOL[case.dtype]
        for i, actual in enumerate(per_var):
            _compare(actual, reference(case, i), case.thetas[i], rtol,
                     case.what(i) + " vs reference.py", failures)
            if oracle:
                _compare(actual, torch_oracle(case, i), case.thetas[i], rtol,
                         case.what(i) + " vs pytorch_optimizer", failures)
    assert not failures, "\n".join(failures)


def _sweep(keep_nums, steps):
    """A Latin square: every (keep_num, beta_1), (keep_num, spatial_op) and
    (beta_1, spatial_op) pair occurs."""
    cases = []
    for i, k in enumerate((1, 2, 3, 10, 40)):
        for j, b1 in enumerate((0.0, 0.5, 0.9)):
            if k not in keep_nums:
                continue
            op = SPATIAL_OPS[(i + j) % 3]
            b2 = (0.999, 0.9)[(i + j) % 2]
            # ε comparable to sqrt(v) of the small gradients shows that it
            # is added outside the square root.
            eps = (1e-10, 1e-3)[j % 2]
            kw = config(k, b1, b2, eps, op)
            label = (f"keep_num={k} beta_1={b1} beta_2={b2} epsilon={eps}"
                     f" spatial_op={op!r}")
            # Three ranks per config (tracing cost grows with the number of
            # variables); over the square every rank meets every spatial_op.
            ranks = [(i + j + d) % 5 for d in (0, 1, 3)]
            cases.append(Case(label, kw, [SHAPES[r] for r in ranks],
                              [None] * len(ranks), steps))
    return cases


def test_trajectories_match_references():
    # 50 steps wrap even the 10-gradient window four times. The 40-gradient
    # one first shifts a gradient out at step 41; 100 steps wrap it twice
    # more.
    for keep_nums, steps in (((1, 2, 3, 10), 50), ((40,), 100)):
        cases = _sweep(keep_nums, steps)
        _check_cases(cases, run_keras(cases))


def test_per_axis_blocks_match_references():
    dense_kernel, bias, conv_kernel, rank3 = (4, 3), (3,), (2, 2, 2, 3), \
        (2, 2, 3)
    # (spatial_op, spatial_axes, keep_num, beta_1,
    #  [(shape, the axes one block spans, by hand)])
    table = [
        ("max", 0, 3, 0.9, [(dense_kernel, (0,)), (bias, (0,))]),
        ("mean", 0, 2, 0.5, [(dense_kernel, (0,)), (bias, (0,))]),
        ("max", (0, 1, 2), 10, 0.9, [(conv_kernel, (0, 1, 2)),
                                     (bias, (0,))]),
        ("mean", (0, 1, 2), 1, 0.0, [(conv_kernel, (0, 1, 2)),
                                     (dense_kernel, (0, 1))]),
        ("max", -1, 3, 0.5, [(dense_kernel, (1,)), (rank3, (2,))]),
        ("mean", (-2, -1), 2, 0.9, [(conv_kernel, (2, 3)),
                                    (dense_kernel, (0, 1))]),
        ("max", (0, -1), 2, 0.0, [(rank3, (0, 2)), (conv_kernel, (0, 3))]),
    ]
    cases = [
        Case(f"spatial_op={op!r} spatial_axes={sa} keep_num={k} beta_1={b1}",
             config(k, b1, 0.9, 1e-10, op, sa), [s for s, _ in var_axes],
             [a for _, a in var_axes], steps=40)
        for op, sa, k, b1, var_axes in table
    ]
    _check_cases(cases, run_keras(cases))


def test_spatial_axes_for_lower_ranks():
    """Axes a variable lacks are skipped; a variable left with none is one
    block; negative axes count from the back (the AdaShift docstring)."""
    ranks = sorted(SHAPES)
    # spatial_axes -> per rank 0..4 with SHAPES' shapes: (the axes the
    # reference reduces, the shape of the variable's blocks).
    table = {
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
    cases = []
    for n, (spatial_axes, per_rank) in enumerate(table.items()):
        op = ("max", "mean")[n % 2]
        cases.append(Case(
            f"spatial_op={op!r} spatial_axes={spatial_axes}",
            config(2, 0.5, 0.9, 1e-10, op, spatial_axes),
            [SHAPES[r] for r in ranks], [a for a, _ in per_rank], steps=12))
    opts = []
    results = run_keras(cases, opts_out=opts)
    shape_failures = []
    for case, (opt, variables), per_rank in zip(cases, opts,
                                                table.values()):
        # One velocity per block, all variables' blocks in one vector.
        [got] = [tuple(v.shape) for v in opt.variables
                 if v.path == f"{opt.name}/velocity"]
        expected = (sum(int(np.prod(s)) for _, s in per_rank),)
        if got != expected:
            shape_failures.append(
                f"[{case.label}]: velocity shape {got}, expected {expected}")
    assert not shape_failures, "\n".join(shape_failures)
    _check_cases(cases, results, oracle=False)


def test_warm_up_then_first_update():
    # (keep_num, beta_1, spatial_op, spatial_axes, epsilon). Gradients near
    # 1e-3 make an epsilon of 1e-3 matter: inside the square root it fails.
    configs = [
        (1, 0.0, "max", None, 1e-10),
        (3, 0.9, "mean", 0, 1e-3),
        (5, 0.5, "none", None, 1e-10),
    ]
    # Against |θ|: in float32, θ0 - update rounds at ~6e-8 * |θ|.
    tol = 1e-13 if FLOAT == "float64" else 1e-6
    for keep_num, beta_1, spatial_op, spatial_axes, epsilon in configs:
        label = (f"keep_num={keep_num} beta_1={beta_1} spatial_op="
                 f"{spatial_op!r} spatial_axes={spatial_axes} "
                 f"epsilon={epsilon}")
        rng = np.random.default_rng(keep_num)
        theta0 = _round(rng.normal(size=(4, 3)), FLOAT)
        grads = _round(rng.normal(size=(keep_num + 1, 4, 3)) * 1e-3, FLOAT)
        variable = keras.Variable(theta0, dtype=FLOAT)
        opt = AdaShift(learning_rate=LR, keep_num=keep_num, beta_1=beta_1,
                       epsilon=epsilon, spatial_op=spatial_op,
                       spatial_axes=spatial_axes)
        initial = ops.convert_to_numpy(variable).copy()
        for t in range(keep_num):
            opt.apply_gradients([(ops.convert_to_tensor(grads[t], FLOAT),
                                  variable)])
            assert np.array_equal(ops.convert_to_numpy(variable), initial), (
                f"[{label}] parameters moved during warm-up step {t + 1}")
        opt.apply_gradients([(ops.convert_to_tensor(grads[keep_num], FLOAT),
                              variable)])
        theta1 = np.asarray(ops.convert_to_numpy(variable), np.float64)
        assert np.all(theta1 != initial), (
            f"[{label}] step {keep_num + 1} left parameters unchanged")

        weights = beta_1 ** np.arange(keep_num)  # g_{n+1}, g_n, ..., g_2
        m = sum(w * grads[keep_num - i] for i, w in enumerate(weights))
        m = m / weights.sum()
        g1_squared = grads[0] ** 2
        if spatial_op == "max":
            phi = np.max(g1_squared, axis=spatial_axes, keepdims=True)
        elif spatial_op == "mean":
            phi = np.mean(g1_squared, axis=spatial_axes, keepdims=True)
        else:
            phi = g1_squared
        # At step n+1, v̂ = (1-β2) φ(g_1²) / (1-β2) = φ(g_1²).
        expected = theta0 - LR * m / (np.sqrt(phi) + epsilon)
        np.testing.assert_allclose(theta1, expected, rtol=0,
                                   atol=tol * np.abs(theta0).max(),
                                   err_msg=f"[{label}] first update")


def _path_cases():
    # 90 steps: the 40-gradient window wraps twice after warm-up.
    return [
        Case(f"keep_num={k} spatial_op={op!r} spatial_axes={sa}",
             config(k, 0.9, 0.99, 1e-10, op, sa), [(4, 3)],
             [(0,) if sa == 0 else None], steps=90)
        for k, op, sa in ((1, "max", None), (2, "mean", 0),
                          (10, "none", None), (40, "max", 0))
    ]


def _assert_same_trajectories(first, second, rtol, names):
    failures = []
    for case, a, b in zip(_path_cases(), first, second):
        for i in range(len(a)):
            _compare(a[i], b[i], case.thetas[i], rtol,
                     f"{case.what(i)}: {names}", failures)
    assert not failures, "\n".join(failures)


@only_on("tensorflow")
def test_tensorflow_eager_graph_and_xla_agree():
    cases = _path_cases()
    eager = run_keras(cases, "eager")
    _check_cases(cases, eager, oracle=False)
    graph = run_keras(cases, "graph")
    xla = run_keras(cases, "xla")
    # Eager and graph run the same kernels; XLA may fuse and reorder.
    _assert_same_trajectories(graph, eager, 1e-15, "graph vs eager")
    _assert_same_trajectories(xla, eager, 1e-12, "XLA vs eager")


@only_on("jax")
def test_jax_stateless_jit_equals_stateful():
    cases = _path_cases()
    stateful = run_keras(cases, "eager")
    _check_cases(cases, stateful, oracle=False)
    jitted = run_keras(cases, "jit")
    _assert_same_trajectories(jitted, stateful, 1e-6,
                              "stateless_apply under jax.jit vs stateful")


@only_on("torch")
def test_torch_eager_matches_reference():
    cases = _path_cases()
    _check_cases(cases, run_keras(cases, "eager"), oracle=False)


def _generic_all_at_once(self, grads, variables, learning_rate):
    self._update(grads, variables, learning_rate)


def _generic_per_variable(self, grads, variables, learning_rate):
    # The blocks of the other variables are then masked: the path of a
    # variable without a gradient.
    for gradient, variable in zip(grads, variables):
        self.update_step(gradient, variable, learning_rate)


@only_on("torch")
@pytest.mark.parametrize("generic", [_generic_all_at_once,
                                     _generic_per_variable],
                         ids=["all_at_once", "per_variable"])
def test_torch_kernels_equal_the_generic_update(monkeypatch, generic):
    """torch_step is the torch transcription of `AdaShift._update`: pinned
    to it directly at float64, so a change to one that misses the other
    fails here even where both stay near the reference."""
    steps = 50
    cases = _sweep((1, 2, 3, 10), steps) + _path_cases()
    for case in cases:
        case.steps = steps
        case.grads = [g[:steps] for g in case.grads]
        # Some exactly zero first gradients exercise the hold.
        for g in case.grads:
            g[:2] = 0
    kernels = run_keras(cases, "eager")
    monkeypatch.setattr(AdaShift, "_backend_update_step", generic)
    failures = []
    for case, a, b in zip(cases, kernels, run_keras(cases, "eager")):
        for i in range(len(a)):
            assert np.any(a[i][-1] != case.thetas[i]), case.what(i)
            _compare(a[i], b[i], case.thetas[i], 1e-13,
                     f"{case.what(i)}: torch_step vs generic", failures)
    assert not failures, "\n".join(failures)


DTYPES = ["float16", "bfloat16", "float32"] + (
    [] if BACKEND == "jax" else ["float64"])  # JAX: float64 disabled


def _slot_dtypes(opt, name):
    """The dtypes of the variable's window and momentum and of the blocks'
    window of φ(g²) and velocity."""
    slots = {f"{name}_window": "window", f"{name}_momentum": "momentum",
             "square_window": "square_window", "velocity": "velocity"}
    return {slots[v.name]: keras.backend.standardize_dtype(v.dtype)
            for v in opt.variables if v.name in slots}


def test_slot_dtypes():
    failures = []
    for dtype in DTYPES:
        # 16-bit variables: m and v accumulate, so they are float32.
        state = "float32" if dtype in ("float16", "bfloat16") else dtype
        for window_dtype in (None, "bfloat16"):
            variable = keras.Variable(np.zeros((2, 3)), dtype=dtype,
                                      name="w")
            opt = AdaShift(keep_num=3, window_dtype=window_dtype)
            opt.build([variable])
            window = window_dtype or dtype
            # φ(g²) is taken before the gradient is stored: state dtype.
            expected = {"window": window, "square_window": state,
                        "momentum": state, "velocity": state}
            got = _slot_dtypes(opt, "w")
            if got != expected:
                failures.append(f"{dtype} variable, window_dtype="
                                f"{window_dtype}: {got} != {expected}")
    assert not failures, "\n".join(failures)


SIXTEEN_BIT_EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7}


def test_variable_dtypes_track_the_float64_reference():
    failures = []
    for dtype in DTYPES:
        # Gradients within 10^±1 stay well inside float16's range; lr 2^-4
        # makes each step large against θ's rounding, so the 16-bit checks
        # below constrain the update.
        case = Case(f"{dtype} keep_num=3 beta_1=0.9", config(3, 0.9, 0.99),
                    [(4, 3)], [None], steps=30, dtype=dtype, lr=2.0**-4,
                    decades=1.0)
        [[actual]] = run_keras([case], "eager")
        expected = reference(case, 0)
        if dtype not in SIXTEEN_BIT_EPS:
            _compare(actual, expected, case.thetas[0], RTOL[dtype],
                     case.label, failures)
            continue
        eps = SIXTEEN_BIT_EPS[dtype]
        previous = np.concatenate([case.thetas[0][None], actual[:-1]])
        previous_ref = np.concatenate([case.thetas[0][None], expected[:-1]])
        update = previous_ref - expected  # exact; θ does not feed it
        # Each step Keras rounds the float32 update to `dtype`, then the new
        # θ: half a unit in the last place each, so within
        # eps * (|update| + |θ|) with a factor 2 of slack.
        step_error = np.abs(actual - (previous - update))
        step_bound = eps * (np.abs(update) + np.abs(actual))
        if not np.all(step_error <= step_bound):
            t = np.argmax(np.max(step_error - step_bound, axis=(1, 2)))
            failures.append(
                f"{case.label}: step {t + 1} is off by "
                f"{step_error[t].max():.3g} (bound {step_bound[t].min():.3g})")
        # Those roundings add up, and no more than that.
        drift = np.abs(actual - expected)
        bound = np.cumsum(eps * (np.abs(update) + np.abs(expected)), axis=0)
        if not np.all(drift <= 2 * bound):
            failures.append(f"{case.label}: drift {np.max(drift / bound):.3g}"
                            " times the rounding bound")
    assert not failures, "\n".join(failures)


def test_bfloat16_window_stays_close_to_float32_window():
    def case(window_dtype):
        kw = config(3, 0.9, 0.99, window_dtype=window_dtype)
        return Case("float32 keep_num=3 beta_1=0.9", kw, [(4, 3)], [None],
                    steps=40, dtype="float32", decades=1.0)

    exact, narrow = case(None), case("bfloat16")
    [[a]], [[b]] = run_keras([exact], "eager"), run_keras([narrow], "eager")
    # A bfloat16 window rounds each stored gradient to 8 significant bits
    # (relative error <= 2^-9): v̂ is off by <= 2^-8 relative and sqrt(v̂) by
    # <= 2^-9, and m keeps a residual of the rounding of each gradient that
    # left it, decaying by beta_1 per step. Measured: the parameter
    # movement differs by < 0.15% of its largest value (also for keep_num
    # 1 to 40 and gradients spread over 10^±3); 1% allowed.
    movement_a = a - exact.thetas[0]
    movement_b = b - narrow.thetas[0]
    scale = np.abs(movement_a).max()
    assert np.abs(movement_b - movement_a).max() <= 1e-2 * scale
    failures = []
    _compare(a, reference(exact, 0), exact.thetas[0], RTOL["float32"],
             "float32 window vs reference", failures)
    assert not failures, failures


def _sparse_case(steps=8):
    rng = np.random.default_rng(7)
    theta0 = rng.normal(size=(5, 3))
    indices = [rng.integers(0, 5, size=6) for _ in range(steps)]
    values = [rng.normal(size=(6, 3)) * 10 ** rng.uniform(-2, 2)
              for _ in range(steps)]
    dense = []
    for idx, val in zip(indices, values):
        d = np.zeros((5, 3))
        np.add.at(d, idx, val)  # a repeated row counts once per occurrence
        dense.append(d)
    return theta0, indices, values, dense


@only_on("tensorflow")
def test_indexed_slices_with_repeated_indices_equal_dense_sum():
    import tensorflow as tf

    theta0, indices, values, dense = _sparse_case()
    assert any(len(set(i)) < len(i) for i in indices)
    kwargs = dict(learning_rate=LR, keep_num=2, beta_1=0.5, beta_2=0.9,
                  spatial_axes=-1)
    sparse_var = keras.Variable(theta0, dtype="float64")
    dense_var = keras.Variable(theta0, dtype="float64")
    sparse_opt, dense_opt = AdaShift(**kwargs), AdaShift(**kwargs)
    got_sparse, got_dense = [], []
    for idx, val, d in zip(indices, values, dense):
        slices = tf.IndexedSlices(tf.constant(val), tf.constant(idx),
                                  dense_shape=tf.constant([5, 3]))
        sparse_opt.apply_gradients([(slices, sparse_var)])
        dense_opt.apply_gradients([(tf.constant(d), dense_var)])
        got_sparse.append(sparse_var.numpy())
        got_dense.append(dense_var.numpy())
    expected = np.stack(adashift_trajectory(
        theta0, dense, learning_rate=LR, keep_num=2, beta_1=0.5, beta_2=0.9,
        axes=(1,)))
    failures = []
    _compare(np.stack(got_sparse), np.stack(got_dense), theta0, 1e-14,
             "IndexedSlices vs dense", failures)
    _compare(np.stack(got_dense), expected, theta0, RTOL["float64"],
             "dense vs reference", failures)
    assert not failures, "\n".join(failures)


@only_on("tensorflow")
def test_embedding_sparse_gradients_match_densified_training():
    import tensorflow as tf

    rng = np.random.default_rng(3)
    x = rng.integers(0, 7, size=(8, 4)).astype("int32")
    y = rng.normal(size=(8, 1))

    def model():
        inputs = keras.Input(shape=(4,), dtype="int32")
        h = keras.layers.Embedding(7, 3, dtype="float64")(inputs)
        h = keras.layers.Flatten(dtype="float64")(h)
        outputs = keras.layers.Dense(1, dtype="float64")(h)
        return keras.Model(inputs, outputs)

    def optimizer():
        return AdaShift(learning_rate=2.0**-4, keep_num=2, beta_1=0.5,
                        spatial_axes=-1)

    fitted, sparse, densified = model(), model(), model()
    initial = fitted.get_weights()
    for m in (sparse, densified):
        m.set_weights(initial)
    loss_fn = keras.losses.MeanSquaredError()

    def tape_step(m, opt, densify):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, m(x, training=True))
        grads = tape.gradient(loss, m.trainable_variables)
        assert isinstance(grads[0], tf.IndexedSlices)
        if densify:
            grads = [tf.convert_to_tensor(g) for g in grads]
        opt.apply_gradients(zip(grads, m.trainable_variables))

    sparse_opt, dense_opt = optimizer(), optimizer()
    steps = 6
    for _ in range(steps):
        tape_step(sparse, sparse_opt, densify=False)
        tape_step(densified, dense_opt, densify=True)
        for a, b in zip(sparse.get_weights(), densified.get_weights()):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)

    fitted.compile(optimizer=optimizer(), loss="mse")
    fitted.fit(x, y, batch_size=8, epochs=steps, shuffle=False, verbose=0)
    for a, b in zip(fitted.get_weights(), densified.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    # The embedding must have been updated, or the comparison proves little.
    assert not np.allclose(densified.get_weights()[0], initial[0])


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
    theta0 = _round(rng.normal(size=(4, 3)), FLOAT)

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


def test_loss_scale_optimizer_skips_non_finite_step():
    """A skipped step touches neither the window nor the moments: the run
    equals the reference fed the finite gradients only."""
    rng = np.random.default_rng(8)
    grads = _round(rng.normal(size=(10, 4, 3)), FLOAT)
    bad_step = 5
    theta0 = _round(rng.normal(size=(4, 3)), FLOAT)
    variable = keras.Variable(theta0, dtype=FLOAT)
    opt = keras.optimizers.LossScaleOptimizer(
        AdaShift(learning_rate=LR, keep_num=2, beta_1=0.5, beta_2=0.9),
        initial_scale=4.0)
    opt.build([variable])
    # The scale halves on the skipped step and would only grow after
    # dynamic_growth_steps (2000) finite ones. Powers of two: scaling and
    # unscaling are exact.
    scaled = [np.full_like(g, np.inf) if t == bad_step
              else g * (4.0 if t < bad_step else 2.0)
              for t, g in enumerate(grads, start=1)]
    history = []
    if BACKEND == "jax":
        # LossScaleOptimizer's stateful apply leaks tracers on JAX for any
        # inner optimizer (it runs stateful branches under lax.cond); Keras's
        # JAX trainer uses stateless_apply, so that is the path tested.
        import jax

        step = jax.jit(opt.stateless_apply)
        state = [v.value for v in opt.variables]
        train = [variable.value]
        for g in scaled:
            train, state = step(state, [ops.convert_to_tensor(g, FLOAT)],
                                train)
            history.append(np.asarray(train[0]))
    else:
        for g in scaled:
            opt.apply_gradients([(ops.convert_to_tensor(g, FLOAT),
                                  variable)])
            history.append(np.asarray(ops.convert_to_numpy(variable)))
    history = np.stack(history)
    np.testing.assert_array_equal(history[bad_step - 1],
                                  history[bad_step - 2])
    kept = np.delete(grads, bad_step - 1, axis=0)
    expected = np.stack(adashift_trajectory(
        theta0, list(kept), learning_rate=LR, keep_num=2, beta_1=0.5,
        beta_2=0.9))
    failures = []
    _compare(np.delete(history, bad_step - 1, axis=0), expected, theta0,
             RTOL[FLOAT], "LossScaleOptimizer(AdaShift) vs reference",
             failures)
    assert not failures, failures


@only_on("tensorflow", "torch")
def test_float64_variables_keep_float64_precision_under_default_floatx():
    """The documented dtypes: m and v in the variable's dtype, so a float64
    variable gets a float64 update even when floatx is float32 (the
    default). The learning rate variable is float32, so the rate is a power
    of two."""
    keras.config.set_floatx("float32")
    cases = [
        Case(f"floatx float32, float64 variables, spatial_op={op!r}",
             config(3, 0.9, 0.999, 1e-10, op), [(4, 3)], [None], steps=20,
             dtype="float64")
        for op in SPATIAL_OPS
    ]
    _check_cases(cases, run_keras(cases, "eager"), oracle=False)
