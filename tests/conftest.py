import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.backend.backend()


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
