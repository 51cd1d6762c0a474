"""The training step on a tiny random model with a real chat template and real batches.

Batches come from the trainer's own pipeline: the built-in training split (16 pairs in three
languages), real text-prompt states, the cached targets and `BatchBuilder`.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mcd_jax.method.objective import ObjectiveConfig
from mcd_jax.method.schedule import collaborative_schedule, parallel_schedule
from mcd_jax.models import load_model
from mcd_jax.sharding import make_mesh
from mcd_jax.soft_prompt import init_soft_prompt, text_prompt_token_ids
from mcd_jax.states import compute_states
from mcd_jax.training.data import load_training_set
from mcd_jax.training.job import load_estimation_artifacts
from mcd_jax.training.step import StepConfig, TrainStep, batch_loss, make_optimizer

sys.path.insert(0, str(Path(__file__).parent))
from test_step_support import (  # noqa: E402
    TEXT_PROMPT,
    build_tiny_model_folder,
    step_inputs,
    write_estimation_artifacts,
    write_small_dataset,
)

LANGUAGES = ("en", "da", "ko")
NUM_PAIRS = 16
BATCH_SIZE = 8
TERMS = {"refusal", "harmfulness", "complement", "consistency", "total", "grad_norm"}


@pytest.fixture(scope="module")
def tiny(smollm2_tokenizer, tmp_path_factory):
    """The tiny model folder, its float32 model, a small training set and the method arrays."""
    root = tmp_path_factory.mktemp("tiny_step")
    folder = build_tiny_model_folder(smollm2_tokenizer, root / "model")
    loaded = load_model(folder, dtype=jnp.float32)
    dataset = write_small_dataset(root / "train.jsonl", NUM_PAIRS, LANGUAGES)
    training_set = load_training_set(str(dataset), LANGUAGES)

    english = list(training_set.texts["en"])
    anchor_states = np.concatenate(
        [
            compute_states(loaded.model, loaded.tokenizer, english),
            compute_states(loaded.model, loaded.tokenizer, english, text_prompt=TEXT_PROMPT),
        ]
    )
    method = load_estimation_artifacts(write_estimation_artifacts(anchor_states, root / "est"))
    return {
        "folder": folder,
        "loaded": loaded,
        "training_set": training_set,
        "method": method,
        "root": root,
    }


def initial_prompt(loaded) -> jax.Array:
    ids = text_prompt_token_ids(loaded.tokenizer, TEXT_PROMPT)
    return init_soft_prompt(np.asarray(loaded.model.embed_tokens[...]), ids)


def first_step(config: StepConfig):
    if config.layout == "all_languages":
        schedule = parallel_schedule(NUM_PAIRS, LANGUAGES, BATCH_SIZE, drop_last=True)
    else:
        schedule = collaborative_schedule(NUM_PAIRS, LANGUAGES, BATCH_SIZE, drop_last=True)
    return next(iter(schedule))


def step_config(layout: str, target: str = "text_prompt", accumulation: int = 1) -> StepConfig:
    return StepConfig(
        objective=ObjectiveConfig(consistency_target=target),
        layout=layout,
        languages_per_query=1 if layout == "one_language" else len(LANGUAGES),
        grad_accum_steps=accumulation,
    )


def make_batch(tiny, config: StepConfig, mesh=None):
    builder = step_inputs(
        tiny["loaded"], tiny["method"], tiny["training_set"], config, tiny["root"], mesh
    )
    return builder.device_batch(first_step(config))


LAYOUTS = [
    ("one_language", "text_prompt"),
    ("central_language", "soft_prompt"),
    ("all_languages", "soft_prompt"),
]


def test_steps_change_only_soft_prompt(tiny):
    config = step_config("one_language")
    batch = make_batch(tiny, config)
    graphdef, model_state = nnx.split(tiny["loaded"].model)
    frozen_before = [np.array(leaf) for leaf in jax.tree.leaves(model_state)]
    optimizer = make_optimizer(learning_rate=1e-2)
    prompt = initial_prompt(tiny["loaded"])
    prompt_before = np.array(prompt)
    opt_state = optimizer.init(prompt)
    step = TrainStep(graphdef, model_state, optimizer, config)

    losses = []
    for _ in range(4):
        prompt, opt_state, terms = step(prompt, opt_state, model_state, tiny["method"], batch)
        losses.append(float(terms["total"]))
    final_loss = batch_loss(
        prompt, model_state, tiny["method"], batch, graphdef=graphdef, config=config
    )[0]

    frozen_after = jax.tree.leaves(model_state)
    assert len(frozen_after) == len(frozen_before)
    for before, after in zip(frozen_before, frozen_after, strict=True):
        np.testing.assert_array_equal(np.asarray(after), before)
    assert prompt.shape == prompt_before.shape
    assert not np.array_equal(np.asarray(prompt), prompt_before)
    assert set(terms) == TERMS
    assert np.isfinite(losses).all()
    assert float(final_loss) < losses[0]


@pytest.mark.parametrize(("layout", "target"), LAYOUTS)
def test_gradient_matches_finite_differences(tiny, layout, target):
    config = step_config(layout, target)
    batch = make_batch(tiny, config)
    graphdef, model_state = nnx.split(tiny["loaded"].model)
    prompt = initial_prompt(tiny["loaded"])

    @jax.jit
    def loss(soft_prompt):
        return batch_loss(
            soft_prompt, model_state, tiny["method"], batch, graphdef=graphdef, config=config
        )[0]

    gradient = np.asarray(jax.grad(loss)(prompt))
    random = np.random.default_rng(0).normal(size=prompt.shape).astype(np.float32)
    # Central differences along the gradient and along a random direction, both unit norm.
    # In float32 the loss (about 1) carries rounding errors of roughly 1e-6 (an estimate for
    # a 2-layer forward pass), which divided by 2 * epsilon = 2e-2 gives about 5e-5. The
    # truncation error is O(epsilon^2), smaller still.
    epsilon = 1e-2
    for direction in (gradient / np.linalg.norm(gradient), random / np.linalg.norm(random)):
        numeric = (
            float(loss(prompt + epsilon * direction)) - float(loss(prompt - epsilon * direction))
        ) / (2 * epsilon)
        analytic = float(np.vdot(gradient, direction))
        assert numeric == pytest.approx(analytic, rel=2e-2, abs=2e-4)


def test_accumulation_matches_whole_batch(tiny):
    results = []
    for accumulation in (1, 2):
        config = step_config("all_languages", "soft_prompt", accumulation)
        batch = make_batch(tiny, config)
        graphdef, model_state = nnx.split(tiny["loaded"].model)
        optimizer = make_optimizer()
        prompt = initial_prompt(tiny["loaded"])
        step = TrainStep(graphdef, model_state, optimizer, config)
        results.append(step(prompt, optimizer.init(prompt), model_state, tiny["method"], batch))

    (whole_prompt, _, whole_terms), (split_prompt, _, split_terms) = results
    # Averaging two half-batch means reorders float32 sums; 1e-5 relative covers that.
    for name in TERMS:
        assert float(split_terms[name]) == pytest.approx(float(whole_terms[name]), rel=1e-5)
    np.testing.assert_allclose(np.asarray(split_prompt), np.asarray(whole_prompt), atol=1e-6)


def run_steps(tiny, mesh, num_steps: int = 3):
    """Run the first steps of the collaborative schedule; return losses and the prompt."""
    loaded = load_model(tiny["folder"], dtype=jnp.float32, mesh=mesh)
    config = step_config("one_language")
    builder = step_inputs(loaded, tiny["method"], tiny["training_set"], config, tiny["root"], mesh)
    graphdef, model_state = nnx.split(loaded.model)
    optimizer = make_optimizer()
    prompt = initial_prompt(loaded)
    opt_state = optimizer.init(prompt)
    step = TrainStep(graphdef, model_state, optimizer, config, mesh)
    schedule = collaborative_schedule(NUM_PAIRS, LANGUAGES, BATCH_SIZE, drop_last=True)

    losses = []
    for schedule_step in list(schedule)[:num_steps]:
        batch = builder.device_batch(schedule_step)
        prompt, opt_state, terms = step(prompt, opt_state, model_state, tiny["method"], batch)
        losses.append({name: float(value) for name, value in terms.items()})
    return losses, np.asarray(prompt)


@pytest.fixture(scope="module")
def single_device_run(tiny):
    return run_steps(tiny, mesh=None)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_mesh_matches_single_device(tiny, single_device_run, shape):
    losses, prompt = run_steps(tiny, make_mesh(*shape))
    expected_losses, expected_prompt = single_device_run

    # Sharded matmuls and reductions sum in another order, so float32 results differ in the
    # last bits. The bounds, 1e-5 relative on the losses and 1e-5 absolute on the prompt,
    # leave room for that. They still catch a real difference, because AdamW moves each
    # prompt coordinate by about 1e-3 per step.
    for step, (got, expected) in enumerate(zip(losses, expected_losses, strict=True)):
        for name in TERMS:
            assert got[name] == pytest.approx(expected[name], rel=1e-5), (step, name)
    np.testing.assert_allclose(prompt, expected_prompt, rtol=0, atol=1e-5)
