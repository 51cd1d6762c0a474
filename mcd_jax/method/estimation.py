"""The estimation stage: the transform and both probes, fitted to the frozen model's own behaviour.

Before training, MCD measures where the model's last-position states `h(x)` of an anchor set of
harmful and harmless queries lie, and how the model actually responds to them:

1. `h` of every anchor query under four prompt conditions in the system slot: no prompt, the
   default text prompt, the short text prompt and a paraphrase of the short one.
2. PCA with m components on all those states, completed to an orthonormal basis: the transform.
3. Responses generated per (query, condition) and judged by a refusal judge. The refusal label
   is the compliance rate, the fraction of judged responses that did not refuse.
4. The refusal probe on `T(h)[:m]` with the compliance rates, and the harmfulness probe on the
   same coordinates with 0 = harmful, 1 = harmless, both K-fold averaged.

Everything is written to `<workdir>/estimation/`, with `record.json` written last. That record
names the model, the anchor data, the judge and the settings. A later run reuses the artifacts
only when its record is equal, and recomputes them otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from mcd_jax.data import (
    BENCHMARKS,
    HARMFUL,
    HARMLESS,
    ColumnMap,
    Example,
    load_benchmark,
    load_builtin,
    load_file,
)
from mcd_jax.generation import default_stop_token_ids, generate
from mcd_jax.judge import KeywordRefusalJudge, RefusalJudge, Verdict
from mcd_jax.method.probes import LinearProbe, ProbeFit, ProbeTrainingConfig, fit_probe
from mcd_jax.method.transform import Transform, fit_transform
from mcd_jax.models.loading import LoadedModel
from mcd_jax.prompts import (
    DEFAULT_TEXT_PROMPT,
    PARAPHRASED_SHORT_TEXT_PROMPT,
    SHORT_TEXT_PROMPT,
)
from mcd_jax.sampling import SamplingConfig
from mcd_jax.states import compute_states
from mcd_jax.training.config import EstimationConfig, TrainConfig, estimation_problems

ESTIMATION_SUBDIR = "estimation"
RECORD_FILE = "record.json"
TRANSFORM_FILE = "transform.npz"
REFUSAL_PROBE_FILE = "refusal_probe.npz"
HARMFULNESS_PROBE_FILE = "harmfulness_probe.npz"
STATES_FILE = "states.npz"
LABELS_FILE = "labels.jsonl"
RESPONSES_FILE = "responses.jsonl"
SUMMARY_FILE = "summary.json"

# Decoding of sampled refusal labels in the reference code.
SAMPLED_TEMPERATURE = 1.0
SAMPLED_TOP_P = 0.9
SAMPLED_TOP_K = 50


@dataclasses.dataclass(frozen=True)
class PromptCondition:
    """One system-slot setting under which the anchor states and responses are computed.

    Attributes:
        name: a short identifier used in logs and artifacts, e.g. "short".
        text_prompt: the text prompt in the system slot; None leaves the system slot empty.
    """

    name: str
    text_prompt: str | None


PROMPT_CONDITIONS: tuple[PromptCondition, ...] = (
    PromptCondition("none", None),
    PromptCondition("default", DEFAULT_TEXT_PROMPT),
    PromptCondition("short", SHORT_TEXT_PROMPT),
    PromptCondition("paraphrase", PARAPHRASED_SHORT_TEXT_PROMPT),
)


@dataclasses.dataclass(frozen=True)
class EstimationSettings:
    """Settings of the estimation stage, with the reference code's defaults.

    Attributes:
        dataset: where the anchor set comes from: "builtin" (the project's own dataset), a
            benchmark name of `mcd_jax.data.BENCHMARKS`, or the path of a data file.
        split: the dataset split of the anchor set.
        languages: language codes of the anchor queries.
        anchors_per_label: keep only the first this many harmful and the first this many
            harmless queries; None keeps all.
        conditions: the prompt conditions, each with its own states and labels.
        num_components: PCA components m that span the safety subspace.
        basis_seed: None for the deterministic Householder completion of the PCA basis, or
            the seed of a random completion as in the reference code (see `complete_basis`).
        labels: how many responses are generated per (query, condition), how long they may
            be, how many of the longest are judged, and sampled or greedy decoding.
        sampling_seed: PRNG seed of sampled responses.
        probe: training settings of both probes.
        batch_size: rows per compiled batch for states and generation. It is not part of
            the artifact record, because it changes only the speed and, for sampled
            responses, which random draws each row gets.
    """

    dataset: str = "builtin"
    split: str = "train"
    languages: tuple[str, ...] = ("en",)
    anchors_per_label: int | None = None
    conditions: tuple[PromptCondition, ...] = PROMPT_CONDITIONS
    num_components: int = 4
    basis_seed: int | None = None
    labels: EstimationConfig = EstimationConfig()
    sampling_seed: int = 42
    probe: ProbeTrainingConfig = ProbeTrainingConfig()
    batch_size: int = 16

    def __post_init__(self) -> None:
        problems = list(estimation_problems(self.labels))
        if self.labels.label_decoding not in ("greedy", "sampled"):
            problems.append(
                f"label_decoding={self.labels.label_decoding!r} is not 'greedy' or 'sampled'"
            )
        if not self.languages:
            problems.append("languages is empty; give at least one anchor language code")
        if self.anchors_per_label is not None and self.anchors_per_label < 1:
            problems.append(f"anchors_per_label={self.anchors_per_label} must be >= 1 or None")
        names = [condition.name for condition in self.conditions]
        if not names or len(set(names)) != len(names):
            problems.append(f"conditions need distinct names and at least one; got {names}")
        if self.num_components < 1:
            problems.append(f"num_components={self.num_components} must be >= 1")
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size} must be >= 1")
        if problems:
            raise ValueError("invalid estimation settings:\n  " + "\n  ".join(problems))

    @classmethod
    def from_train_config(cls, config: TrainConfig, batch_size: int = 16) -> EstimationSettings:
        """Take the estimation settings of a training run's configuration.

        Args:
            config: the run's configuration; its data, method, estimation and schedule
                sections are read.
            batch_size: rows per compiled batch for states and generation.

        Returns:
            The settings, with the four reference prompt conditions.
        """
        return cls(
            dataset=config.data.dataset,
            languages=tuple(config.data.anchor_languages),
            anchors_per_label=config.data.anchors_per_label,
            num_components=config.method.num_components,
            labels=dataclasses.replace(config.estimation, artifacts=None),
            sampling_seed=config.schedule.seed,
            probe=dataclasses.replace(ProbeTrainingConfig(), num_folds=config.method.probe_folds),
            batch_size=batch_size,
        )

    def sampling_config(self, stop_token_ids: Sequence[int]) -> SamplingConfig:
        """Return the decoding settings of the refusal-label responses."""
        if self.labels.label_decoding == "greedy":
            return SamplingConfig(
                max_new_tokens=self.labels.label_max_new_tokens,
                temperature=0.0,
                stop_token_ids=tuple(stop_token_ids),
            )
        return SamplingConfig(
            max_new_tokens=self.labels.label_max_new_tokens,
            temperature=SAMPLED_TEMPERATURE,
            top_k=SAMPLED_TOP_K,
            top_p=SAMPLED_TOP_P,
            seed=self.sampling_seed,
            stop_token_ids=tuple(stop_token_ids),
        )

    def to_record(self) -> dict[str, Any]:
        """Return the settings that change the artifacts, as JSON-compatible values."""
        record = dataclasses.asdict(self)
        del record["batch_size"]
        # A folder of precomputed artifacts replaces this stage, so it is not one of its inputs.
        record["labels"].pop("artifacts", None)
        return _json_values(record)


def settings_from_config(config: TrainConfig, batch_size: int = 16) -> EstimationSettings:
    """Return `EstimationSettings.from_train_config(config, batch_size)`."""
    return EstimationSettings.from_train_config(config, batch_size)


@dataclasses.dataclass(frozen=True)
class EstimationResult:
    """The transform and probes that the trainer reads, with the measured anchor states and labels.

    Attributes:
        transform: the fitted transform T.
        refusal_probe: the averaged refusal probe f_r, weight `[m]`, bias `[]`.
        harmfulness_probe: the averaged harmfulness probe f_h, weight `[m]`, bias `[]`.
        states: anchor states under each condition, `[conditions, n, d]` float32.
        compliance: compliance rate per condition and query, `[conditions, n]`; NaN where no
            response was judged.
        anchors: the n anchor queries, in the row order of `states`.
        summary: the content of `summary.json`: label statistics, explained variance ratios
            and the probes' held-out accuracy.
        directory: the folder with the artifacts.
        reused: True when the artifacts of an earlier run were loaded instead of computed.
    """

    transform: Transform
    refusal_probe: LinearProbe
    harmfulness_probe: LinearProbe
    states: np.ndarray
    compliance: np.ndarray
    anchors: tuple[Example, ...]
    summary: dict[str, Any]
    directory: Path
    reused: bool


class DegenerateLabelsError(ValueError):
    """The model refused none, or all, of the anchors, so the refusal probe has no direction."""


@dataclasses.dataclass(frozen=True)
class _Responses:
    """Judged responses of one condition; lists are indexed [query][sample]."""

    texts: list[list[str]]
    num_tokens: list[list[int]]
    stopped: list[list[bool]]
    kept: list[list[bool]]
    verdicts: list[list[Verdict | None]]


def run_estimation(
    loaded: LoadedModel,
    config: EstimationSettings,
    workdir: str | os.PathLike[str],
    *,
    judge: RefusalJudge | None = None,
    mesh: Mesh | None = None,
    anchors: Sequence[Example] | None = None,
) -> EstimationResult:
    """Fit the transform and both probes, or load them from an earlier run with equal inputs.

    Every process runs this function under multi-host JAX. Only process 0 writes files, and
    the work directory must be on a file system that every process reads.

    Args:
        loaded: the frozen chat model with its tokenizer and source record.
        config: the estimation settings.
        workdir: the run's work directory; artifacts go to `<workdir>/estimation/`.
        judge: the refusal judge; `KeywordRefusalJudge()` when None.
        mesh: a ("data", "fsdp", "tensor") mesh for states and generation.
        anchors: the anchor set; when None, the one `config` names is loaded.

    Returns:
        The transform, the probes, the anchor states and labels, and the summary.

    Raises:
        ValueError: the anchor set lacks harmful or harmless queries, or the model has no
            tokenizer.
        DegenerateLabelsError: the model refused none, or all, of the anchors under every
            condition, or no response could be judged.
    """
    if loaded.tokenizer is None:
        raise ValueError(
            f"model {_describe_model(loaded.source)} has no tokenizer; estimation needs its "
            "chat template. Add the tokenizer files to the model folder."
        )
    judge = KeywordRefusalJudge() if judge is None else judge
    anchors_given = anchors is not None
    anchors = tuple(load_anchors(config) if anchors is None else anchors)
    _check_anchors(anchors)
    record = estimation_record(loaded, anchors, config, judge, anchors_passed=anchors_given)
    directory = Path(workdir) / ESTIMATION_SUBDIR

    reused = _agree_across_processes(_load_if_recorded(directory, record, anchors))
    if reused is not None:
        return reused

    started = time.perf_counter()
    logging.info(
        "Estimation of %s on %d anchors x %d conditions",
        _describe_model(loaded.source),
        len(anchors),
        len(config.conditions),
    )
    result = _estimate(loaded, config, anchors, judge, mesh, directory, record)
    logging.info("Estimation finished in %.1f s", time.perf_counter() - started)
    return result


def _estimate(
    loaded: LoadedModel,
    config: EstimationSettings,
    anchors: tuple[Example, ...],
    judge: RefusalJudge,
    mesh: Mesh | None,
    directory: Path,
    record: dict[str, Any],
) -> EstimationResult:
    states = _condition_states(loaded, config, anchors, mesh)

    with _stage("PCA", f"{states.shape[0] * states.shape[1]} states, m={config.num_components}"):
        transform = fit_transform(
            states.reshape(-1, states.shape[-1]), config.num_components, config.basis_seed
        )
    ratios = np.asarray(transform.explained_variance_ratio).tolist()
    logging.info("Explained variance ratios of the %d components: %s", len(ratios), ratios)

    responses = [
        _condition_responses(loaded, config, anchors, condition, judge, mesh)
        for condition in config.conditions
    ]
    compliance = np.asarray([_compliance_rates(r) for r in responses], np.float32)
    label_stats = _label_statistics(config.conditions, anchors, responses, compliance)
    _check_labels(compliance, label_stats, loaded.source, record["data"])

    refusal_fit, harmfulness_fit = _fit_probes(transform, states, compliance, anchors, config)
    summary = {
        "labels": label_stats,
        "explained_variance_ratio": ratios,
        "refusal_probe": _fit_summary(refusal_fit),
        "harmfulness_probe": _fit_summary(harmfulness_fit),
        "batch_size": config.batch_size,
    }
    result = EstimationResult(
        transform=transform,
        refusal_probe=refusal_fit.probe,
        harmfulness_probe=harmfulness_fit.probe,
        states=states,
        compliance=compliance,
        anchors=anchors,
        summary=summary,
        directory=directory,
        reused=False,
    )
    if jax.process_index() == 0:
        with _stage("Writing artifacts", str(directory)):
            _write_artifacts(result, config.conditions, responses, record)
    _sync_processes("mcd_jax_estimation_written")
    return result


def load_anchors(config: EstimationSettings) -> list[Example]:
    """Load the anchor set that `config` names.

    Returns:
        The anchor queries, harmful and harmless, in file order; with `anchors_per_label`
        set, only the first that many of each label.

    Raises:
        FileNotFoundError: the dataset is neither "builtin", a benchmark name nor a file.
    """
    if config.dataset == "builtin":
        examples = load_builtin(config.split, languages=config.languages)
    elif config.dataset in BENCHMARKS:
        examples = load_benchmark(config.dataset, split=config.split, languages=config.languages)
    elif Path(config.dataset).expanduser().is_file():
        columns = ColumnMap(
            text="text", language="language", label="label", pair_id="pair_id", split="split"
        )
        examples = load_file(
            Path(config.dataset).expanduser(),
            columns,
            languages=config.languages,
            splits=[config.split],
        )
    else:
        raise FileNotFoundError(
            f"anchor dataset {config.dataset!r} is not 'builtin', a benchmark name "
            f"({', '.join(sorted(BENCHMARKS))}) or an existing file"
        )
    if config.anchors_per_label is None:
        return list(examples)
    harmful = [example for example in examples if example.label == HARMFUL]
    harmless = [example for example in examples if example.label == HARMLESS]
    limit = config.anchors_per_label
    kept = {id(example) for example in harmful[:limit] + harmless[:limit]}
    return [example for example in examples if id(example) in kept]


def _check_anchors(anchors: Sequence[Example]) -> None:
    counts = {label: sum(a.label == label for a in anchors) for label in (HARMFUL, HARMLESS)}
    if min(counts.values()) == 0:
        raise ValueError(
            f"the anchor set has {counts[HARMFUL]} harmful and {counts[HARMLESS]} harmless "
            "queries; estimation needs both. Choose other anchor languages or another dataset."
        )


def estimation_record(
    loaded: LoadedModel,
    anchors: Sequence[Example],
    config: EstimationSettings,
    judge: RefusalJudge,
    *,
    anchors_passed: bool = False,
) -> dict[str, Any]:
    """Describe everything the artifacts depend on, as JSON-compatible values.

    Args:
        loaded: the model; its source record, weight dtype and a content hash are recorded.
        anchors: the anchor set; its size, labels and a SHA-256 of its rows are recorded.
        config: the settings.
        judge: the refusal judge; its class and covered languages are recorded.
        anchors_passed: True when the caller passed the anchors instead of `config` naming
            their dataset.

    Returns:
        The record with the sections "model", "data", "judge" and "settings".
    """
    # NOTE: a judge is identified by its class and covered languages only; editing the
    # phrase tables of a judge class does not invalidate earlier labels.
    judge_record = {
        "class": f"{type(judge).__module__}.{type(judge).__qualname__}",
        "covered_languages": sorted(judge.covered_languages),
    }
    return _json_values(
        {
            "model": model_record(loaded),
            "data": data_record(anchors, None if anchors_passed else config),
            "judge": judge_record,
            "settings": config.to_record(),
        }
    )


def model_record(loaded: LoadedModel) -> dict[str, Any]:
    """Return the model's source record with its weight dtype and a content hash.

    GGUF and packaged models carry the SHA-256 of their file. For a folder or hub snapshot,
    the hash covers the file names, sizes and modification times of the folder, because
    hashing the weights of a large model would take minutes.
    """
    record = {**loaded.source, "dtype": str(loaded.model.dtype)}
    if "sha256" not in record and "path" in record and Path(record["path"]).is_dir():
        record["listing_sha256"] = _listing_sha256(Path(record["path"]))
    return record


def _listing_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest.update(
                f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode()
            )
    return digest.hexdigest()


def data_record(anchors: Sequence[Example], config: EstimationSettings | None) -> dict[str, Any]:
    """Return where the anchor set came from, its counts and a SHA-256 of its rows.

    Args:
        anchors: the anchor set.
        config: the settings that named its dataset and split; None for anchors passed in.
    """
    digest = hashlib.sha256()
    for example in anchors:
        row = [example.text, example.language, example.label, example.pair_id]
        digest.update(json.dumps(row, ensure_ascii=False).encode())
        digest.update(b"\n")
    return {
        "dataset": "anchors passed to run_estimation" if config is None else config.dataset,
        "split": None if config is None else config.split,
        "sources": sorted({example.source for example in anchors}),
        "languages": sorted({example.language for example in anchors}),
        "harmful": sum(example.label == HARMFUL for example in anchors),
        "harmless": sum(example.label == HARMLESS for example in anchors),
        "sha256": digest.hexdigest(),
    }


def _condition_states(
    loaded: LoadedModel,
    config: EstimationSettings,
    anchors: Sequence[Example],
    mesh: Mesh | None,
) -> np.ndarray:
    """Compute `h` of every anchor under every condition, `[conditions, n, d]`."""
    queries = [example.text for example in anchors]
    states = []
    for condition in config.conditions:
        with _stage(f"States under condition {condition.name!r}", f"{len(queries)} queries"):
            states.append(
                compute_states(
                    loaded.model,
                    loaded.tokenizer,
                    queries,
                    text_prompt=condition.text_prompt,
                    batch_size=config.batch_size,
                    mesh=mesh,
                )
            )
    return np.stack(states).astype(np.float32)


def _condition_responses(
    loaded: LoadedModel,
    config: EstimationSettings,
    anchors: Sequence[Example],
    condition: PromptCondition,
    judge: RefusalJudge,
    mesh: Mesh | None,
) -> _Responses:
    """Generate, select and judge the responses of one condition."""
    samples = config.labels.label_samples
    queries = [example.text for example in anchors for _ in range(samples)]
    sampling = config.sampling_config(default_stop_token_ids(loaded.tokenizer))
    detail = f"{len(anchors)} queries x {samples} samples, {sampling.max_new_tokens} new tokens"
    with _stage(f"Generation under condition {condition.name!r}", detail):
        generated = generate(
            loaded.model,
            loaded.tokenizer,
            queries,
            sampling=sampling,
            text_prompt=condition.text_prompt,
            batch_size=config.batch_size,
            mesh=mesh,
        )

    texts = _per_query(generated.texts, samples)
    num_tokens = _per_query([len(ids) for ids in generated.token_ids], samples)
    kept = [_longest(lengths, config.labels.label_keep_longest) for lengths in num_tokens]

    kept_texts = [
        t
        for row, keep in zip(texts, kept, strict=True)
        for t, k in zip(row, keep, strict=True)
        if k
    ]
    kept_languages = [
        example.language for example, keep in zip(anchors, kept, strict=True) for k in keep if k
    ]
    with _stage(f"Judging under condition {condition.name!r}", f"{len(kept_texts)} responses"):
        judged = judge.judge(kept_texts, kept_languages)
    if len(judged) != len(kept_texts):
        raise ValueError(
            f"judge {type(judge).__qualname__} returned {len(judged)} verdicts for "
            f"{len(kept_texts)} responses; a RefusalJudge returns one verdict per response"
        )
    kept_verdicts = iter(judged)
    verdicts = [[next(kept_verdicts) if k else None for k in keep] for keep in kept]
    return _Responses(
        texts=texts,
        num_tokens=num_tokens,
        stopped=_per_query(generated.stopped, samples),
        kept=kept,
        verdicts=verdicts,
    )


def _per_query(values: Sequence[Any], samples: int) -> list[list[Any]]:
    return [list(values[start : start + samples]) for start in range(0, len(values), samples)]


def _longest(lengths: Sequence[int], keep: int) -> list[bool]:
    """Mark the `keep` longest responses; among equal lengths the earlier samples win."""
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    chosen = set(order[:keep])
    return [index in chosen for index in range(len(lengths))]


def _compliance_rates(responses: _Responses) -> list[float]:
    """Return the fraction of judged, kept responses that complied; NaN with none judged."""
    rates = []
    for verdicts in responses.verdicts:
        judged = [v.refused for v in verdicts if v is not None and v.refused is not None]
        rates.append(float("nan") if not judged else 1.0 - sum(judged) / len(judged))
    return rates


def _label_statistics(
    conditions: Sequence[PromptCondition],
    anchors: Sequence[Example],
    responses: Sequence[_Responses],
    compliance: np.ndarray,
) -> dict[str, Any]:
    """Count refusals and compliance per condition, overall and per anchor label."""
    statistics: dict[str, Any] = {}
    for condition, condition_responses, rates in zip(
        conditions, responses, compliance, strict=True
    ):
        per_label = {}
        for label in ("all", HARMFUL, HARMLESS):
            rows = [i for i, a in enumerate(anchors) if label in ("all", a.label)]
            per_label[label] = _counts([condition_responses.verdicts[i] for i in rows], rates[rows])
        statistics[condition.name] = per_label
    return statistics


def _counts(verdicts: Sequence[Sequence[Verdict | None]], rates: np.ndarray) -> dict[str, Any]:
    refused = [v.refused for row in verdicts for v in row if v is not None]
    judged = [r for r in refused if r is not None]
    labelled = rates[~np.isnan(rates)]
    return {
        "queries": len(verdicts),
        "kept_responses": len(refused),
        "judged_responses": len(judged),
        "unjudged_responses": len(refused) - len(judged),
        "refused_responses": int(sum(judged)),
        "refusal_rate": float(np.mean(judged)) if judged else None,
        "labelled_queries": int(labelled.size),
        "dropped_queries": int(rates.size - labelled.size),
        "mean_compliance": float(labelled.mean()) if labelled.size else None,
    }


def _check_labels(
    compliance: np.ndarray,
    label_stats: Mapping[str, Any],
    model_source: Mapping[str, Any],
    data: Mapping[str, Any],
) -> None:
    """Warn about dropped queries and raise when the refusal labels cannot fit a probe."""
    for name, stats in label_stats.items():
        dropped = stats["all"]["dropped_queries"]
        if dropped:
            logging.warning(
                "Condition %r: %d of %d anchor queries have no judged response and are left "
                "out of the refusal probe (%d responses unjudged)",
                name,
                dropped,
                stats["all"]["queries"],
                stats["all"]["unjudged_responses"],
            )

    labelled = compliance[~np.isnan(compliance)]
    if labelled.size and labelled.min() != labelled.max():
        return
    if labelled.size == 0:
        outcome = "produced no response the judge could judge"
    elif labelled[0] == 1.0:
        outcome = "refused none of the anchor queries"
    elif labelled[0] == 0.0:
        outcome = "refused all of the anchor queries"
    else:
        outcome = f"refused the same fraction ({1.0 - labelled[0]:.3f}) for every anchor query"
    counts = "; ".join(
        f"{name}: {s['all']['refused_responses']} refused of {s['all']['judged_responses']} "
        f"judged responses ({s[HARMFUL]['refused_responses']} of "
        f"{s[HARMFUL]['judged_responses']} harmful, {s[HARMLESS]['refused_responses']} of "
        f"{s[HARMLESS]['judged_responses']} harmless), {s['all']['unjudged_responses']} unjudged"
        for name, s in label_stats.items()
    )
    dataset = data["dataset"] if data["split"] is None else f"{data['dataset']} {data['split']}"
    raise DegenerateLabelsError(
        f"model {_describe_model(model_source)} {outcome} under every prompt condition, so the "
        f"refusal probe cannot be estimated. Data: {dataset}, "
        f"languages {data['languages']}, {data['harmful']} harmful and {data['harmless']} "
        f"harmless queries. Counts per condition: {counts}. Use a chat model with safety "
        "tuning, more or more clearly harmful anchor queries, sampled decoding with more "
        "samples, or a longer --label_max_new_tokens."
    )


def _describe_model(source: Mapping[str, Any]) -> str:
    fields = ("kind", "name", "hub_id", "revision", "path", "sha256")
    return "{" + ", ".join(f"{key}={source[key]}" for key in fields if source.get(key)) + "}"


def _fit_probes(
    transform: Transform,
    states: np.ndarray,
    compliance: np.ndarray,
    anchors: Sequence[Example],
    config: EstimationSettings,
) -> tuple[ProbeFit, ProbeFit]:
    """Fit the refusal probe on labelled rows and the harmfulness probe on every row."""
    features = np.asarray(transform.safety(states.reshape(-1, states.shape[-1])))
    rates = compliance.reshape(-1)
    labelled = ~np.isnan(rates)
    harmless = np.asarray([a.label == HARMLESS for a in anchors], np.float32)
    harmless = np.tile(harmless, len(config.conditions))

    with _stage("Refusal probe", f"{int(labelled.sum())} labelled states"):
        refusal = fit_probe(features[labelled], rates[labelled], config.probe)
    with _stage("Harmfulness probe", f"{len(harmless)} states"):
        harmfulness = fit_probe(features, harmless, config.probe)
    return refusal, harmfulness


def _fit_summary(fit: ProbeFit) -> dict[str, Any]:
    accuracy = np.asarray(fit.heldout_accuracy, np.float64)
    return {
        "heldout_accuracy": accuracy.tolist(),
        "mean_heldout_accuracy": float(accuracy.mean()),
        "heldout_loss": np.asarray(fit.heldout_loss, np.float64).tolist(),
        "steps": np.asarray(fit.steps).tolist(),
    }


def _write_artifacts(
    result: EstimationResult,
    conditions: Sequence[PromptCondition],
    responses: Sequence[_Responses],
    record: Mapping[str, Any],
) -> None:
    """Write every artifact atomically, the record last, after removing the old record."""
    directory = result.directory
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RECORD_FILE).unlink(missing_ok=True)

    _write_atomically(directory / TRANSFORM_FILE, result.transform.save)
    _write_atomically(directory / REFUSAL_PROBE_FILE, result.refusal_probe.save)
    _write_atomically(directory / HARMFULNESS_PROBE_FILE, result.harmfulness_probe.save)
    _write_atomically(
        directory / STATES_FILE,
        lambda path: _save_npz(
            path,
            states=result.states,
            compliance=result.compliance,
            conditions=np.asarray([c.name for c in conditions]),
        ),
    )
    _write_jsonl(directory / LABELS_FILE, _label_rows(result, conditions, responses))
    _write_jsonl(directory / RESPONSES_FILE, _response_rows(result.anchors, conditions, responses))
    _write_json(directory / SUMMARY_FILE, result.summary)
    _write_json(directory / RECORD_FILE, record)


def _label_rows(
    result: EstimationResult,
    conditions: Sequence[PromptCondition],
    responses: Sequence[_Responses],
) -> Iterator[dict[str, Any]]:
    for condition, condition_responses, rates in zip(
        conditions, responses, result.compliance, strict=True
    ):
        for index, (example, rate) in enumerate(zip(result.anchors, rates, strict=True)):
            refused = [v.refused for v in condition_responses.verdicts[index] if v is not None]
            yield {
                "query_index": index,
                **_example_fields(example),
                "condition": condition.name,
                "compliance": None if np.isnan(rate) else float(rate),
                "judged": sum(r is not None for r in refused),
                "refused": sum(r is True for r in refused),
                "unjudged": sum(r is None for r in refused),
            }


def _response_rows(
    anchors: Sequence[Example],
    conditions: Sequence[PromptCondition],
    responses: Sequence[_Responses],
) -> Iterator[dict[str, Any]]:
    for condition, r in zip(conditions, responses, strict=True):
        for index, example in enumerate(anchors):
            for sample, text in enumerate(r.texts[index]):
                verdict = r.verdicts[index][sample]
                yield {
                    "query_index": index,
                    **_example_fields(example),
                    "condition": condition.name,
                    "sample": sample,
                    "response": text,
                    "num_tokens": r.num_tokens[index][sample],
                    "stopped": r.stopped[index][sample],
                    "kept": r.kept[index][sample],
                    "refused": None if verdict is None else verdict.refused,
                    "reason": None if verdict is None else verdict.reason,
                }


def _example_fields(example: Example) -> dict[str, Any]:
    return {
        "pair_id": example.pair_id,
        "language": example.language,
        "label": example.label,
        "query": example.text,
    }


def _load_if_recorded(
    directory: Path, record: Mapping[str, Any], anchors: tuple[Example, ...]
) -> EstimationResult | None:
    """Load the artifacts when `record.json` equals `record`; log why otherwise."""
    record_path = directory / RECORD_FILE
    if not record_path.is_file():
        logging.info("No estimation record in %s; computing the estimation", directory)
        return None
    try:
        stored = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        logging.warning("Cannot read %s (%s); computing the estimation again", record_path, error)
        return None
    differences = _record_differences(stored, record)
    if differences:
        logging.info(
            "Estimation artifacts in %s were made with other inputs; computing again. "
            "Differences:\n  %s",
            directory,
            "\n  ".join(differences),
        )
        return None

    try:
        result = _load_artifacts(directory, anchors)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as error:
        logging.warning(
            "Estimation artifacts in %s match the record but fail to load (%s); computing again",
            directory,
            error,
        )
        return None
    logging.info("Reusing the estimation artifacts in %s", directory)
    return result


def _load_artifacts(directory: Path, anchors: tuple[Example, ...]) -> EstimationResult:
    with np.load(directory / STATES_FILE) as archive:
        states, compliance = archive["states"], archive["compliance"]
    if states.shape[:2] != compliance.shape or states.shape[1] != len(anchors):
        raise ValueError(
            f"{directory / STATES_FILE} is invalid: states {states.shape} and compliance "
            f"{compliance.shape} do not fit {len(anchors)} anchors"
        )
    return EstimationResult(
        transform=Transform.load(directory / TRANSFORM_FILE),
        refusal_probe=LinearProbe.load(directory / REFUSAL_PROBE_FILE),
        harmfulness_probe=LinearProbe.load(directory / HARMFULNESS_PROBE_FILE),
        states=states,
        compliance=compliance,
        anchors=anchors,
        summary=json.loads((directory / SUMMARY_FILE).read_text()),
        directory=directory,
        reused=True,
    )


def _record_differences(stored: Any, current: Any, prefix: str = "") -> list[str]:
    """List `key: stored <a>, this run <b>` for every differing leaf, keys joined by dots."""
    if isinstance(stored, dict) and isinstance(current, dict):
        lines = []
        for key in sorted(stored.keys() | current.keys()):
            name = f"{prefix}.{key}" if prefix else key
            if key not in stored or key not in current:
                lines.append(
                    f"{name}: stored {stored.get(key, '<absent>')!r}, "
                    f"this run {current.get(key, '<absent>')!r}"
                )
            else:
                lines.extend(_record_differences(stored[key], current[key], name))
        return lines
    if stored != current:
        return [f"{prefix}: stored {_shorten(stored)}, this run {_shorten(current)}"]
    return []


def _shorten(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _agree_across_processes(result: EstimationResult | None) -> EstimationResult | None:
    """Make every process follow process 0's reuse decision, so collectives stay in step."""
    if jax.process_count() == 1:
        return result
    from jax.experimental import multihost_utils

    reuse = bool(multihost_utils.broadcast_one_to_all(np.int32(result is not None)))
    if reuse and result is None:
        raise RuntimeError(
            f"process {jax.process_index()} cannot load the estimation artifacts that process "
            "0 reuses; put the work directory on a file system that every process reads"
        )
    return result if reuse else None


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def _stage(name: str, detail: str) -> Iterator[None]:
    logging.info("%s: started (%s)", name, detail)
    started = time.perf_counter()
    yield
    logging.info("%s: done in %.1f s", name, time.perf_counter() - started)


def _json_values(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write` on a temporary file in the same folder, then rename it to `path`."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        write(Path(temporary))
        # mkstemp creates the file readable by its owner only; artifacts are shared files.
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with open(path, "wb") as file:
        np.savez(file, **arrays)


def _write_json(path: Path, payload: Any) -> None:
    def write(temporary: Path) -> None:
        temporary.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")

    _write_atomically(path, write)


def _write_jsonl(path: Path, rows: Iterator[Mapping[str, Any]]) -> None:
    def write(temporary: Path) -> None:
        with open(temporary, "w", encoding="utf-8") as file:
            for row in rows:
                file.write(json.dumps(row, ensure_ascii=False) + "\n")

    _write_atomically(path, write)
