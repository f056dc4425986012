"""The online counterexamples on which Adam moves the wrong way.

Both problems have a linear loss `f_t(θ) = g_t·θ` whose gradient `g_t` is
either a rare large `C` or a frequent `-1`:

- stochastic: `g_t = C` with probability `p = (1 + δ)/(C + 1)`, else `-1`.
  `E[g] = δ > 0`, so θ should decrease without bound.
- sequential (Reddi et al., 2018): `g_t = C` when `t mod 3 = 1`, else `-1`,
  θ projected onto `[-1, 1]`; the optimum is `-1`.

Many independent chains run at once: each optimizer owns one variable of
shape `(chains,)` and every optimizer sees the same gradient sequence, so the
comparison is paired. The whole step (drawing the gradients, the optimizer
updates, the bookkeeping) is written against Keras variables and `keras.ops`;
only the loop over steps is backend specific, compiled where the backend
allows it (see `_compile_chunk`).

The net update factor `k(g_t)` (Zhou et al., 2019, Section 3) is the total
displacement that gradient `g_t` causes over all the updates it takes part in,
per unit of gradient: `θ_T - θ_0 = -Σ_t g_t·k(g_t)`. With the momentum
`m_i = Σ_t w_{i,t} g_t` and the effective step size `s_i = -Δθ_i / m_i`,
`k(g_t) = Σ_i s_i w_{i,t}`, so summing it over the steps with a large (or a
small) gradient needs only `Σ_i s_i e_i`, where `e_i` is the momentum of the
indicator of that gradient class. Adam gives the large gradient a smaller `k`
than the small one because `v_t` contains `g_t²`; AdaShift's `v_t` does not.
"""

import dataclasses
import time

import keras
import numpy as np
from keras import ops

from keras_adashift import AdaShift

PROBLEMS = ("stochastic", "sequential")


def _state_dtype():
    """float64, as θ moves by ~1e-4 per step around values of ~30. JAX has
    it only with `jax_enable_x64`; without it, float32, as in the authors'
    TF1 runs."""
    if keras.backend.backend() == "jax":
        import jax

        if not jax.config.jax_enable_x64:
            return "float32"
    return "float64"


@dataclasses.dataclass(frozen=True)
class Problem:
    name: str
    C: float = 101.0
    delta: float = 0.02

    def __post_init__(self):
        if self.name not in PROBLEMS:
            raise ValueError(
                f"problem must be one of {PROBLEMS}: {self.name!r}"
            )

    @property
    def p(self):
        """Frequency of the large gradient."""
        if self.name == "stochastic":
            return (1 + self.delta) / (self.C + 1)
        return 1 / 3

    @property
    def projected(self):
        return self.name == "sequential"

    @property
    def balance_threshold(self):
        """θ moves down iff k(C)/k(-1) exceeds this: p·C·k(C) > (1-p)·k(-1)."""
        return (1 - self.p) / (self.p * self.C)


def default_optimizers(problem, learning_rate=None):
    """The optimizers of the paper's counterexample figures, by label.

    Stochastic: lr 1e-3 and β2 0.999 for all, AdaShift with n = 1, β1 = 0.
    Sequential: β2 = 1/(1 + C²) for all, the value for which Reddi et al. prove
    that Adam with β1 = 0 ends at +1, and lr 1e-2 so that θ crosses the
    interval within the default number of steps.
    """
    if problem.name == "stochastic":
        lr = 1e-3 if learning_rate is None else learning_rate
        beta_2 = 0.999
    else:
        lr = 1e-2 if learning_rate is None else learning_rate
        beta_2 = 1 / (1 + problem.C**2)
    return {
        "Adam (β1=0)": lambda: keras.optimizers.Adam(
            lr, beta_1=0.0, beta_2=beta_2
        ),
        "Adam (β1=0.9)": lambda: keras.optimizers.Adam(
            lr, beta_1=0.9, beta_2=beta_2
        ),
        "AMSGrad": lambda: keras.optimizers.Adam(
            lr, beta_1=0.0, beta_2=beta_2, amsgrad=True
        ),
        # θ is one scalar per chain, so φ reduces a block of one element:
        # "none" is the paper's max-AdaShift here. A reducing φ would take
        # the max over all chains and couple them.
        "AdaShift (n=1, β1=0)": lambda: AdaShift(
            lr, keep_num=1, beta_1=0.0, beta_2=beta_2, spatial_op="none"
        ),
    }


