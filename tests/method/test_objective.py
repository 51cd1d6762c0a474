"""The DRO/MCD objective against a plain NumPy transcription of its definition.

The transcription below follows the definitions line by line, in float64, without calling
the package: T(h) = (h - mu) V, probes f(z) = z . w + b on T(h)[:m], BCE with logits, and
the four terms averaged over the batch.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcd_jax.method.objective import (
    ObjectiveConfig,
    base_targets_from_states,
    leave_one_out_mean,
    mcd_objective,
    objective_from_targets,
    parallel_objective,
    precompute_text_prompt_cache,
)
from mcd_jax.method.probes import LinearProbe
from mcd_jax.method.transform import Transform, complete_basis

HIDDEN_SIZE = 24
NUM_COMPONENTS = 4
BATCH = 6
NUM_EXAMPLES = 10
LANGUAGES = ("en", "da", "ko")
WEIGHTS = {"refusal": 1.0, "harmfulness": 0.01, "complement": 0.001, "consistency": 0.001}


# ---------------------------------------------------------------------------------------
# NumPy transcription of the definitions.


def np_transform(h, mu, basis):
    return (h - mu) @ basis


def np_probe(z, weight, bias):
    return z @ weight + bias


def np_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def np_bce(z, label):
    return -(label * np.log(np_sigmoid(z)) + (1 - label) * np.log(1 - np_sigmoid(z)))


def np_refusal_term(soft, base_en, labels, mu, basis, m, weight, bias):
    soft_logit = np_probe(np_transform(soft, mu, basis)[:, :m], weight, bias)
    base_logit = np_probe(np_transform(base_en, mu, basis)[:, :m], weight, bias)
    return np.mean(np_bce(soft_logit - base_logit, labels))


def np_complement_term(soft, base_lang, mu, basis, m):
    difference = np_transform(soft, mu, basis)[:, m:] - np_transform(base_lang, mu, basis)[:, m:]
    per_example = np.mean(difference**2, axis=1)
    return np.mean(per_example)


def np_consistency_term(soft, other_language_states, mu, basis):
    """L_m with the target mean_j T(x_j) over the given other-language states [j, batch, d]."""
    target = np.mean([np_transform(x, mu, basis) for x in other_language_states], axis=0)
    per_example = np.mean((np_transform(soft, mu, basis) - target) ** 2, axis=1)
    return np.mean(per_example)


# ---------------------------------------------------------------------------------------
# Random inputs shared by the tests.


@dataclasses.dataclass
class Problem:
    soft: np.ndarray  # [languages, batch, d] soft-prompt states
    text: np.ndarray  # [languages, examples, d] text-prompt states of the parallel set
    rows: np.ndarray  # [batch] example indices of the batch
    labels: np.ndarray  # [batch]
    mu: np.ndarray
    basis: np.ndarray
    refusal: tuple[np.ndarray, float]
    harmfulness: tuple[np.ndarray, float]

    def transform(self, dtype=jnp.float32) -> Transform:
        return Transform(
            mean=jnp.asarray(self.mu, dtype),
            basis=jnp.asarray(self.basis, dtype),
            explained_variance_ratio=jnp.full(NUM_COMPONENTS, 0.1, dtype),
            num_components=NUM_COMPONENTS,
        )

    def probes(self, dtype=jnp.float32) -> tuple[LinearProbe, LinearProbe]:
        return tuple(
            LinearProbe(weight=jnp.asarray(weight, dtype), bias=jnp.asarray(bias, dtype))
            for weight, bias in (self.refusal, self.harmfulness)
        )


@pytest.fixture(scope="module")
def problem() -> Problem:
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(HIDDEN_SIZE, HIDDEN_SIZE)))
    return Problem(
        soft=rng.normal(size=(len(LANGUAGES), BATCH, HIDDEN_SIZE)) * 2.0,
        text=rng.normal(size=(len(LANGUAGES), NUM_EXAMPLES, HIDDEN_SIZE)) * 2.0,
        rows=np.array([3, 0, 7, 9, 1, 4]),
        labels=np.array([0.0, 1.0, 1.0, 0.0, 0.0, 1.0]),
        mu=rng.normal(size=HIDDEN_SIZE),
        basis=basis,
        refusal=(rng.normal(size=NUM_COMPONENTS) * 0.5, 0.2),
        harmfulness=(rng.normal(size=NUM_COMPONENTS) * 0.5, -0.4),
    )


def np_terms(problem: Problem, language: int, soft_target: bool = False) -> dict[str, float]:
    """All four terms for the batch in language `language`, in NumPy."""
    m = NUM_COMPONENTS
    soft = problem.soft[language]
    base_en = problem.text[0][problem.rows]
    base_lang = problem.text[language][problem.rows]
    others = [j for j in range(len(LANGUAGES)) if j != language]
    if soft_target:
        other_states = [problem.soft[j] for j in others]
    else:
        other_states = [problem.text[j][problem.rows] for j in others]
    return {
        "refusal": np_refusal_term(
            soft, base_en, problem.labels, problem.mu, problem.basis, m, *problem.refusal
        ),
        "harmfulness": np_refusal_term(
            soft, base_en, problem.labels, problem.mu, problem.basis, m, *problem.harmfulness
        ),
        "complement": np_complement_term(soft, base_lang, problem.mu, problem.basis, m),
        "consistency": np_consistency_term(soft, other_states, problem.mu, problem.basis),
    }


def np_total(terms: dict[str, float], weights: dict[str, float] = WEIGHTS) -> float:
    return sum(weights[name] * terms[name] for name in weights)


def _raw_state_objective(problem: Problem, language: int, config: ObjectiveConfig):
    """Call mcd_objective on one language's batch, with text-prompt L_m targets."""
    transform = problem.transform()
    others = [j for j in range(len(LANGUAGES)) if j != language]
    consistency = None
    if config.mode == "mcd":
        consistency = np.mean(
            [
                np_transform(problem.text[j][problem.rows], problem.mu, problem.basis)
                for j in others
            ],
            axis=0,
        )
        consistency = jnp.asarray(consistency, jnp.float32)
    return mcd_objective(
        jnp.asarray(problem.soft[language], jnp.float32),
        jnp.asarray(problem.text[0][problem.rows], jnp.float32),
        jnp.asarray(problem.text[language][problem.rows], jnp.float32),
        consistency,
        jnp.asarray(problem.labels),
        transform,
        *problem.probes(),
        config,
    )


