"""tf_keras (Keras 2) tests: a process of their own, with TF_USE_LEGACY_KERAS=1.

    TF_USE_LEGACY_KERAS=1 .venv/bin/python -m pytest -q tests/tf_keras

TensorFlow reads TF_USE_LEGACY_KERAS once, when it is imported (which
tests/conftest.py does, through Keras 3), so it cannot be set from here. The
per-backend runs of the main suite do not collect this folder (see
`collect_ignore` in tests/conftest.py).
"""

import os

import pytest

if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
    raise pytest.UsageError(
        "tests/tf_keras needs TF_USE_LEGACY_KERAS=1 in the environment "
        "(TensorFlow reads it at import): "
        "TF_USE_LEGACY_KERAS=1 python -m pytest tests/tf_keras")

import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_tf_keras_state():
    tf_keras.backend.clear_session()
    tf_keras.utils.set_random_seed(0)
    yield
    tf_keras.mixed_precision.set_global_policy("float32")


@pytest.fixture
def no_gpu_xla_switch():
    """tf_keras turns an optimizer's `jit_compile` off without a GPU; this
    says whether it did, for tests that force it on to run XLA on a CPU."""
    return not tf.config.list_physical_devices("GPU")
