"""The method's pieces chained: estimation, text-prompt cache, schedule and train steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mcd_jax.method import (
    ObjectiveConfig,
    ProbeTrainingConfig,
    collaborative_schedule,
    fit_probe,
    fit_transform,
    objective_from_targets,
    precompute_text_prompt_cache,
)

LANGUAGES = ("en", "da", "ko")
HIDDEN_SIZE = 32
NUM_QUERIES = 40


def test_training_states_lowers_objective():
    rng = np.random.default_rng(0)

    # Harmful and harmless queries differ along one hidden direction. The same query in
    # another language is the English state plus a language offset and a little noise.
    labels = np.repeat([0.0, 1.0], NUM_QUERIES // 2).astype(np.float32)
    direction = rng.normal(size=HIDDEN_SIZE)
    english = rng.normal(size=(NUM_QUERIES, HIDDEN_SIZE)) + 3.0 * np.outer(labels - 0.5, direction)
    offsets = rng.normal(size=(len(LANGUAGES), 1, HIDDEN_SIZE))
    noise = 0.1 * rng.normal(size=(len(LANGUAGES), NUM_QUERIES, HIDDEN_SIZE))
    text_states = jnp.asarray(english[None] + offsets + noise, jnp.float32)

    # Estimation: transform on the English states, then both probes on the safety subspace.
    transform = fit_transform(text_states[0], num_components=4)
    features = transform.safety(text_states[0])
    probe_config = ProbeTrainingConfig(learning_rate=0.05, num_folds=5, max_steps=500)
    harmfulness = fit_probe(features, labels, probe_config)
    compliance = np.clip(labels * 0.8 + 0.1, 0.0, 1.0)
    refusal = fit_probe(features, compliance, probe_config)
    assert float(np.mean(harmfulness.heldout_accuracy)) > 0.9

    cache = precompute_text_prompt_cache(
        text_states, LANGUAGES, transform, refusal.probe, harmfulness.probe
    )
    config = ObjectiveConfig()

    # Training: soft-prompt states start at the text-prompt states and take a few AdamW
    # steps along the collaborative schedule, with the language index traced under jit.
    @jax.jit
    def train_step(soft_states, opt_state, language_index, rows):
        def loss(states):
            batch_states = states[language_index][rows]
            targets = cache.batch(language_index, rows)
            total, _ = objective_from_targets(
                batch_states,
                targets,
                jnp.asarray(labels)[rows],
                transform,
                refusal.probe,
                harmfulness.probe,
                config,
            )
            return total

        value, grads = jax.value_and_grad(loss)(soft_states)
        updates, opt_state = optimizer.update(grads, opt_state, soft_states)
        return optax.apply_updates(soft_states, updates), opt_state, value

    def full_objective(soft_states):
        totals = []
        for index, language in enumerate(LANGUAGES):
            rows = jnp.arange(NUM_QUERIES)
            total, _ = objective_from_targets(
                soft_states[index],
                cache.batch(language, rows),
                jnp.asarray(labels),
                transform,
                refusal.probe,
                harmfulness.probe,
                config,
            )
            totals.append(float(total))
        return np.mean(totals)

    optimizer = optax.adamw(0.1)
    soft_states = text_states
    opt_state = optimizer.init(soft_states)
    before = full_objective(soft_states)
    schedule = collaborative_schedule(NUM_QUERIES, LANGUAGES, batch_size=10, epochs_per_language=5)
    for step in schedule:
        language_index = LANGUAGES.index(step.language)
        soft_states, opt_state, _ = train_step(
            soft_states, opt_state, language_index, jnp.asarray(step.example_indices)
        )
    after = full_objective(soft_states)

    assert len(schedule) == 3 * 5 * 4
    assert after < 0.5 * before
