"""The benchmark's measurement functions at toy size: structure, not speed."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks")
)

import bench  # noqa: E402
import run  # noqa: E402

SUMMARY_KEYS = {"p25", "median", "p75"}


def _is_summary(x):
    return set(x) == SUMMARY_KEYS and x["p25"] <= x["median"] <= x["p75"]


def test_shapes_for_gives_eight_variables_near_the_size():
    shapes = bench.shapes_for(1 << 22)
    assert len(shapes) == 8
    total = sum(int(np.prod(s)) for s in shapes)
    assert abs(total - (1 << 22)) / (1 << 22) < 0.01


def test_update_step_structure():
    out = bench.bench_update_step(
        512, rounds=2, inner=1, warmup=1, copy_bytes=1 << 16
    )
    assert set(out) == set(bench.modes())
    for s in out.values():
        assert set(s["ms"]) == {"adam", "k1", "k10", "k40", "copy"}
        assert all(_is_summary(m) for m in s["ms"].values())
        assert set(s["ratios"]) == {"k1/adam", "k10/adam", "k40/adam",
                                    "k40/k1"}
        assert all(_is_summary(r) for r in s["ratios"].values())
        assert s["bandwidth"]["copy_GBps"] > 0
        assert s["bandwidth"]["adam"]["bytes_per_step"] == 7 * 4 * s["params"]
        assert s["bandwidth"]["k10"]["bytes_per_step"] == 7 * 4 * s["params"]


def test_state_bytes_per_param_counts_the_window():
    out = bench.state_bytes_per_param(n_params=1 << 16)
    assert out["adam"] == pytest.approx(8, abs=0.1)
    # window of 10 + 1 slots + m, then per block (max) or per element (none)
    # v and its bias correction; the window of φ(g²) per block is 11 values
    # and the step count one, per variable.
    assert out["adashift max k10"] == pytest.approx(48, abs=0.2)
    assert out["adashift none k10"] == pytest.approx(56, abs=0.2)
    assert out["adashift max k10 bf16"] == pytest.approx(26, abs=0.2)
    # beta_1 0: m is the gradient itself. With max nothing is kept per
    # parameter (at most Adam's 8 bytes); none keeps the window and v, c.
    assert out["adashift max k10 beta_1=0"] <= out["adam"]
    assert out["adashift max k10 beta_1=0"] == pytest.approx(0, abs=0.2)
    assert out["adashift none k10 beta_1=0"] == pytest.approx(52, abs=0.2)


@pytest.mark.slow
def test_fit_bf16_and_report_structure():
    fit = bench.bench_fit(rounds=1, max_samples=64)
    assert _is_summary(fit["ratio"])
    assert set(fit["s_per_epoch"]) == {"adam", "adashift"}
    bf16 = bench.bench_bf16_window(epochs=1)
    assert {"float32", "bfloat16", "max_param_diff", "val_acc_diff"} <= set(
        bf16)
    result = {
        "backend": bench.BACKEND,
        "update_step": bench.bench_update_step(
            256, rounds=1, inner=1, warmup=1, copy_bytes=1 << 16),
        "fit": fit,
        "memory": bench.state_bytes_per_param(n_params=256),
        "bf16_window": bf16,
    }
    report = run.format_report([result])
    assert any(f"| {path} |" in report for path in ("tf-xla", "jax", "torch"))
    assert "bytes/param" in report and "bfloat16" in report


def test_peer_structure():
    pytest.importorskip("pytorch_optimizer")
    out = bench.bench_peer(512, rounds=2, inner=1, warmup=1, keep_num=2)
    assert {"peer_adashift", "torch_adam"} <= set(out["ms"])
    assert _is_summary(out["ratios"]["peer_adashift/torch_adam"])


def test_monitor_structure():
    out = bench.bench_monitor(rounds=2, epochs=1, max_samples=64)
    assert set(out["s_per_fit"]) == {"none"} | {
        f"every {k}" for k in bench.MONITOR_EVERY}
    assert set(out["ratios"]) == set(out["s_per_fit"]) - {"none"}
    assert all(_is_summary(r) for r in out["ratios"].values())
    assert out["steps_per_fit"] == 1
    assert set(out["hook_fraction"]) == set(out["ratios"])
    assert all(0 < f < 1 for f in out["hook_fraction"].values())
    report = run.format_report([{"backend": bench.BACKEND, "monitor": out}])
    assert "StepMonitor in model.fit" in report
    assert run.MONITOR_DEFAULT in out["ratios"]
