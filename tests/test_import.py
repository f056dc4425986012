"""Importing keras_adashift, in a fresh process: it works under `python -OO`
and registers AdaShift for load_model even when imported before Keras.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import BACKEND
from keras_adashift import AdaShift
from models import batches
from models import tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_imports_under_python_OO():
    env = dict(os.environ, KERAS_BACKEND=BACKEND)
    result = subprocess.run(
        [sys.executable, "-OO", "-c", "from keras_adashift import AdaShift"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]


_IMPORT_ORDER_SCRIPT = textwrap.dedent(
    """
    import sys

    import keras_adashift  # imports no Keras: the command line starts fast
    assert "keras" not in sys.modules

    __import__(sys.argv[2])  # Keras, itself or through TensorFlow
    import keras

    model = keras.models.load_model(sys.argv[1], safe_mode=True)
    assert type(model.optimizer) is keras_adashift.AdaShift
    print(int(keras.ops.convert_to_numpy(model.optimizer.iterations)))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("first", ["keras", "tensorflow"])
def test_load_model_when_keras_adashift_is_imported_before_keras(
        tmp_path, first):
    # `import keras_adashift` registers AdaShift when Keras gets imported,
    # also when TensorFlow imports Keras halfway through its own import.
    if first == "tensorflow" and BACKEND != "tensorflow":
        pytest.skip("TensorFlow's import of Keras: the TensorFlow backend")
    model = tiny_model()
    model.compile(optimizer=AdaShift(keep_num=2), loss="mse")
    x, y = batches(3)
    for xb, yb in zip(x, y):
        model.train_on_batch(xb, yb)
    path = str(tmp_path / "model.keras")
    model.save(path)
    env = dict(os.environ, KERAS_BACKEND=BACKEND)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [REPO, env.get("PYTHONPATH")] if p
    )
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_ORDER_SCRIPT, path, first],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "could not register" not in result.stderr
    assert result.stdout.split()[-1] == "3"