@dataclasses.dataclass
class Result:
    problem: str
    chains: int
    steps: int
    seed: int
    backend: str
    seconds: float
    recorded_steps: list
    mean_theta: dict  # label -> mean over chains at each recorded step
    final_mean: dict
    final_se: dict  # standard error over chains; NaN for one chain
    k_large: dict  # net update factor of the large gradient C
    k_small: dict  # net update factor of the small gradient -1
    balance_threshold: float
    final_thetas: dict = dataclasses.field(repr=False)

    def to_json(self):
        out = dataclasses.asdict(self)
        del out["final_thetas"]
        out["k_ratio"] = {
            k: self.k_large[k] / self.k_small[k] for k in self.k_large
        }
        return _json_safe(out)

    def table(self):
        rows = [
            f"{self.problem} problem, {self.chains} chain(s) x {self.steps} "
            f"steps ({self.backend}, {self.seconds:.1f} s)",
            f"{'optimizer':<22} {'final θ (mean ± s.e.)':>24} "
            f"{'k(C)':>10} {'k(-1)':>10} {'k(C)/k(-1)':>11}",
        ]
        for label in self.final_mean:
            se = self.final_se[label]
            theta = f"{self.final_mean[label]:+.4f}" + (
                f" ± {se:.4f}" if np.isfinite(se) else ""
            )
            rows.append(
                f"{label:<22} {theta:>24} {self.k_large[label]:>10.3e} "
                f"{self.k_small[label]:>10.3e} "
                f"{self.k_large[label] / self.k_small[label]:>11.3f}"
            )
        rows.append(
            f"θ decreases iff k(C)/k(-1) > (1-p)/(p·C) = "
            f"{self.balance_threshold:.3f}"
        )
        return "\n".join(rows)


class _Momentum:
    """Tracks e_i, the optimizer's momentum of a gradient-class indicator.

    Keras Adam and AMSGrad keep the unnormalised EMA `m ← β1 m + (1-β1) g`;
    AdaShift the normalised sum of its last `keep_num` gradients. Both are
    linear in `g`, so the same filter applied to the indicators of the two
    gradient classes splits `m` into its large and small parts.
    """

    def __init__(self, optimizer, chains, dtype):
        if isinstance(optimizer, AdaShift):
            n, beta = optimizer.keep_num, optimizer.beta_1
            weights = np.array([beta**j for j in range(n)])
            self.weights = ops.convert_to_tensor(
                weights / weights.sum(), dtype
            )[:, None]
            shape = (n, chains)
        else:
            self.weights = None
            self.beta = optimizer.beta_1
            shape = (chains,)
        self.large = _zeros(shape, dtype)
        self.small = _zeros(shape, dtype)

    def update(self, is_large):
        """Feeds one step's indicator; returns (e_large, e_small)."""
        out = []
        for state, indicator in (
            (self.large, is_large),
            (self.small, 1 - is_large),
        ):
            if self.weights is None:
                state.assign(
                    self.beta * state + (1 - self.beta) * indicator
                )
                out.append(_read(state))
            else:
                window = ops.concatenate(
                    [indicator[None], _read(state)[:-1]], axis=0
                )
                state.assign(window)
                out.append(ops.sum(self.weights * window, axis=0))
        return out


