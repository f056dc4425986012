import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.backend.backend()

# tests/tf_keras runs in a process of its own, with TF_USE_LEGACY_KERAS=1
# (TensorFlow reads it at import); the per-backend runs leave it out.
if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
    collect_ignore = ["tf_keras"]

# The widest float each backend runs with: JAX has float64 disabled.
FLOAT = "float32" if BACKEND == "jax" else "float64"


def only_on(*backends):
    """Skips a test on backends other than these."""
    return pytest.mark.skipif(
        BACKEND not in backends, reason=f"needs backend in {backends}"
    )


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    # free_memory=False skips a full garbage collection (~0.5 s a test).
    keras.utils.clear_session(free_memory=False)
    keras.utils.set_random_seed(0)
    yield


@pytest.fixture
def floatx_like_the_variables():
    # Keras's torch backend turns Python floats into floatx tensors, so
    # float64 runs need floatx float64 for the optimizer's constants (β1, β2,
    # 1/W) to keep float64 precision.
    previous = keras.config.floatx()
    keras.config.set_floatx(FLOAT)
    yield
    keras.config.set_floatx(previous)


@pytest.fixture
def dtype_policy():
    """Sets Keras's global dtype policy for one test: dtype_policy(name)."""
    previous = keras.config.dtype_policy()
    yield keras.config.set_dtype_policy
    keras.config.set_dtype_policy(previous)
