"""Whole trajectories of AdaShift against tests/reference.py.

A `Case` is one optimizer, its variables and the gradients it will see;
`run_keras` steps many cases through one traced step on a given execution
path; `assert_case_matches` compares one case with the float64 NumPy
reference and with `pytorch_optimizer.AdaShift`. Whole trajectories are
compared (the parameters after every step), because a wrong window slot or
bias correction can cancel out by the last step.

Use the `floatx_like_the_variables` fixture with FLOAT cases. JAX runs with
float64 disabled, so there the variables are float32 and the tolerances
are float32 ones.
"""

import dataclasses
import zlib

import keras
import numpy as np
import pytest
from keras import ops

from conftest import BACKEND
from conftest import FLOAT
from keras_adashift import AdaShift
from closeness import assert_trajectory_close  # noqa: F401 (re-exported)
from reference import adashift_trajectory

# Trajectory errors are measured against the largest |θ| seen so far (see
# `assert_trajectory_close`). float64 runs agree to ~1e-15 of that; float32
# ones lose up to ~1e-6 per step when a gradient 10^6 times larger than the
# current ones leaves the incremental sum for m, and errors add up over 100
# steps.
RTOL = {"float64": 1e-11, "float32": 2e-5}

# A power of two: exact in every float dtype, so the learning_rate variable
# (created in floatx, float32) gives float64 runs the same lr as the
# float64 reference.
LR = 2.0**-6

# The float dtypes a variable can have on this backend.
DTYPES = ["float16", "bfloat16", "float32"] + (
    [] if BACKEND == "jax" else ["float64"])  # JAX: float64 disabled

SHAPES = {0: (), 1: (3,), 2: (4, 3), 3: (2, 2, 3), 4: (2, 2, 2, 3)}
SPATIAL_OPS = ("max", "mean", "none")

# The fastest path of each backend carries the big sweeps; the other paths
# are shown to agree with it in tests/test_execution_paths.py.
FAST_PATH = {"tensorflow": "graph", "jax": "jit", "torch": "eager"}


def np_dtype(dtype):
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def round_to(x, dtype):
    """The float64 values of `x` once stored in `dtype`."""
    return np.asarray(x).astype(np_dtype(dtype)).astype(np.float64)


def config(keep_num, beta_1, beta_2=0.999, epsilon=1e-10, spatial_op="max",
           spatial_axes=None, **extra):
    return dict(keep_num=keep_num, beta_1=beta_1, beta_2=beta_2,
                epsilon=epsilon, spatial_op=spatial_op,
                spatial_axes=spatial_axes, **extra)


@dataclasses.dataclass
class Case:
    """One optimizer, its variables, and the gradients it will see.

    `axes` holds, per variable, the axes the reference should reduce,
    written by hand (None: the whole variable is one block). `id` names the
    case as a pytest id (no spaces, no "=", so that `-k` takes it).
    """

    label: str
    kwargs: dict
    shapes: list
    axes: list
    steps: int
    dtype: str = FLOAT
    lr: float = LR
    decades: float = 3.0
    id: str = None

    def __post_init__(self):
        rng = np.random.default_rng(zlib.crc32(self.label.encode()))
        self.thetas = [round_to(rng.normal(size=s), self.dtype)
                       for s in self.shapes]
        self.grads = []
        for s in self.shapes:
            scale = 10.0 ** rng.uniform(-self.decades, self.decades,
                                        size=(self.steps,) + (1,) * len(s))
            g = rng.normal(size=(self.steps,) + s) * scale
            self.grads.append(round_to(g, self.dtype))

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
            keras.Variable(t.astype(np_dtype(c.dtype)), dtype=c.dtype,
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
            [ops.convert_to_tensor(g[t].astype(np_dtype(c.dtype)),
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


def assert_case_matches(case, per_var, oracle=True):
    """One case's trajectories against reference.py and, with `oracle`,
    pytorch_optimizer."""
    rtol = RTOL[case.dtype]
    for i, actual in enumerate(per_var):
        assert_trajectory_close(actual, reference(case, i), case.thetas[i],
                                rtol, case.what(i) + " vs reference.py")
        if oracle:
            assert_trajectory_close(actual, torch_oracle(case, i),
                                    case.thetas[i], rtol,
                                    case.what(i) + " vs pytorch_optimizer")


def path_cases():
    """A few configurations run on every execution path of a backend."""
    # 90 steps: the 40-gradient window wraps twice after warm-up.
    return [
        Case(f"keep_num={k} spatial_op={op!r} spatial_axes={sa}",
             config(k, 0.9, 0.99, 1e-10, op, sa), [(4, 3)],
             [(0,) if sa == 0 else None], steps=90,
             id=f"keep{k}-{op}-axes{sa}")
        for k, op, sa in ((1, "max", None), (2, "mean", 0),
                          (10, "none", None), (40, "max", 0))
    ]


def sweep(keep_nums, steps):
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
                              [None] * len(ranks), steps,
                              id=f"keep{k}-b1_{b1}-b2_{b2}-eps{eps}-{op}"))
    return cases
