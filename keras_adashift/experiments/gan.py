"""A small WGAN-GP on four Gaussians in 2-D: the suite's GAN family.

Critic and generator (2-64-64-1 and 2-64-64-2 MLPs) are each trained by
their own instance of the contender, five critic steps per generator step,
gradient penalty 10 (Gulrajani et al., 2017). The penalty needs the gradient
of a gradient, so the loop is TensorFlow's (`tf.GradientTape`, traced with
`tf.function`); other backends skip this family.
"""

import keras
import numpy as np

MODES, RADIUS, SPREAD = 4, 1.0, 0.1
CRITIC_STEPS, PENALTY = 5, 10.0
GENERATOR_STEPS_PER_EPOCH = 50
SAMPLES = 1000


def available():
    return keras.backend.backend() == "tensorflow"


def centers():
    angles = 2 * np.pi * np.arange(MODES) / MODES
    return RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def data(seed=0, samples=20_000):
    """A pool of real samples: a mode drawn uniformly, plus N(0, 0.1²)."""
    rng = np.random.default_rng(seed)
    modes = rng.integers(0, MODES, samples)
    points = centers()[modes] + SPREAD * rng.standard_normal((samples, 2))
    return {"x": points.astype("float32")}


def score(points, reference):
    """Minus the sliced Wasserstein-1 distance between the samples and as
    many real ones (higher is better; 0 is a perfect match).

    The mean over 64 fixed directions of the W1 distance between the
    projections, which for equal sample sizes is the mean gap between
    their sorted values. Continuous, so it shows progress before the
    modes are sharp; a generator that collapses onto some modes stays
    far below 0.
    """
    points = np.asarray(points, dtype="float64")
    if not np.all(np.isfinite(points)):
        return float("nan")
    angles = np.linspace(0, np.pi, 64, endpoint=False)
    directions = np.stack([np.cos(angles), np.sin(angles)])
    gaps = np.sort(points @ directions, axis=0) - np.sort(
        reference[:len(points)] @ directions, axis=0)
    return -float(np.mean(np.abs(gaps)))


def _mlp(outputs, name):
    return keras.Sequential([
        keras.Input((2,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(outputs),
    ], name=name)


def train(make_optimizer, seed, epochs, batch_size, pool, track):
    """Trains a WGAN-GP; returns the score after each epoch and the
    tracker.

    `track(variables, optimizer)` returns the tracker of the step
    statistics of both networks; its `update()` runs after every optimizer
    step (critic or generator) and returns True to stop (a diverged run).
    """
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    generator, critic = _mlp(2, "generator"), _mlp(1, "critic")
    g_optimizer, c_optimizer = make_optimizer(), make_optimizer()
    # Built outside the traced steps, which must not create variables.
    g_optimizer.build(generator.trainable_variables)
    c_optimizer.build(critic.trainable_variables)
    noise = keras.random.SeedGenerator(seed)
    tracker = track(
        critic.trainable_variables + generator.trainable_variables,
        c_optimizer,
    )

    @tf.function
    def critic_step(real):
        fake = generator(keras.random.normal((batch_size, 2), seed=noise))
        mix = keras.random.uniform((batch_size, 1), seed=noise)
        between = mix * real + (1 - mix) * fake
        with tf.GradientTape() as tape:
            with tf.GradientTape() as inner:
                inner.watch(between)
                inner_score = critic(between)
            slopes = tf.norm(inner.gradient(inner_score, between), axis=1)
            loss = (tf.reduce_mean(critic(fake)) - tf.reduce_mean(critic(real))
                    + PENALTY * tf.reduce_mean((slopes - 1) ** 2))
        variables = critic.trainable_variables
        c_optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    @tf.function
    def generator_step():
        with tf.GradientTape() as tape:
            fake = generator(keras.random.normal((batch_size, 2), seed=noise))
            loss = -tf.reduce_mean(critic(fake))
        variables = generator.trainable_variables
        g_optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    rng = np.random.default_rng(seed)
    probe = np.random.default_rng(0).standard_normal((SAMPLES, 2))
    probe = probe.astype("float32")
    scores = []
    for _ in range(epochs):
        for _ in range(GENERATOR_STEPS_PER_EPOCH):
            for _ in range(CRITIC_STEPS):
                real = pool[rng.integers(0, len(pool), batch_size)]
                critic_step(tf.constant(real))
                if tracker.update():
                    return scores + [float("nan")], tracker
            generator_step()
            if tracker.update():
                return scores + [float("nan")], tracker
        scores.append(score(generator(probe), pool))
    return scores, tracker