# ---------------------------------------------------------------------------------------
# Terms and totals.


@pytest.mark.parametrize("language", [0, 1, 2])
def test_terms_match_numpy(problem, language):
    total, terms = _raw_state_objective(problem, language, ObjectiveConfig())
    expected = np_terms(problem, language)

    for name in WEIGHTS:
        np.testing.assert_allclose(float(terms[name]), expected[name], rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(float(total), np_total(expected), rtol=1e-5)
    assert float(terms["total"]) == float(total)


def test_cached_terms_match_numpy(problem):
    cache = precompute_text_prompt_cache(
        jnp.asarray(problem.text, jnp.float32), LANGUAGES, problem.transform(), *problem.probes()
    )
    for language_index, language in enumerate(LANGUAGES):
        targets = cache.batch(language, jnp.asarray(problem.rows))
        total, terms = objective_from_targets(
            jnp.asarray(problem.soft[language_index], jnp.float32),
            targets,
            jnp.asarray(problem.labels),
            problem.transform(),
            *problem.probes(),
            ObjectiveConfig(),
        )
        expected = np_terms(problem, language_index)
        for name in WEIGHTS:
            np.testing.assert_allclose(
                float(terms[name]), expected[name], rtol=1e-5, err_msg=f"{language} {name}"
            )
        np.testing.assert_allclose(float(total), np_total(expected), rtol=1e-5)


def test_cache_batch_accepts_traced_language(problem):
    cache = precompute_text_prompt_cache(
        jnp.asarray(problem.text, jnp.float32), LANGUAGES, problem.transform(), *problem.probes()
    )
    by_index = jax.jit(lambda index: cache.batch(index, jnp.asarray(problem.rows)))(2)
    by_name = cache.batch("ko", jnp.asarray(problem.rows))
    np.testing.assert_array_equal(np.asarray(by_index.complement), np.asarray(by_name.complement))
    np.testing.assert_array_equal(np.asarray(by_index.consistency), np.asarray(by_name.consistency))


def test_parallel_objective_matches_numpy(problem):
    cache = precompute_text_prompt_cache(
        jnp.asarray(problem.text, jnp.float32), LANGUAGES, problem.transform(), *problem.probes()
    )
    for soft_target in (False, True):
        config = ObjectiveConfig(consistency_target="soft_prompt" if soft_target else "text_prompt")
        total, terms = parallel_objective(
            jnp.asarray(problem.soft, jnp.float32),
            cache,
            jnp.asarray(problem.rows),
            jnp.asarray(problem.labels),
            problem.transform(),
            *problem.probes(),
            config,
        )

        # Every language has the same batch size, so the mean over all rows is the mean of
        # the per-language means.
        per_language = [np_terms(problem, j, soft_target) for j in range(len(LANGUAGES))]
        for name in WEIGHTS:
            expected = np.mean([terms_j[name] for terms_j in per_language])
            np.testing.assert_allclose(
                float(terms[name]), expected, rtol=1e-5, err_msg=f"{config.consistency_target}"
            )
        expected_total = np.mean([np_total(terms_j) for terms_j in per_language])
        np.testing.assert_allclose(float(total), expected_total, rtol=1e-5)


def test_mcd_without_consistency_equals_dro(problem):
    # One language (English): the cache has no L_m targets, and MCD with weight 0 on L_m
    # must be exactly DRO.
    english = jnp.asarray(problem.text[:1], jnp.float32)
    cache = precompute_text_prompt_cache(english, ("en",), problem.transform(), *problem.probes())
    targets = cache.batch("en", jnp.asarray(problem.rows))
    assert targets.consistency is None

    def total(config):
        return objective_from_targets(
            jnp.asarray(problem.soft[0], jnp.float32),
            targets,
            jnp.asarray(problem.labels),
            problem.transform(),
            *problem.probes(),
            config,
        )

    mcd_total, mcd_terms = total(ObjectiveConfig(consistency_weight=0.0))
    dro_total, dro_terms = total(ObjectiveConfig(mode="dro"))
    assert float(mcd_total) == float(dro_total)
    assert set(dro_terms) == {"refusal", "harmfulness", "complement", "total"}

    expected = np_terms(problem, 0)
    dro_weights = {name: WEIGHTS[name] for name in ("refusal", "harmfulness", "complement")}
    np.testing.assert_allclose(float(dro_total), np_total(expected, dro_weights), rtol=1e-5)


@pytest.mark.parametrize("dropped", ["refusal", "harmfulness", "complement", "consistency"])
def test_ablation_drops_one_term(problem, dropped):
    total, terms = _raw_state_objective(problem, 1, ObjectiveConfig(dropped_term=dropped))
    expected = np_terms(problem, 1)
    weights = dict(WEIGHTS, **{dropped: 0.0})

    np.testing.assert_allclose(float(total), np_total(expected, weights), rtol=1e-5)
    np.testing.assert_allclose(float(terms[dropped]), expected[dropped], rtol=1e-5)


def test_custom_weights_scale_terms(problem):
    weights = {"refusal": 0.5, "harmfulness": 2.0, "complement": 0.1, "consistency": 3.0}
    config = ObjectiveConfig(**{f"{name}_weight": value for name, value in weights.items()})
    total, _ = _raw_state_objective(problem, 2, config)
    np.testing.assert_allclose(float(total), np_total(np_terms(problem, 2), weights), rtol=1e-5)


def test_terms_ignore_basis_completion(problem):
    # L_U and L_m only use squared distances, which any orthonormal completion preserves.
    components = jnp.asarray(problem.basis[:, :NUM_COMPONENTS], jnp.float32)
    terms_by_completion = []
    for seed in (None, 42):
        transform = problem.transform().replace(basis=complete_basis(components, seed=seed))
        text = jnp.asarray(problem.text, jnp.float32)
        cache = precompute_text_prompt_cache(text, LANGUAGES, transform, *problem.probes())
        _, terms = objective_from_targets(
            jnp.asarray(problem.soft[1], jnp.float32),
            cache.batch("da", jnp.asarray(problem.rows)),
            jnp.asarray(problem.labels),
            transform,
            *problem.probes(),
            ObjectiveConfig(),
        )
        terms_by_completion.append(terms)

    householder, seeded = terms_by_completion
    for name in WEIGHTS:
        np.testing.assert_allclose(
            float(householder[name]), float(seeded[name]), rtol=1e-5, err_msg=name
        )


def test_base_targets_from_states_match_cache(problem):
    cache = precompute_text_prompt_cache(
        jnp.asarray(problem.text, jnp.float32), LANGUAGES, problem.transform(), *problem.probes()
    )
    from_cache = cache.batch("da", jnp.asarray(problem.rows))
    from_states = base_targets_from_states(
        jnp.asarray(problem.text[0][problem.rows], jnp.float32),
        jnp.asarray(problem.text[1][problem.rows], jnp.float32),
        None,
        problem.transform(),
        *problem.probes(),
    )
    for name in ("refusal_logits", "harmfulness_logits", "complement"):
        np.testing.assert_allclose(
            np.asarray(getattr(from_states, name)),
            np.asarray(getattr(from_cache, name)),
            rtol=1e-5,
            atol=1e-5,
            err_msg=name,
        )


def test_leave_one_out_mean_matches_loop():
    values = np.random.default_rng(3).normal(size=(4, 5, 3))
    expected = np.stack([np.delete(values, j, axis=0).mean(axis=0) for j in range(4)])
    np.testing.assert_allclose(
        np.asarray(leave_one_out_mean(jnp.asarray(values))), expected, rtol=1e-6, atol=1e-7
    )


# ---------------------------------------------------------------------------------------
# Gradients.


def _central_differences(function, x, step):
    gradient = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        offset = np.zeros_like(x)
        offset[index] = step
        gradient[index] = (function(x + offset) - function(x - offset)) / (2 * step)
    return gradient


def test_gradient_matches_finite_differences(problem):
    with jax.enable_x64(True):
        transform = problem.transform(jnp.float64)
        probes = problem.probes(jnp.float64)
        others = [problem.text[j][problem.rows] for j in (0, 2)]
        targets = base_targets_from_states(
            jnp.asarray(problem.text[0][problem.rows]),
            jnp.asarray(problem.text[1][problem.rows]),
            jnp.asarray(np.mean([np_transform(x, problem.mu, problem.basis) for x in others], 0)),
            transform,
            *probes,
        )
        # Weights of one keep every term's gradient well above the differencing error.
        config = ObjectiveConfig(
            harmfulness_weight=1.0, complement_weight=1.0, consistency_weight=1.0
        )

        @jax.jit
        def total(soft):
            labels = jnp.asarray(problem.labels)
            return objective_from_targets(soft, targets, labels, transform, *probes, config)[0]

        soft = problem.soft[1].astype(np.float64)
        gradient = np.asarray(jax.grad(total)(jnp.asarray(soft)))
        numeric = _central_differences(lambda x: float(total(jnp.asarray(x))), soft, 1e-6)
    assert gradient.dtype == np.float64
    np.testing.assert_allclose(gradient, numeric, rtol=1e-6, atol=1e-9)


def test_soft_prompt_target_gradient_matches_finite_differences(problem):
    # With soft-prompt targets, the gradient flows through both sides of L_m.
    rows, labels = jnp.asarray(problem.rows[:2]), jnp.asarray(problem.labels[:2])
    with jax.enable_x64(True):
        transform = problem.transform(jnp.float64)
        probes = problem.probes(jnp.float64)
        cache = precompute_text_prompt_cache(
            jnp.asarray(problem.text), LANGUAGES, transform, *probes
        )
        config = ObjectiveConfig(consistency_target="soft_prompt", consistency_weight=1.0)

        @jax.jit
        def total(soft):
            return parallel_objective(soft, cache, rows, labels, transform, *probes, config)[0]

        soft = problem.soft[:, :2].astype(np.float64)
        gradient = np.asarray(jax.grad(total)(jnp.asarray(soft)))
        numeric = _central_differences(lambda x: float(total(jnp.asarray(x))), soft, 1e-6)
    np.testing.assert_allclose(gradient, numeric, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------
# Bad input.


def test_mcd_requires_consistency_targets(problem):
    targets = base_targets_from_states(
        jnp.asarray(problem.text[0][problem.rows], jnp.float32),
        jnp.asarray(problem.text[1][problem.rows], jnp.float32),
        None,
        problem.transform(),
        *problem.probes(),
    )
    with pytest.raises(ValueError, match="needs consistency targets"):
        objective_from_targets(
            jnp.asarray(problem.soft[1], jnp.float32),
            targets,
            jnp.asarray(problem.labels),
            problem.transform(),
            *problem.probes(),
            ObjectiveConfig(),
        )


def test_dro_rejects_consistency_targets(problem):
    with pytest.raises(ValueError, match="DRO mode has no consistency term"):
        mcd_objective(
            jnp.asarray(problem.soft[0], jnp.float32),
            jnp.asarray(problem.text[0][problem.rows], jnp.float32),
            None,
            jnp.zeros((BATCH, HIDDEN_SIZE)),
            jnp.asarray(problem.labels),
            problem.transform(),
            *problem.probes(),
            ObjectiveConfig(mode="dro"),
        )


@pytest.mark.parametrize(
    ("field", "shape"),
    [("complement", (BATCH, HIDDEN_SIZE)), ("refusal_logits", (1,)), ("consistency", (BATCH, 3))],
)
def test_objective_rejects_mismatched_shapes(problem, field, shape):
    targets = base_targets_from_states(
        jnp.asarray(problem.text[0][problem.rows], jnp.float32),
        jnp.asarray(problem.text[1][problem.rows], jnp.float32),
        jnp.zeros((BATCH, HIDDEN_SIZE)),
        problem.transform(),
        *problem.probes(),
    )
    targets = targets.replace(**{field: jnp.zeros(shape)})
    with pytest.raises(ValueError, match=f"{field} has shape"):
        objective_from_targets(
            jnp.asarray(problem.soft[1], jnp.float32),
            targets,
            jnp.asarray(problem.labels),
            problem.transform(),
            *problem.probes(),
            ObjectiveConfig(),
        )


def test_cache_requires_english(problem):
    with pytest.raises(ValueError, match="lack 'en'"):
        precompute_text_prompt_cache(
            jnp.asarray(problem.text[1:], jnp.float32),
            ("da", "ko"),
            problem.transform(),
            *problem.probes(),
        )


@pytest.mark.parametrize(
    ("languages", "message"),
    [(("en", "da"), r"shape \[languages=2"), (("en", "da", "en"), "duplicate")],
)
def test_cache_rejects_bad_languages(problem, languages, message):
    with pytest.raises(ValueError, match=message):
        precompute_text_prompt_cache(
            jnp.asarray(problem.text, jnp.float32),
            languages,
            problem.transform(),
            *problem.probes(),
        )


def test_cache_rejects_unknown_language(problem):
    cache = precompute_text_prompt_cache(
        jnp.asarray(problem.text, jnp.float32), LANGUAGES, problem.transform(), *problem.probes()
    )
    with pytest.raises(ValueError, match="'ga' is not in the text-prompt cache"):
        cache.batch("ga", jnp.asarray(problem.rows))


@pytest.mark.parametrize(
    "changes",
    [
        {"mode": "mcd2"},
        {"consistency_target": "soft"},
        {"dropped_term": "L_m"},
        {"mode": "dro", "dropped_term": "consistency"},
        {"refusal_weight": -1.0},
    ],
)
def test_objective_config_rejects_bad_values(changes):
    with pytest.raises(ValueError):
        ObjectiveConfig(**changes)
