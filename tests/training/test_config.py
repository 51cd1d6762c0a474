"""TrainConfig: validation of Python-built configs, the JSON file, the work directory check."""

import dataclasses
import json
import os

import pytest

from mcd_jax import chat
from mcd_jax.method.objective import ObjectiveConfig
from mcd_jax.training import config as config_lib
from mcd_jax.training.config import (
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    EstimationConfig,
    LoggingConfig,
    MeshConfig,
    MethodConfig,
    ModelSource,
    ScheduleConfig,
    TrainConfig,
    ensure_writable_workdir,
    read_resolved_config,
    write_resolved_config,
)


def make_config(**sections) -> TrainConfig:
    fields = dict(
        model=ModelSource(ref="HuggingFaceTB/SmolLM2-135M-Instruct"),
        data=DataConfig(),
        method=MethodConfig(),
        schedule=ScheduleConfig(),
        estimation=EstimationConfig(),
        mesh=MeshConfig(),
        distributed=DistributedConfig(),
        checkpoint=CheckpointConfig(workdir="/tmp/run"),
        logging=LoggingConfig(),
    )
    fields.update(sections)
    return TrainConfig(**fields)


def test_resolved_config_round_trip(tmp_path):
    config = make_config(
        data=DataConfig(train_languages=("en", "ko"), anchor_languages=("en", "ko")),
        distributed=DistributedConfig(coordinator_address="127.0.0.1:1234", num_processes=2),
    )

    path = write_resolved_config(config, tmp_path)

    assert path == tmp_path / "config.json"
    assert json.loads(path.read_text())["data"]["train_languages"] == ["en", "ko"]
    assert read_resolved_config(tmp_path) == config
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_unknown_field_in_json_rejected():
    payload = make_config().to_json()
    payload["schedule"]["batchsize"] = 3
    with pytest.raises(ValueError, match=r"unknown fields \['batchsize'\] in section 'schedule'"):
        TrainConfig.from_json(payload)


def test_missing_section_in_json_rejected():
    payload = make_config().to_json()
    del payload["mesh"]
    with pytest.raises(ValueError, match="section 'mesh' missing"):
        TrainConfig.from_json(payload)


@pytest.mark.parametrize(
    "sections, expected",
    [
        (
            {"schedule": ScheduleConfig(batch_size=0)},
            "schedule.batch_size=0 is below its minimum 1",
        ),
        ({"method": MethodConfig(mode="sft")}, "method.mode='sft' is not one of mcd, dro"),
        ({"model": ModelSource(ref="")}, "model.ref is empty"),
        (
            {"data": DataConfig(train_languages=("en", "da", "en"))},
            "--train_languages lists ['en'] more than once",
        ),
        ({"data": DataConfig(train_languages=("ko",))}, "at least 2 --train_languages"),
        (
            {"method": MethodConfig(mode="dro", ablation="no_consistency")},
            "--mode=dro trains on English only",
        ),
        (
            {"estimation": EstimationConfig(label_samples=5, label_keep_longest=6)},
            "--label_keep_longest=6 exceeds --label_samples=5",
        ),
        (
            {"distributed": DistributedConfig(coordinator_address="localhost")},
            "is not of the form host:port",
        ),
    ],
)
def test_invalid_config_rejected(sections, expected):
    with pytest.raises(ValueError) as excinfo:
        make_config(**sections)
    assert expected in str(excinfo.value)


def test_dro_no_consistency_ablation_rejected():
    with pytest.raises(ValueError, match="no consistency term"):
        make_config(
            data=DataConfig(train_languages=("en",)),
            method=MethodConfig(mode="dro", ablation="no_consistency"),
        )


def test_single_language_mcd_allowed_without_consistency():
    config = make_config(
        data=DataConfig(train_languages=("ko",)), method=MethodConfig(ablation="no_consistency")
    )
    assert config.data.train_languages == ("ko",)


def test_objective_config_mapping():
    method = MethodConfig(weight_refusal=2.0, ablation="no_harmfulness", mode="mcd")
    objective = method.objective_config()

    assert isinstance(objective, ObjectiveConfig)
    assert objective.refusal_weight == 2.0
    assert objective.dropped_term == "harmfulness"
    assert objective.weights()["harmfulness"] == 0.0
    assert MethodConfig().objective_config().dropped_term is None


def test_ablation_names_match_objective_terms():
    from mcd_jax.method.objective import TERM_NAMES

    assert [a.removeprefix("no_") for a in config_lib.ABLATIONS[1:]] == list(TERM_NAMES)


def test_placements_match_chat():
    assert config_lib.PLACEMENTS == chat.PLACEMENTS


def test_config_is_frozen():
    config = make_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.schedule.batch_size = 3


def test_default_run_name():
    assert (
        config_lib.default_run_name("HuggingFaceTB/SmolLM2-135M-Instruct", "mcd", "collaborative")
        == "SmolLM2-135M-Instruct-mcd-collaborative"
    )
    assert config_lib.default_run_name("/models/my model/", "dro", "collaborative") == (
        "my_model-dro-collaborative"
    )


def test_workdir_created(tmp_path):
    workdir = ensure_writable_workdir(tmp_path / "runs" / "a")
    assert workdir.is_dir()
    assert list(workdir.iterdir()) == []


def test_workdir_under_a_file_rejected(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"not_a_dir/run is not writable.*--workdir"):
        ensure_writable_workdir(blocker / "run")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only directory")
def test_workdir_read_only_rejected(tmp_path):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="is not writable"):
            ensure_writable_workdir(read_only)
    finally:
        read_only.chmod(0o700)
