"""Keras's base optimizer arguments against the reference: weight decay,
gradient clipping, EMA, gradient accumulation.

Every expected trajectory comes from tests/reference.py (float64 NumPy) or
from NumPy written in the test, fed the same gradients as the optimizer.
Learning rates: tests/test_learning_rate.py; loss_scale_factor:
tests/test_loss_scaling.py; model.fit in every compile mode:
tests/test_execution_paths.py.
"""

import keras
import numpy as np
import pytest
from keras import ops

import kernel_bias as kb
from keras_adashift import AdaShift


def _opt_variable(optimizer, suffix):
    matches = [v for v in optimizer.variables if v.path.endswith(suffix)]
    assert len(matches) == 1, [v.path for v in optimizer.variables]
    return matches[0]


def test_plain_apply_matches_reference():
    gradients = kb.gradients(9)
    initial = kb.initial()
    actual = kb.run(AdaShift(**kb.BASE), kb.variables(initial), gradients)
    kb.assert_trajectory(actual, kb.reference(initial, gradients, **kb.BASE))


@pytest.mark.parametrize("exclude", [None, "var_names", "var_list"])
def test_weight_decay_is_decoupled_and_applied_in_warm_up(exclude):
    gradients = kb.gradients(8)
    initial = kb.initial()
    variables = kb.variables(initial)
    optimizer = AdaShift(weight_decay=0.5, **kb.BASE)
    if exclude == "var_names":
        optimizer.exclude_from_weight_decay(var_names=["bias"])
    elif exclude == "var_list":
        optimizer.exclude_from_weight_decay(var_list=[variables["bias"]])
    actual = kb.run(optimizer, variables, gradients)

    expected = kb.reference(initial, gradients, weight_decay=0.5, **kb.BASE)
    if exclude is not None:
        expected["bias"] = kb.reference(initial, gradients, **kb.BASE)["bias"]
    kb.assert_trajectory(actual, expected)
    # Decay shrinks the kernel during warm-up, before any AdaShift update.
    np.testing.assert_allclose(
        actual[0]["kernel"], initial["kernel"] * (1 - 0.5 * 0.05), **kb.TOL
    )
    bias_after_warm_up = actual[kb.BASE["keep_num"] - 1]["bias"]
    if exclude is None:
        assert not np.allclose(bias_after_warm_up, initial["bias"])
    else:
        np.testing.assert_array_equal(bias_after_warm_up, initial["bias"])


def _clip_norm(g, c):
    return g * c / max(np.linalg.norm(g), c)


@pytest.mark.parametrize("clip", ["clipnorm", "clipvalue", "global_clipnorm"])
def test_gradient_clipping(clip):
    gradients = kb.gradients(9)
    threshold = 1.0
    clipped = []
    for step in gradients:
        if clip == "clipnorm":
            clipped.append(
                {n: _clip_norm(g, threshold) for n, g in step.items()}
            )
        elif clip == "clipvalue":
            clipped.append(
                {n: np.clip(g, -threshold, threshold) for n, g in step.items()}
            )
        else:
            total = np.sqrt(sum(np.sum(np.square(g)) for g in step.values()))
            factor = threshold / max(total, threshold)
            clipped.append({n: g * factor for n, g in step.items()})
    initial = kb.initial()
    expected = kb.reference(initial, clipped, **kb.BASE)
    unclipped = kb.reference(initial, gradients, **kb.BASE)
    assert not np.allclose(expected["kernel"][-1], unclipped["kernel"][-1])

    optimizer = AdaShift(**{clip: threshold}, **kb.BASE)
    actual = kb.run(optimizer, kb.variables(initial), gradients)
    kb.assert_trajectory(actual, expected)