class _Runner:
    """All state of a run lives in Keras variables, so one `step` serves
    every backend: TF traces it into a graph, JAX runs it in a stateless scope
    inside a compiled loop, other backends run it eagerly."""

    def __init__(self, problem, chains, optimizers, seed):
        self.problem = problem
        self.dtype = dtype = _state_dtype()
        self.labels = list(optimizers)
        self.optimizers = [make() for make in optimizers.values()]
        rng = np.random.default_rng(seed)
        # Sequential chains are deterministic given θ_0: spread the starts.
        if problem.projected:
            start = rng.uniform(-1, 1, chains)
        else:
            start = np.zeros(chains)
        self.thetas = [keras.Variable(start, dtype=dtype) for _ in self.labels]
        for optimizer, theta in zip(self.optimizers, self.thetas):
            optimizer.build([theta])
        self.momenta = [_Momentum(o, chains, dtype) for o in self.optimizers]
        self.k_large = [_zeros((chains,), dtype) for _ in self.labels]
        self.k_small = [_zeros((chains,), dtype) for _ in self.labels]
        self.n_large = _zeros((), dtype)
        self.t = keras.Variable(0, dtype="int64", trainable=False)
        self.seed = keras.random.SeedGenerator(seed)
        self.chains = chains

    @property
    def variables(self):
        own = [self.n_large, self.t, *self.thetas, *self.k_large, *self.k_small]
        for momentum in self.momenta:
            own += [momentum.large, momentum.small]
        for optimizer in self.optimizers:
            own += list(optimizer.variables)
        return own + [self.seed.state]

    def step(self):
        self.t.assign_add(1)
        if self.problem.name == "stochastic":
            u = keras.random.uniform(
                (self.chains,), dtype=self.dtype, seed=self.seed
            )
            is_large = ops.cast(u < self.problem.p, self.dtype)
        else:
            is_large = ops.cast(
                ops.equal(self.t.value % 3, 1), self.dtype
            ) * ops.ones((self.chains,), self.dtype)
        C = self.problem.C
        gradient = is_large * (C + 1) - 1
        self.n_large.assign_add(ops.sum(is_large))
        for i, optimizer in enumerate(self.optimizers):
            theta = self.thetas[i]
            before = _read(theta)
            optimizer.apply([gradient], [theta])
            after = _read(theta)
            if self.problem.projected:
                theta.assign(ops.clip(after, -1.0, 1.0))
            e_large, e_small = self.momenta[i].update(is_large)
            m = C * e_large - e_small
            safe_m = ops.where(ops.abs(m) > 1e-12, m, 1.0)
            step_size = ops.where(
                ops.abs(m) > 1e-12, (before - after) / safe_m, 0.0
            )
            self.k_large[i].assign_add(step_size * e_large)
            self.k_small[i].assign_add(step_size * e_small)


def _read(variable):
    """The value now. On TF, `variable.value` and `convert_to_tensor` give
    the variable itself, read only where used: after later assignments."""
    return ops.copy(variable.value)


def _zeros(shape, dtype):
    return keras.Variable(np.zeros(shape), dtype=dtype, trainable=False)


