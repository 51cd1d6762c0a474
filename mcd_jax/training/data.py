"""Training data: the parallel training set, its text-prompt states, and per-step batches.

The schedule names examples by their index in a parallel set, in which row i is the same query
in every training language. `BatchBuilder` turns a `ScheduleStep` into the arrays that
`mcd_jax.training.step` documents. With several JAX processes each process formats only the
queries that land on its own devices and `jax.make_array_from_process_local_data` assembles the
global batch. Every batch is padded to one run-wide sequence length, so the step compiles once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from mcd_jax.chat import format_chat_batch
from mcd_jax.data.schema import Example
from mcd_jax.method.objective import TextPromptCache
from mcd_jax.method.schedule import ScheduleStep
from mcd_jax.sharding import batch_sharding
from mcd_jax.states import compute_states
from mcd_jax.training.step import StepLayout

TEXT_PROMPT_STATES_FILE = "text_prompt_states.npz"
# Labels of the objective: 0 = harmful, 1 = harmless.
LABEL_VALUES = {"harmful": 0, "harmless": 1}
# Padded lengths are rounded up to this multiple, which suits TPU and GPU tiling.
_PAD_MULTIPLE = 8


@dataclasses.dataclass(frozen=True)
class ParallelTrainingSet:
    """The same queries in every training language, aligned by row.

    Attributes:
        languages: Training language codes, in schedule order.
        texts: Language code to its `n` query texts; row i is one query in every language.
        labels: `[n]` int32, 0 = harmful, 1 = harmless.
        pair_ids: The `n` pair ids that align the rows.
    """

    languages: tuple[str, ...]
    texts: Mapping[str, tuple[str, ...]]
    labels: np.ndarray
    pair_ids: tuple[str, ...]

    @property
    def num_examples(self) -> int:
        """Queries per language, `n`."""
        return len(self.pair_ids)

    def fingerprint(self) -> str:
        """Return a SHA-256 of the languages, texts and labels, for run fingerprints."""
        payload = {
            "languages": list(self.languages),
            "texts": {language: list(self.texts[language]) for language in self.languages},
            "labels": self.labels.tolist(),
        }
        return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def parallel_training_set(
    examples: Sequence[Example], languages: Sequence[str]
) -> ParallelTrainingSet:
    """Align examples by `pair_id` into a parallel set, in the first language's order.

    Args:
        examples: Examples of at least the training languages; others are ignored.
        languages: Training language codes.

    Returns:
        The parallel set.

    Raises:
        ValueError: If a language has no examples, an example has no pair id, a pair id
            repeats within a language, or the languages do not share the same pair ids.
    """
    languages = tuple(languages)
    by_language: dict[str, dict[str, Example]] = {language: {} for language in languages}
    for example in examples:
        if example.language not in by_language:
            continue
        if example.pair_id is None:
            raise ValueError(
                f"training example {example.text!r} ({example.language}) has no pair_id; the "
                "training set must be parallel, with one pair_id per query across languages"
            )
        rows = by_language[example.language]
        if example.pair_id in rows:
            raise ValueError(f"pair_id {example.pair_id!r} repeats in language {example.language}")
        rows[example.pair_id] = example

    first = languages[0]
    pair_ids = tuple(by_language[first])
    for language in languages:
        if not by_language[language]:
            raise ValueError(f"the training data has no examples in language {language!r}")
        missing = sorted(set(pair_ids) - set(by_language[language]))
        extra = sorted(set(by_language[language]) - set(pair_ids))
        if missing or extra:
            raise ValueError(
                f"training languages {first!r} and {language!r} do not contain the same queries: "
                f"{len(missing)} pair ids missing in {language!r} (e.g. {missing[:3]}), "
                f"{len(extra)} extra (e.g. {extra[:3]}); the data must be parallel"
            )

    texts = {
        language: tuple(by_language[language][pair_id].text for pair_id in pair_ids)
        for language in languages
    }
    labels = np.asarray(
        [LABEL_VALUES[by_language[first][pair_id].label] for pair_id in pair_ids], np.int32
    )
    return ParallelTrainingSet(languages, texts, labels, pair_ids)


def load_training_set(dataset: str, languages: Sequence[str]) -> ParallelTrainingSet:
    """Load the training split of `dataset` as a parallel set.

    Args:
        dataset: "builtin" (the project's own parallel set), a benchmark registry name, or a
            JSON Lines, CSV or parquet file with the columns text, language, label, pair_id
            and split, whose "train" rows are used.
        languages: Training language codes.

    Returns:
        The parallel set.

    Raises:
        ValueError: If the data is not parallel over `languages` (see `parallel_training_set`).
        FileNotFoundError: If `dataset` is neither a known name nor an existing file.
    """
    from mcd_jax.data.loaders import ColumnMap, load_builtin, load_file
    from mcd_jax.data.registry import BENCHMARKS, load_benchmark

    if dataset == "builtin":
        examples = load_builtin("train", languages=languages)
    elif dataset in BENCHMARKS:
        examples = load_benchmark(dataset, split="train", languages=languages)
    elif Path(dataset).expanduser().is_file():
        columns = ColumnMap(
            text="text", language="language", label="label", pair_id="pair_id", split="split"
        )
        examples = load_file(
            Path(dataset).expanduser(), columns, languages=languages, splits=["train"]
        )
    else:
        raise FileNotFoundError(
            f"--dataset={dataset!r} is not 'builtin', a registered benchmark "
            f"({', '.join(sorted(BENCHMARKS))}) or an existing file"
        )
    return parallel_training_set(examples, languages)


def text_prompt_states(
    model: Any,
    tokenizer: Any,
    training_set: ParallelTrainingSet,
    text_prompt: str,
    workdir: str | os.PathLike[str],
    *,
    model_id: str,
    batch_size: int = 16,
    mesh: Mesh | None = None,
) -> np.ndarray:
    """Compute the text-prompt states x0 of every training query in every language, once.

    The states are cached in `<workdir>/text_prompt_states.npz` with a key made of the model,
    the data and the text prompt, and reused while the key matches.

    Args:
        model: The frozen transformer.
        tokenizer: Its tokenizer.
        training_set: The parallel training set.
        text_prompt: The text prompt placed in the system slot.
        workdir: The run's work directory.
        model_id: A string that identifies the weights (e.g. a hash), part of the cache key.
        batch_size: Rows per `compute_states` batch.
        mesh: The device mesh, or None.

    Returns:
        `[languages, n, d]` float32 states, in `training_set.languages` order.
    """
    key = hashlib.sha256(
        json.dumps([model_id, training_set.fingerprint(), text_prompt]).encode()
    ).hexdigest()
    path = Path(workdir) / TEXT_PROMPT_STATES_FILE
    if path.is_file():
        try:
            with np.load(path) as archive:
                if str(archive["key"]) == key:
                    logging.info("Reusing the text-prompt states in %s", path)
                    return archive["states"]
            logging.info("Text-prompt states in %s belong to other settings; recomputing", path)
        except (OSError, ValueError, KeyError) as err:
            logging.warning("Text-prompt states in %s are unreadable (%s); recomputing", path, err)

    logging.info(
        "Computing text-prompt states of %d queries in %d languages",
        training_set.num_examples,
        len(training_set.languages),
    )
    # NOTE: the text prompt always sits in the system slot here, also with --placement=prefix.
    # Under several JAX processes this needs `compute_states` to return host arrays from a
    # batch sharded across processes, which no test here runs.
    states = np.stack(
        [
            compute_states(
                model,
                tokenizer,
                training_set.texts[language],
                text_prompt=text_prompt,
                batch_size=batch_size,
                mesh=mesh,
            )
            for language in training_set.languages
        ]
    ).astype(np.float32)
    if jax.process_index() == 0:
        temporary = path.with_name(f".{path.name}.tmp")
        with open(temporary, "wb") as file:
            np.savez(file, states=states, key=np.asarray(key))
        os.replace(temporary, path)
        logging.info("Wrote the text-prompt states to %s", path)
    return states


@dataclasses.dataclass(frozen=True)
class HostCache:
    """A `TextPromptCache` copied to host memory, for gathering batch rows with NumPy."""

    languages: tuple[str, ...]
    refusal_logits: np.ndarray
    harmfulness_logits: np.ndarray
    complement: np.ndarray
    consistency: np.ndarray | None

    @classmethod
    def from_cache(cls, cache: TextPromptCache) -> HostCache:
        """Copy the cache's arrays to NumPy."""
        consistency = None if cache.consistency is None else np.asarray(cache.consistency)
        return cls(
            languages=tuple(cache.languages),
            refusal_logits=np.asarray(cache.refusal_logits),
            harmfulness_logits=np.asarray(cache.harmfulness_logits),
            complement=np.asarray(cache.complement),
            consistency=consistency,
        )


class BatchBuilder:
    """Formats the queries of a schedule step into the step's sharded batch arrays."""

    def __init__(
        self,
        tokenizer: Any,
        training_set: ParallelTrainingSet,
        cache: HostCache,
        *,
        layout: StepLayout,
        soft_prompt_length: int,
        include_consistency: bool,
        placement: str = "system_slot",
        max_length: int | None = None,
        mesh: Mesh | None = None,
    ) -> None:
        """Prepare batches for one run, and fix the padded sequence length.

        Args:
            tokenizer: The model's tokenizer, with a chat template.
            training_set: The parallel training set.
            cache: The run's text-prompt cache, on the host.
            layout: The step layout (see `mcd_jax.training.step`).
            soft_prompt_length: P, the soft prompt's rows.
            include_consistency: Put the cached L_m targets in each batch (MCD with
                text-prompt targets).
            placement: "system_slot" or "prefix".
            max_length: The model's context length.
            mesh: The device mesh, or None for one device.

        Raises:
            ValueError: If the cache's languages differ from the training set's.
        """
        if cache.languages != training_set.languages:
            raise ValueError(
                f"the text-prompt cache has languages {cache.languages}, the training set "
                f"{training_set.languages}; build both from the same training languages"
            )
        self.training_set = training_set
        self.cache = cache
        self.layout = layout
        self.include_consistency = include_consistency and cache.consistency is not None
        self.mesh = mesh
        self._format_options = dict(
            soft_prompt_length=soft_prompt_length, placement=placement, max_length=max_length
        )
        self._tokenizer = tokenizer
        self.seq_length = self._longest_row()
        logging.info("Training batches are padded to %d tokens", self.seq_length)

    def _longest_row(self) -> int:
        longest = 0
        for language in self.training_set.languages:
            batch = format_chat_batch(
                self._tokenizer, self.training_set.texts[language], **self._format_options
            )
            longest = max(longest, int(batch.lengths.max()))
        padded = -(-longest // _PAD_MULTIPLE) * _PAD_MULTIPLE
        max_length = self._format_options["max_length"]
        return padded if max_length is None else min(padded, max_length)

    def _row_languages(self, step: ScheduleStep) -> list[int]:
        """Return the language positions of one query's rows in the model input."""
        if self.layout == "one_language":
            return [self.training_set.languages.index(step.language)]
        return list(range(len(self.training_set.languages)))

    def host_batch(self, step: ScheduleStep, queries: slice | None = None) -> dict[str, np.ndarray]:
        """Build the NumPy arrays of a step's queries (all of them, or a slice).

        Args:
            step: The schedule step.
            queries: The step's queries to build, for this process's share; None for all.

        Returns:
            The batch arrays the step reads, for the selected queries.
        """
        indices = np.asarray(step.example_indices)[queries or slice(None)]
        row_languages = self._row_languages(step)
        languages = self.training_set.languages
        texts = [
            self.training_set.texts[languages[language]][index]
            for index in indices
            for language in row_languages
        ]
        chat = format_chat_batch(
            self._tokenizer, texts, bucket_lengths=[self.seq_length], **self._format_options
        )
        batch = {
            "input_ids": chat.input_ids,
            "attention_mask": chat.attention_mask,
            "position_ids": chat.position_ids,
            "slot_positions": chat.slot_positions,
        }
        batch.update(self._loss_arrays(step, indices))
        return batch

    def _loss_arrays(self, step: ScheduleStep, indices: np.ndarray) -> dict[str, np.ndarray]:
        cache = self.cache
        if self.layout == "all_languages":
            # Query-major loss rows: query q in language l is row q * languages + l.
            num_languages = len(self.training_set.languages)
            queries = np.repeat(indices, num_languages)
            row_languages = np.tile(np.arange(num_languages), len(indices))
        else:
            central = self.training_set.languages.index(step.language)
            queries = indices
            row_languages = np.full(len(indices), central)

        arrays = {
            "labels": self.training_set.labels[queries],
            "refusal_logits": cache.refusal_logits[queries],
            "harmfulness_logits": cache.harmfulness_logits[queries],
            "complement": cache.complement[row_languages, queries],
        }
        if self.include_consistency:
            arrays["consistency"] = cache.consistency[row_languages, queries]
        if self.layout == "central_language":
            arrays["central_index"] = row_languages.astype(np.int32)
        return arrays

    def device_batch(self, step: ScheduleStep) -> dict[str, jax.Array]:
        """Build a step's global batch on the devices; each process formats only its share.

        Args:
            step: The schedule step.

        Returns:
            The batch arrays, sharded on their leading axis over ("data", "fsdp") when there
            is a mesh.
        """
        num_queries = len(step.example_indices)
        if self.mesh is None:
            return {name: jax.numpy.asarray(value) for name, value in self.host_batch(step).items()}

        local = _local_queries(self.mesh, num_queries)
        host = self.host_batch(step, local)
        arrays = {}
        for name, value in host.items():
            rows_per_query = value.shape[0] // (local.stop - local.start)
            global_shape = (num_queries * rows_per_query, *value.shape[1:])
            sharding = batch_sharding(self.mesh, value.ndim)
            arrays[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
        return arrays


def _local_queries(mesh: Mesh, num_queries: int) -> slice:
    """Return the queries of a `[num_queries]` batch that this process's devices hold.

    The batch axis is sharded over ("data", "fsdp"); with the devices of a process adjacent in
    the mesh, they hold one contiguous block of queries.
    """
    sharding = batch_sharding(mesh, 1)
    blocks = sharding.addressable_devices_indices_map((num_queries,)).values()
    starts = [block[0].start or 0 for block in blocks]
    stops = [num_queries if block[0].stop is None else block[0].stop for block in blocks]
    start, stop = min(starts), max(stops)
    held = sum(stop_ - start_ for start_, stop_ in set(zip(starts, stops, strict=True)))
    if held != stop - start:
        raise ValueError(
            f"the devices of process {jax.process_index()} hold queries {sorted(set(starts))} "
            "that are not one contiguous block; build the mesh from jax.devices() in order"
        )
    return slice(start, stop)