@pytest.mark.parametrize("overwrite_frequency", [None, 4])
def test_ema_tracks_and_overwrites_like_numpy(overwrite_frequency):
    momentum = 0.7
    steps = 10
    gradients = kb.gradients(steps)
    initial = kb.initial()
    # Without weight decay an AdaShift step does not depend on θ, so the
    # reference's steps can be replayed onto a θ that EMA overwrote.
    ref = kb.reference(initial, gradients, **kb.BASE)
    expected_vars, expected_ema = [], []
    theta = {n: v.astype("float64") for n, v in initial.items()}
    ema = None
    for t in range(steps):
        for n in theta:
            before = ref[n][t - 1] if t else initial[n]
            theta[n] = theta[n] + (ref[n][t] - before)
        if ema is None:  # Keras starts the average at the first step's θ.
            ema = dict(theta)
        else:
            ema = {
                n: momentum * ema[n] + (1 - momentum) * theta[n] for n in theta
            }
        if overwrite_frequency and (t + 1) % overwrite_frequency == 0:
            theta = dict(ema)
        expected_vars.append(dict(theta))
        expected_ema.append(dict(ema))

    optimizer = AdaShift(
        use_ema=True,
        ema_momentum=momentum,
        ema_overwrite_frequency=overwrite_frequency,
        **kb.BASE,
    )
    variables = kb.variables(initial)
    names = list(variables)
    for t, step in enumerate(gradients):
        optimizer.apply(
            [ops.convert_to_tensor(step[n]) for n in names],
            [variables[n] for n in names],
        )
        for n in names:
            np.testing.assert_allclose(
                ops.convert_to_numpy(variables[n]), expected_vars[t][n],
                **kb.TOL
            )
            average = _opt_variable(optimizer, f"{n}_average")
            np.testing.assert_allclose(
                ops.convert_to_numpy(average), expected_ema[t][n], **kb.TOL
            )
    if overwrite_frequency:
        # Overwrites at steps 4 and 8 moved θ off the plain trajectory.
        assert not np.allclose(expected_vars[-1]["kernel"], ref["kernel"][-1])
    optimizer.finalize_variable_values([variables[n] for n in names])
    for n in names:
        np.testing.assert_allclose(
            ops.convert_to_numpy(variables[n]), expected_ema[-1][n], **kb.TOL
        )


@pytest.mark.parametrize("variant", ["constant", "schedule_and_decay"])
def test_gradient_accumulation_window_counts_applied_updates(variant):
    k = 3
    keep_num = kb.BASE["keep_num"]
    groups = 7
    micro = kb.gradients(k * groups, seed=5)
    means = [
        {
            n: np.mean([micro[j * k + i][n] for i in range(k)], axis=0)
            for n in kb.SHAPES
        }
        for j in range(groups)
    ]
    initial = kb.initial()
    kwargs = dict(kb.BASE)
    ref_kwargs = dict(kb.BASE)
    if variant == "schedule_and_decay":

        def lr(i):
            return 0.05 * 0.7 ** (i / 4)

        kwargs["learning_rate"] = keras.optimizers.schedules.ExponentialDecay(
            0.05, decay_steps=4, decay_rate=0.7
        )
        kwargs["weight_decay"] = ref_kwargs["weight_decay"] = 0.5
        # Schedules see the micro-batch count: update j runs at micro-batch
        # k(j+1) - 1 (0-based); decay happens only on updates.
        ref_kwargs["learning_rate"] = lambda j: lr(k * (j + 1) - 1)
        by_update = kb.reference(
            initial, means, **dict(ref_kwargs, learning_rate=lr)
        )
    expected = kb.reference(initial, means, **ref_kwargs)
    if variant == "schedule_and_decay":
        assert not np.allclose(expected["kernel"][-1], by_update["kernel"][-1])

    optimizer = AdaShift(gradient_accumulation_steps=k, **kwargs)
    actual = kb.run(optimizer, kb.variables(initial), micro)
    assert int(ops.convert_to_numpy(optimizer.iterations)) == groups

    for i, step in enumerate(actual, start=1):
        group = i // k  # updates applied after micro-batch i
        for n, value in step.items():
            np.testing.assert_allclose(
                value,
                expected[n][group - 1] if group else initial[n],
                err_msg=f"{n} after micro-batch {i}",
                **kb.TOL,
            )
    if variant == "constant":
        # The window fills with keep_num updates, i.e. keep_num·k
        # micro-batches; the first change ends the next group.
        first_change = k * (keep_num + 1)
        for step in actual[: first_change - 1]:
            for n, value in step.items():
                np.testing.assert_array_equal(value, initial[n])
        assert not np.allclose(
            actual[first_change - 1]["kernel"], initial["kernel"]
        )
