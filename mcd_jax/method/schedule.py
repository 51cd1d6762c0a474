"""Batch schedules over a parallel training set, deterministic and resumable.

Every training language contains the same examples in the same order (harmful and harmless
queries together), so an example index names the same query in every language. Two
schedules are supported:

- `CollaborativeSchedule`, the MCD authors' schedule: the central languages are visited in turn, and
  for each, `epochs_per_language` epochs of shuffled batches run over that language's
  examples. DRO is this schedule with English only, batch 50 and 40 epochs.
- `ParallelSchedule`: each batch contains `batch_size` queries in every training language,
  so one step trains on all languages of a query together. The soft-prompt variant of L_m
  needs such batches.

Each epoch's order is drawn from `(seed, language position, epoch)` alone, so any position
can be restored from a checkpoint without replaying the earlier epochs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import numpy as np

DEFAULT_LANGUAGES = ("en", "da", "ko", "el", "ga")
DEFAULT_BATCH_SIZE = 10
DEFAULT_EPOCHS_PER_LANGUAGE = 5
DEFAULT_SEED = 42
# Five epochs over every language of each query visit each (query, language) pair as often
# as the collaborative schedule's five epochs per language.
DEFAULT_PARALLEL_EPOCHS = 5
DRO_BATCH_SIZE = 50
DRO_EPOCHS = 40


class SchedulePosition(NamedTuple):
    """Position of the next step to run, as stored in a checkpoint.

    `language` is None for the parallel schedule, whose batches contain every language.
    """

    language: str | None
    epoch: int
    batch: int


# eq=False because the generated __eq__ would compare NumPy arrays, which raises.
@dataclasses.dataclass(frozen=True, eq=False)
class ScheduleStep:
    """One training step of a schedule.

    Attributes:
        step: Step number, from 0.
        language: Language of every example in the batch; None in the parallel schedule,
            where the batch contains each example in every training language.
        epoch: Epoch within the current language (or within the run, for the parallel
            schedule), from 0.
        batch_index: Batch within the epoch, from 0.
        example_indices: Indices into the parallel training set, `[batch]` int64; the last
            batch of an epoch is smaller when `drop_last` is False and the batch size does
            not divide the example count.
    """

    step: int
    language: str | None
    epoch: int
    batch_index: int
    example_indices: np.ndarray

    @property
    def position(self) -> SchedulePosition:
        """This step's position, to store in a checkpoint."""
        return SchedulePosition(self.language, self.epoch, self.batch_index)


def _count_examples(languages: tuple[str, ...], num_examples: int | Mapping[str, int]) -> int:
    """Validate the example count(s) of a parallel set and return the shared count."""
    if isinstance(num_examples, Mapping):
        missing = [language for language in languages if language not in num_examples]
        if missing:
            raise ValueError(f"example counts lack languages {missing}; got {dict(num_examples)}")
        counts = {language: int(num_examples[language]) for language in languages}
        if len(set(counts.values())) > 1:
            raise ValueError(
                f"training languages have different example counts {counts}; the schedule "
                "needs parallel data, the same queries in every language"
            )
        num_examples = counts[languages[0]]
    if num_examples < 1:
        raise ValueError(f"num_examples={num_examples} is invalid; the training set is empty")
    return int(num_examples)


@dataclasses.dataclass(frozen=True)
class _Schedule:
    """Shared logic: `num_rounds` rounds of `epochs` epochs of shuffled batches."""

    languages: tuple[str, ...]
    num_examples: int
    batch_size: int
    epochs: int
    seed: int
    drop_last: bool

    def __post_init__(self) -> None:
        if not self.languages:
            raise ValueError("the language list is empty; pass at least one training language")
        if len(set(self.languages)) != len(self.languages):
            raise ValueError(f"languages {self.languages} contain a duplicate")
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs} is invalid; it must be >= 1")
        if not 1 <= self.batch_size <= self.num_examples:
            raise ValueError(
                f"batch_size={self.batch_size} is invalid for {self.num_examples} examples "
                f"per language; choose 1 <= batch_size <= {self.num_examples}"
            )

    @property
    def num_rounds(self) -> int:
        """Rounds of `epochs` epochs each: one per language, or one for all languages."""
        raise NotImplementedError

    def round_language(self, round_index: int) -> str | None:
        """Language of a round's batches, or None when batches hold every language."""
        raise NotImplementedError

    @property
    def batches_per_epoch(self) -> int:
        """Batches in one epoch, counting a smaller last batch unless `drop_last`."""
        if self.drop_last:
            return self.num_examples // self.batch_size
        return math.ceil(self.num_examples / self.batch_size)

    @property
    def num_steps(self) -> int:
        """Total steps of the run."""
        return self.num_rounds * self.epochs * self.batches_per_epoch

    def epoch_order(self, round_index: int, epoch: int) -> np.ndarray:
        """Shuffled example indices of one epoch, `[num_examples]`, drawn from the seed."""
        rng = np.random.default_rng([self.seed, round_index, epoch])
        return rng.permutation(self.num_examples)

    def position_of(self, step: int) -> SchedulePosition:
        """Return the position of a step; `num_steps` maps past the end.

        Raises:
            ValueError: If step is negative or beyond `num_steps`.
        """
        if not 0 <= step <= self.num_steps:
            raise ValueError(f"step {step} is outside the schedule's 0..{self.num_steps} steps")
        round_index, within_round = divmod(step, self.epochs * self.batches_per_epoch)
        epoch, batch = divmod(within_round, self.batches_per_epoch)
        if round_index == self.num_rounds:
            return SchedulePosition(self.round_language(round_index - 1), self.epochs, 0)
        return SchedulePosition(self.round_language(round_index), epoch, batch)

    def step_of(self, position: SchedulePosition | Sequence) -> int:
        """Return the step number of a position (the inverse of `position_of`).

        Raises:
            ValueError: If the language, epoch or batch is not part of this schedule.
        """
        language, epoch, batch = position
        round_index = self._round_of(language)
        past_end = epoch == self.epochs and batch == 0 and round_index == self.num_rounds - 1
        if not past_end and not (0 <= epoch < self.epochs and 0 <= batch < self.batches_per_epoch):
            raise ValueError(
                f"position {tuple(position)} is outside the schedule: epochs run 0.."
                f"{self.epochs - 1} and batches 0..{self.batches_per_epoch - 1}"
            )
        return (round_index * self.epochs + epoch) * self.batches_per_epoch + batch

    def _round_of(self, language: str | None) -> int:
        raise NotImplementedError

    def steps(self, start: int | SchedulePosition = 0) -> Iterator[ScheduleStep]:
        """Iterate over the steps from `start` (a step number or a restored position).

        Raises:
            ValueError: At the call, if `start` is not part of this schedule.
        """
        first = int(start) if isinstance(start, (int, np.integer)) else self.step_of(start)
        self.position_of(first)
        return self._steps_from(first)

    def _steps_from(self, first: int) -> Iterator[ScheduleStep]:
        order = None
        for step in range(first, self.num_steps):
            round_index, within_round = divmod(step, self.epochs * self.batches_per_epoch)
            epoch, batch = divmod(within_round, self.batches_per_epoch)
            if order is None or batch == 0:
                order = self.epoch_order(round_index, epoch)
            yield ScheduleStep(
                step=step,
                language=self.round_language(round_index),
                epoch=epoch,
                batch_index=batch,
                example_indices=order[batch * self.batch_size : (batch + 1) * self.batch_size],
            )

    def __iter__(self) -> Iterator[ScheduleStep]:
        return self.steps()

    def __len__(self) -> int:
        return self.num_steps


