import numpy as np

from conftest import only_on
from keras_adashift import AdaShift
from reference import adashift_trajectory


@only_on("jax")
def test_float64_under_jax_enable_x64():
    # x64 makes the step count int64 while the window's other start
    # indices are built as int32: the write must not mix the two.
    import jax
    import keras

    jax.config.update("jax_enable_x64", True)
    try:
        rng = np.random.default_rng(3)
        theta = rng.normal(size=(3, 2))
        grads = [rng.normal(size=(3, 2)) for _ in range(9)]
        variable = keras.Variable(theta, dtype="float64")
        opt = AdaShift(learning_rate=0.05, keep_num=3, epsilon=0.0)
        for g in grads:
            opt.apply([g], [variable])
        expected = adashift_trajectory(
            theta, grads, learning_rate=0.05, keep_num=3, epsilon=0.0
        )[-1]
        assert variable.dtype == "float64"
        np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-6)
    finally:
        jax.config.update("jax_enable_x64", False)
