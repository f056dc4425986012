"""MirroredStrategy over 2 logical CPUs equals one device (a subprocess:
the device layout is fixed when TensorFlow starts)."""

import os
import subprocess
import sys

import json

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


@pytest.mark.slow
def test_mirrored_fit_equals_one_device(tmp_path):
    result_path = str(tmp_path / "result.json")
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
    for name in ("KERAS_BACKEND", "TF_CONFIG", "XLA_FLAGS"):
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (REPO, env.get("PYTHONPATH")) if p)
    run = subprocess.run(
        [sys.executable, os.path.join(HERE, "mirrored_fit_tfk.py"),
         result_path], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    with open(result_path) as f:
        result = json.load(f)
    for op, runs in result.items():
        one, mirrored = runs["one"], runs["mirrored"]
        assert mirrored["replicas"] == 2 and one["replicas"] == 1
        assert mirrored["replica_copies_equal"]
        assert one["iterations"] == mirrored["iterations"] == 8
        assert one["step_counts"] == mirrored["step_counts"] == [8] * 4
        for a, b, w0 in zip(one["weights"], mirrored["weights"],
                            one["initial"]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6,
                                       err_msg=op)
            assert not np.allclose(a, w0), op  # it trained
