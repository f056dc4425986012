"""benchmarks/bench_tf_keras.py at toy size: structure, not speed."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.dirname(os.path.abspath(__file__)))), "benchmarks"))

import bench_tf_keras  # noqa: E402
import run  # noqa: E402


def test_tf_keras_update_step_table():
    sets = bench_tf_keras.shape_sets(512, real_names=["mlp_51x32"])
    assert len(sets["8 variables"]) == 8 and len(sets["mlp_51x32"]) == 102
    sets["mlp_51x32"] = sets["mlp_51x32"][:6]  # toy size
    out = bench_tf_keras.bench_update_step(sets, rounds=2, inner=1,
                                           warmup=1)
    for m in out.values():
        assert set(m["modes"]) == set(bench_tf_keras.MODES)
        for s in m["modes"].values():
            assert set(s["ms"]) == {"adam", "k10"}
            r = s["ratio"]
            assert 0 < r["p25"] <= r["median"] <= r["p75"]
    report = run.format_report([{"backend": "tf_keras",
                                 "tf_keras_update_step": out}])
    assert "tf_keras Adam" in report
    assert "| 8 variables | 8 |" in report and "| tf_keras-xla |" in report