def _compile_chunk(runner):
    """A function running `n` steps, compiled into one loop where possible.

    TF: `optimizer.apply` inside a `tf.function` XLA while loop. JAX: the
    step under `StatelessScope` inside `lax.fori_loop`, since JAX arrays are
    immutable. Other backends: a Python loop of eager steps (slow).
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def loop(n):
            for _ in tf.range(n):
                runner.step()

        return lambda n: loop(tf.constant(n, "int32"))
    if backend == "jax":
        import jax

        variables = runner.variables

        def body(_, values):
            mapping = list(zip(variables, values))
            with keras.StatelessScope(state_mapping=mapping) as scope:
                runner.step()
            return [scope.get_current_value(v) for v in variables]

        fori_loop = jax.jit(
            lambda n, values: jax.lax.fori_loop(0, n, body, values)
        )

        def run(n):
            values = fori_loop(n, [v.value for v in variables])
            for variable, value in zip(variables, values):
                variable.assign(value)

        return run

    def run(n):
        for _ in range(n):
            runner.step()

    return run


def run(
    problem="stochastic",
    chains=2048,
    steps=50_000,
    optimizers=None,
    learning_rate=None,
    C=101.0,
    delta=0.02,
    seed=0,
    records=200,
    progress=True,
):
    """Runs the chains and returns a `Result`.

    `optimizers` maps labels to zero-argument factories (default:
    `default_optimizers`). The mean θ is recorded `records` times, at the end
    of equal chunks of steps, which are also the units of the progress bar.
    """
    if not isinstance(problem, Problem):
        problem = Problem(problem, C=C, delta=delta)
    if optimizers is None:
        optimizers = default_optimizers(problem, learning_rate)
    keras.utils.set_random_seed(seed)
    runner = _Runner(problem, chains, optimizers, seed)
    chunk_fn = _compile_chunk(runner)
    records = max(1, min(records, steps))
    bounds = np.linspace(0, steps, records + 1).round().astype(int)
    mean_theta = {label: [] for label in runner.labels}
    sums = [runner.n_large, *runner.k_large, *runner.k_small]
    totals = np.zeros(len(sums))
    # In float32, a sum over 10^7 steps would lose most digits of each term:
    # move the sums to float64 on the host after every chunk.
    flush_every_chunk = runner.dtype != "float64"
    start = time.perf_counter()
    for lo, hi in _progress(list(zip(bounds[:-1], bounds[1:])), progress,
                            f"{problem.name} counterexample"):
        chunk_fn(int(hi - lo))
        for label, theta in zip(runner.labels, runner.thetas):
            mean_theta[label].append(float(ops.mean(theta.value)))
        if flush_every_chunk:
            _flush(sums, totals)
    _flush(sums, totals)
    seconds = time.perf_counter() - start
    labels = len(runner.labels)
    n_large, k_large, k_small = (
        totals[0], totals[1:1 + labels], totals[1 + labels:]
    )

    finals = {
        label: np.asarray(ops.convert_to_numpy(theta.value))
        for label, theta in zip(runner.labels, runner.thetas)
    }
    n_small = chains * steps - n_large
    return Result(
        problem=problem.name,
        chains=chains,
        steps=steps,
        seed=seed,
        backend=keras.backend.backend(),
        seconds=seconds,
        recorded_steps=bounds[1:].tolist(),
        mean_theta=mean_theta,
        final_mean={k: float(v.mean()) for k, v in finals.items()},
        final_se={
            k: float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1
            else float("nan")
            for k, v in finals.items()
        },
        k_large={
            label: float(k / n_large)
            for label, k in zip(runner.labels, k_large)
        },
        k_small={
            label: float(k / n_small)
            for label, k in zip(runner.labels, k_small)
        },
        balance_threshold=problem.balance_threshold,
        final_thetas=finals,
    )


def _flush(variables, totals):
    for i, variable in enumerate(variables):
        totals[i] += np.sum(ops.convert_to_numpy(variable.value))
        variable.assign(ops.zeros_like(variable.value))


def plot(result, path):
    """Writes the mean θ over steps, one line per optimizer, to a PNG.

    Each optimizer has its own colour, line style and marker, so that
    curves that coincide (Adam with β1 0 and 0.9) stay visible; with
    several chains, an error bar at the last step spans ± 2 standard
    errors over the chains.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from keras_adashift.experiments.plotting import styles

    labels = list(result.mean_theta)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    steps = result.recorded_steps
    for label, style in zip(labels, styles(len(labels))):
        means = result.mean_theta[label]
        ax.plot(steps, means, label=label,
                markevery=max(1, len(steps) // 10), **style)
        if np.isfinite(result.final_se[label]):
            ax.errorbar(steps[-1], result.final_mean[label],
                        yerr=2 * result.final_se[label],
                        color=style["color"], capsize=3)
    ax.axhline(0, color="grey", lw=0.5)
    spread = " (bars: ± 2 s.e. at the end)" if result.chains > 1 else ""
    ax.set(
        xlabel="step",
        ylabel=f"mean θ over {result.chains} chains" if result.chains > 1
        else "θ",
        title=f"{result.problem} online problem{spread}",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _progress(items, enabled, description):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, unit="chunk")


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