@dataclasses.dataclass(frozen=True)
class CollaborativeSchedule(_Schedule):
    """The MCD authors' schedule: central languages in turn, `epochs` epochs each.

    Use `collaborative_schedule` or `dro_schedule` to build one from the defaults.
    """

    @property
    def num_rounds(self) -> int:
        return len(self.languages)

    def round_language(self, round_index: int) -> str | None:
        return self.languages[round_index]

    def _round_of(self, language: str | None) -> int:
        if language not in self.languages:
            raise ValueError(f"language {language!r} is not in the schedule's {self.languages}")
        return self.languages.index(language)


@dataclasses.dataclass(frozen=True)
class ParallelSchedule(_Schedule):
    """Batches of `batch_size` queries, each query in every training language.

    A step has `batch_size * len(languages)` rows. Use `parallel_schedule` to build one.
    """

    @property
    def num_rounds(self) -> int:
        return 1

    def round_language(self, round_index: int) -> str | None:
        return None

    def _round_of(self, language: str | None) -> int:
        if language is not None:
            raise ValueError(
                f"the parallel schedule's positions have language None; got {language!r}"
            )
        return 0


def collaborative_schedule(
    num_examples: int | Mapping[str, int],
    languages: Sequence[str] = DEFAULT_LANGUAGES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    epochs_per_language: int = DEFAULT_EPOCHS_PER_LANGUAGE,
    seed: int = DEFAULT_SEED,
    drop_last: bool = False,
) -> CollaborativeSchedule:
    """Build the MCD authors' schedule (500 steps for 200 examples per language).

    Args:
        num_examples: Examples per language, or a map from language to its count, which
            must be equal for all languages.
        languages: Central languages in the order they are visited.
        batch_size: Examples per batch.
        epochs_per_language: Epochs over each language before moving to the next.
        seed: Seed of every epoch's shuffle.
        drop_last: Skip each epoch's smaller last batch, so every batch has one shape.

    Returns:
        The schedule.

    Raises:
        ValueError: If the languages are empty or repeated, the counts differ between
            languages, the epochs are below 1, or the batch size exceeds the data.
    """
    languages = tuple(languages)
    count = _count_examples(languages, num_examples) if languages else 0
    return CollaborativeSchedule(languages, count, batch_size, epochs_per_language, seed, drop_last)


def dro_schedule(
    num_examples: int,
    batch_size: int = DRO_BATCH_SIZE,
    epochs: int = DRO_EPOCHS,
    seed: int = DEFAULT_SEED,
    drop_last: bool = False,
) -> CollaborativeSchedule:
    """Build the DRO schedule: English only (160 steps for 200 examples).

    Args and errors are those of `collaborative_schedule`.
    """
    return collaborative_schedule(num_examples, ("en",), batch_size, epochs, seed, drop_last)


def parallel_schedule(
    num_examples: int | Mapping[str, int],
    languages: Sequence[str] = DEFAULT_LANGUAGES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    epochs: int = DEFAULT_PARALLEL_EPOCHS,
    seed: int = DEFAULT_SEED,
    drop_last: bool = False,
) -> ParallelSchedule:
    """Build the schedule that puts every language of a query in one batch.

    Args:
        num_examples: Examples per language, or a map from language to its count.
        languages: Training languages, in the order of each batch's language axis.
        batch_size: Queries per batch; a step has `batch_size * len(languages)` rows.
        epochs: Epochs over the queries.
        seed: Seed of every epoch's shuffle.
        drop_last: Skip each epoch's smaller last batch.

    Returns:
        The schedule.

    Raises:
        ValueError: As `collaborative_schedule` raises.
    """
    languages = tuple(languages)
    count = _count_examples(languages, num_examples) if languages else 0
    return ParallelSchedule(languages, count, batch_size, epochs, seed, drop_last)
