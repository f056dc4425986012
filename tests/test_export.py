"""A model trained with AdaShift exports for TF Serving."""

import numpy as np
import pytest

import spawn
from conftest import only_on
from keras_adashift import AdaShift
from models import tiny_model


@only_on("tensorflow")
@pytest.mark.slow
def test_export_serving_default_in_fresh_process(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.normal(size=(32, 2)).astype("float32")
    model = tiny_model()
    model.compile(optimizer=AdaShift(learning_rate=0.01, keep_num=2),
                  loss="mse")
    initial = model.predict(x[:5], verbose=0)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    expected = model.predict(x[:5], verbose=0)
    assert not np.allclose(expected, initial)

    path = tmp_path / "served"
    model.export(str(path))
    np.save(tmp_path / "input.npy", x[:5])
    out = tmp_path / "result.json"
    result = spawn.run(
        "serve_saved_model.py", path, tmp_path / "input.npy", out,
        result_path=out,
    )
    # TF Serving has no custom objects: the graph must not need this package.
    assert not result["package_imported"]
    (outputs,) = result["outputs"].values()
    np.testing.assert_allclose(np.array(outputs), expected, rtol=1e-5,
                               atol=1e-6)
