"""Optimizer names: the default, unique defaults (also in a MultiOptimizer),
and an explicit name in the slot paths and the config.
"""

import re

import keras
import numpy as np
import pytest

from keras_adashift import AdaShift


def _variable(value, name):
    return keras.Variable(np.asarray(value, "float32"), name=name)


def test_default_names_are_unique():
    first, second = AdaShift(), AdaShift()
    assert first.name != second.name
    for name in (first.name, second.name):
        assert re.fullmatch(r"adashift(_\d+)?", name), name


def test_first_default_name_is_adashift():
    # The autouse fixture clears the session: this is the first AdaShift.
    assert AdaShift().name == "adashift"


def test_explicit_name_names_the_slots_and_the_config():
    optimizer = AdaShift(name="shifty", learning_rate=0.05, keep_num=3)
    assert optimizer.name == "shifty"
    optimizer.build([_variable(np.ones((3, 2)), "kernel"),
                     _variable(np.ones(2), "bias")])
    assert optimizer.variables
    assert all(v.path.startswith("shifty/") for v in optimizer.variables)
    assert optimizer.get_config()["name"] == "shifty"


def test_two_default_adashifts_in_multi_optimizer_do_not_clash():
    if not hasattr(keras.optimizers, "MultiOptimizer"):
        pytest.skip("this Keras has no keras.optimizers.MultiOptimizer")
    first, second = AdaShift(), AdaShift()
    a, b = _variable(np.ones(2), "a"), _variable(np.ones(3), "b")
    multi = keras.optimizers.MultiOptimizer(
        lambda v: first if v.name == "a" else second)
    multi.build([a, b])
    assert len({o.name for o in multi.optimizers}) == 2
    paths = [v.path for v in multi.variables]
    duplicates = sorted({p for p in paths if paths.count(p) > 1})
    assert not duplicates, duplicates
