"""What the command line's plots share: a style per line that keeps
identical curves visible, and a seed band."""

import itertools
import warnings

import numpy as np

LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h", "p", "d")


def styles(count):
    """`count` dicts of plot keywords, each a different colour, line style
    and marker: curves that coincide still show every marker."""
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    cycle = zip(itertools.cycle(colors), itertools.cycle(LINE_STYLES),
                itertools.cycle(MARKERS))
    return [
        {"color": c, "linestyle": ls, "marker": m, "markersize": 4,
         "markerfacecolor": "none"}
        for c, ls, m in itertools.islice(cycle, count)
    ]


def plot_seeds(ax, x, curves, label, style):
    """The mean over seeds as a line and min..max as a band.

    `curves` is one row per seed; NaN (a diverged seed) is left out of the
    mean and band from where it appears, and the label counts such seeds.
    """
    curves = np.asarray(curves, dtype="float64")
    finite = np.isfinite(curves)
    diverged = int(np.sum(~finite.all(axis=1)))
    with warnings.catch_warnings():  # an all-NaN epoch: no mean, no band
        warnings.simplefilter("ignore", RuntimeWarning)
        masked = np.where(finite, curves, np.nan)
        mean = np.nanmean(masked, axis=0)
        low, high = np.nanmin(masked, axis=0), np.nanmax(masked, axis=0)
    if diverged:
        label += f" ({diverged}/{len(curves)} diverged)"
    ax.plot(x, mean, label=label, markevery=_markevery(len(x)), **style)
    if len(curves) > 1:
        ax.fill_between(x, low, high, color=style["color"], alpha=0.15,
                        linewidth=0)


def _markevery(points):
    """About ten markers a line, whatever its length."""
    return max(1, points // 10)


def plot_family(family, runs, path):
    """The task suite's figure of one family (see `tasks.plot`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r.contender for r in runs))
    fig, (curves_ax, finals_ax) = plt.subplots(
        1, 2, figsize=(13, 0.3 * len(labels) + 3.5),
        gridspec_kw={"width_ratios": (3, 2)},
    )
    for label, style in zip(labels, styles(len(labels))):
        group = [r for r in runs if r.contender == label]
        epochs = np.arange(1, len(group[0].curve) + 1)
        plot_seeds(curves_ax, epochs * group[0].steps_per_epoch,
                   [r.curve for r in group], label, style)
    curves_ax.axhline(family.threshold, color="grey", lw=0.8, ls=":")
    curves_ax.set(xlabel="optimizer step", ylabel=family.metric,
                  title=f"{family.name}: {family.description}")
    curves_ax.legend(fontsize=7, ncol=2)
    _plot_finals(finals_ax, runs, labels, family)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_finals(ax, runs, labels, family):
    """Each seed's final value as a dot, one row per contender; a seed
    with no final value (diverged) as a red x at the left edge."""
    finals = [[r.final for r in runs if r.contender == label]
              for label in labels]
    finite = [v for row in finals for v in row if np.isfinite(v)]
    left = min(finite, default=0.0)
    for row, values in enumerate(finals):
        values = np.asarray(values, dtype="float64")
        jitter = np.linspace(-0.2, 0.2, len(values)) if len(values) > 1 \
            else np.zeros(1)
        ok = np.isfinite(values)
        ax.plot(values[ok], row + jitter[ok], "o", color="C0",
                markerfacecolor="none")
        ax.plot(np.full((~ok).sum(), left), row + jitter[~ok], "x",
                color="red")
    ax.axvline(family.threshold, color="grey", lw=0.8, ls=":")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel=f"final {family.metric} (each seed; red x: diverged)")
