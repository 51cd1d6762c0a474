"""Batch schedules: step counts, language order, coverage, determinism and resume."""

import itertools

import numpy as np
import pytest

from mcd_jax.method.schedule import (
    DEFAULT_LANGUAGES,
    SchedulePosition,
    collaborative_schedule,
    dro_schedule,
    parallel_schedule,
)


def _as_tuples(steps):
    return [
        (s.step, s.language, s.epoch, s.batch_index, tuple(s.example_indices.tolist()))
        for s in steps
    ]


def test_reference_step_counts():
    assert len(collaborative_schedule(200)) == 500
    assert len(list(collaborative_schedule(200))) == 500
    assert len(dro_schedule(200)) == 160
    assert len(list(dro_schedule(200))) == 160
    assert len(parallel_schedule(200)) == 100


def test_step_count_with_partial_last_batch():
    schedule = collaborative_schedule(205, languages=("en", "da"), batch_size=10)
    assert schedule.batches_per_epoch == 21
    assert len(schedule) == 2 * 5 * 21
    last_batches = [s for s in schedule if s.batch_index == 20]
    assert all(len(s.example_indices) == 5 for s in last_batches)

    dropped = collaborative_schedule(205, languages=("en", "da"), batch_size=10, drop_last=True)
    assert len(dropped) == 2 * 5 * 20
    assert all(len(s.example_indices) == 10 for s in dropped)


def test_languages_are_visited_in_turn():
    steps = list(collaborative_schedule(200))
    languages = [language for language, _ in itertools.groupby(s.language for s in steps)]
    assert languages == list(DEFAULT_LANGUAGES)
    for block, language in enumerate(DEFAULT_LANGUAGES):
        block_steps = steps[block * 100 : (block + 1) * 100]
        assert {s.language for s in block_steps} == {language}
        assert [s.epoch for s in block_steps] == [e for e in range(5) for _ in range(20)]


def test_steps_are_numbered_in_order():
    steps = list(collaborative_schedule(200))
    assert [s.step for s in steps] == list(range(500))


@pytest.mark.parametrize("num_examples", [200, 37])
def test_every_example_once_per_epoch(num_examples):
    schedule = collaborative_schedule(num_examples, languages=("en", "ko"), batch_size=10)
    epochs = {}
    for step in schedule:
        epochs.setdefault((step.language, step.epoch), []).extend(step.example_indices.tolist())
    assert len(epochs) == 2 * 5
    for key, indices in epochs.items():
        assert sorted(indices) == list(range(num_examples)), key


def test_epochs_are_shuffled_differently():
    schedule = collaborative_schedule(200, languages=("en",))
    orders = [
        np.concatenate([s.example_indices for s in schedule if s.epoch == e]) for e in range(5)
    ]
    assert not np.array_equal(orders[0], np.arange(200))
    assert not np.array_equal(orders[0], orders[1])


def test_schedule_is_deterministic_under_seed():
    first = _as_tuples(collaborative_schedule(200, seed=42))
    again = _as_tuples(collaborative_schedule(200, seed=42))
    other = _as_tuples(collaborative_schedule(200, seed=7))
    assert first == again
    assert first != other


@pytest.mark.parametrize("resume_step", [0, 1, 137, 300, 499, 500])
def test_resume_equals_uninterrupted_run(resume_step):
    schedule = collaborative_schedule(200)
    full = _as_tuples(schedule)
    position = schedule.position_of(resume_step)

    # A restored schedule object is rebuilt from the same settings, as after a restart.
    restored = collaborative_schedule(200)
    assert _as_tuples(restored.steps(position)) == full[resume_step:]
    assert _as_tuples(restored.steps(resume_step)) == full[resume_step:]


def test_position_round_trips_for_every_step():
    schedule = collaborative_schedule(45, languages=("en", "da", "ga"), batch_size=10)
    for step in schedule:
        assert schedule.position_of(step.step) == step.position
        assert schedule.step_of(step.position) == step.step
    end = schedule.position_of(len(schedule))
    assert schedule.step_of(end) == len(schedule)
    assert list(schedule.steps(end)) == []


def test_position_of_middle_step():
    schedule = collaborative_schedule(200)
    assert schedule.position_of(250) == SchedulePosition("ko", 2, 10)
    assert schedule.step_of(("ko", 2, 10)) == 250


def test_dro_schedule_is_english_only():
    steps = list(dro_schedule(200))
    assert {s.language for s in steps} == {"en"}
    assert {len(s.example_indices) for s in steps} == {50}
    assert steps[-1].epoch == 39


def test_parallel_schedule_covers_queries_each_epoch():
    schedule = parallel_schedule(200)
    steps = list(schedule)
    assert {s.language for s in steps} == {None}
    assert schedule.languages == DEFAULT_LANGUAGES
    for epoch in range(5):
        indices = np.concatenate([s.example_indices for s in steps if s.epoch == epoch])
        assert sorted(indices.tolist()) == list(range(200))


def test_parallel_schedule_resumes():
    schedule = parallel_schedule(200, seed=3)
    full = _as_tuples(schedule)
    position = SchedulePosition(None, 2, 7)
    assert _as_tuples(schedule.steps(position)) == full[schedule.step_of(position) :]
    assert schedule.step_of(position) == 47


def test_counts_per_language_must_match():
    counts = dict.fromkeys(DEFAULT_LANGUAGES, 200)
    assert len(collaborative_schedule(counts)) == 500
    with pytest.raises(ValueError, match="different example counts"):
        collaborative_schedule({**counts, "ko": 199})
    with pytest.raises(ValueError, match=r"lack languages \['ga'\]"):
        collaborative_schedule({key: 200 for key in DEFAULT_LANGUAGES[:-1]})


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: collaborative_schedule(20, batch_size=21), "batch_size=21 is invalid"),
        (lambda: collaborative_schedule(20, batch_size=0), "batch_size=0 is invalid"),
        (lambda: collaborative_schedule(20, epochs_per_language=0), "epochs=0 is invalid"),
        (lambda: collaborative_schedule(20, languages=()), "language list is empty"),
        (lambda: parallel_schedule(20, languages=[]), "language list is empty"),
        (lambda: collaborative_schedule(20, languages=("en", "en")), "duplicate"),
        (lambda: collaborative_schedule(0), "training set is empty"),
        (lambda: dro_schedule(40), "batch_size=50 is invalid"),
    ],
)
def test_schedule_rejects_bad_settings(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(
    ("position", "message"),
    [
        (("xx", 0, 0), "'xx' is not in the schedule"),
        (("da", 5, 1), "outside the schedule"),
        (("da", 0, 20), "outside the schedule"),
        ((None, 0, 0), "not in the schedule"),
    ],
)
def test_schedule_rejects_bad_positions(position, message):
    with pytest.raises(ValueError, match=message):
        collaborative_schedule(200).steps(SchedulePosition(*position))


def test_schedule_rejects_out_of_range_step():
    with pytest.raises(ValueError, match="outside the schedule"):
        collaborative_schedule(200).position_of(501)
