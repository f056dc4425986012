"""AdaShift under tf.distribute and keras.distribution, each in a child process.

A child process gets its own device layout (2 logical CPUs, 2 XLA host
devices, a 2-worker cluster) without changing the devices of this session.
"""

import json

import numpy as np
import pytest

import spawn
from conftest import only_on

pytestmark = pytest.mark.slow


def assert_weights_close(actual, expected, atol=1e-6):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(np.array(a), np.array(e), atol=atol)


def assert_moved(initial, final):
    assert any(
        not np.allclose(np.array(i), np.array(f))
        for i, f in zip(initial, final)
    )


# The child processes pick their own backend: run each once, in the
# suite of the backend it exercises.
@only_on("tensorflow")
def test_mirrored_fit_equals_one_device(tmp_path):
    out = tmp_path / "result.json"
    result = spawn.run("mirrored_fit.py", out, result_path=out)
    one, mirrored = result["one"], result["mirrored"]
    assert mirrored["replicas"] == 2
    assert one["iterations"] == mirrored["iterations"] == 8
    assert mirrored["replica_copies_equal"]
    assert_weights_close(mirrored["initial"], one["initial"], atol=0)
    assert_moved(one["initial"], one["weights"])
    assert_weights_close(mirrored["weights"], one["weights"])


@only_on("tensorflow")
def test_multiworker_checkpoint_resume_equals_single_worker(tmp_path):
    ports = spawn.free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}

    def run_cluster(stop_after, tag):
        procs, outs = [], []
        for index in range(2):
            out = tmp_path / f"{tag}{index}.json"
            config = {"cluster": cluster, "task": {"type": "worker",
                                                   "index": index}}
            procs.append(
                spawn.start(
                    "multiworker_loop.py", out, tmp_path / f"ckpt{index}",
                    stop_after, TF_CONFIG=json.dumps(config),
                )
            )
            outs.append(out)
        # Wait for both before failing, so no worker is left running.
        errors, results = [], []
        for proc, out in zip(procs, outs):
            try:
                results.append(spawn.finish(proc, out))
            except AssertionError as e:
                errors.append(e)
        if errors:
            raise errors[0]
        return results

    # Stop mid-window (step 5 of 10, keep_num 3): the resumed run only
    # matches if both windows and the moments were restored.
    single_out = tmp_path / "single.json"
    single_proc = spawn.start(
        "multiworker_loop.py", single_out, tmp_path / "ckpt_single", 10
    )
    try:
        first = run_cluster(5, "first")
        resumed = run_cluster(10, "resumed")
    finally:
        single = spawn.finish(single_proc, single_out)

    assert [r["workers"] for r in first + resumed] == [2] * 4
    assert [r["iterations"] for r in first] == [5, 5]
    assert [r["start"] for r in resumed] == [5, 5]
    assert [r["iterations"] for r in resumed] == [10, 10]
    assert single["workers"] == 1 and single["iterations"] == 10
    assert_weights_close(resumed[1]["weights"], resumed[0]["weights"], atol=0)
    assert_weights_close(resumed[0]["weights"], single["weights"])
    np.testing.assert_allclose(
        np.array(resumed[0]["window"]), np.array(single["window"]), atol=1e-6
    )


@only_on("jax")
def test_jax_distribution_shards_slots_like_their_variable(tmp_path):
    out = tmp_path / "result.json"
    result = spawn.run(
        "jax_distribution.py", out, result_path=out,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    assert result["devices"] == 2
    one = result["one"]
    assert_moved(one["initial"], one["weights"])
    for name in ("data_parallel", "model_parallel"):
        run = result[name]
        assert run["iterations"] == one["iterations"] == 8
        assert_weights_close(run["initial"], one["initial"], atol=0)
        assert_weights_close(run["weights"], one["weights"])

    def spec(shardings, path):
        # P(None, "model") and P(None, "model", None) shard alike.
        axes = list(shardings[path]["spec"])
        while axes and axes[-1] is None:
            axes.pop()
        return axes

    run = result["model_parallel"]
    shardings = run["shardings"]
    kernel, bias = (
        next(p for p in shardings if p.endswith(suffix))
        for suffix in ("/hidden/kernel", "/hidden/bias")
    )
    assert spec(shardings, kernel) == [None, "model"]
    assert spec(shardings, bias) == ["model"]
    for variable, slots in run["slots"].items():
        window, momentum = slots
        assert window.endswith("_window") and momentum.endswith("_momentum")
        expected = spec(shardings, variable)
        assert spec(shardings, momentum) == expected
        # The window stacks gradients on a new, replicated leading axis.
        assert spec(shardings, window) == ([None] + expected if expected
                                           else [])
    # The blocks of all variables (spatial_axes=0: one per output unit of a
    # kernel, 6 + 2, and one per bias, 1 + 1) are one small replicated
    # vector each.
    for name in ("velocity", "bias_correction", "square_window"):
        [blocks] = [s for path, s in shardings.items()
                    if path.endswith(f"/{name}")]
        assert blocks["replicated"] and blocks["shape"][-1] == 10, name
    assert not shardings[kernel]["replicated"]
    assert all(s["devices"] == 2 for s in shardings.values())
    for s in result["data_parallel"]["shardings"].values():
        assert s["replicated"] and s["devices"] == 2
