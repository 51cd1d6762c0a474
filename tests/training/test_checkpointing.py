"""Checkpoint round trips, retention, fallback past damaged steps, and run fingerprints.

Everything runs on real orbax checkpoints in tmp_path with a real optax AdamW state.
"""

import dataclasses
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mcd_jax.method.schedule import SchedulePosition
from mcd_jax.training.checkpointing import (
    CHECKPOINT_SUBDIR,
    FINGERPRINT_FILE,
    FingerprintMismatchError,
    NoRestorableCheckpointError,
    RunFingerprint,
    TrainingCheckpoints,
    TrainState,
    check_fingerprint,
)
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
)

PROMPT_SHAPE = (8, 16)


def optimizer() -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.01))


def trained_state(step: int, seed: int = 0) -> TrainState:
    """A state after `step` real AdamW updates, so mu, nu and count are all non-trivial."""
    key = jax.random.key(seed)
    prompt_key, grad_key, rng_key = jax.random.split(key, 3)
    soft_prompt = jax.random.normal(prompt_key, PROMPT_SHAPE, jnp.float32)
    tx = optimizer()
    opt_state = tx.init(soft_prompt)
    for i in range(step):
        grad = jax.random.normal(jax.random.fold_in(grad_key, i), PROMPT_SHAPE, jnp.float32)
        updates, opt_state = tx.update(grad, opt_state, soft_prompt)
        soft_prompt = optax.apply_updates(soft_prompt, updates)
    return TrainState(
        step=step,
        soft_prompt=soft_prompt,
        opt_state=opt_state,
        rng_key=rng_key,
        position=SchedulePosition(language="ko", epoch=2, batch=step % 7),
    )


def initial_state() -> TrainState:
    soft_prompt = jnp.zeros(PROMPT_SHAPE, jnp.float32)
    return TrainState(
        step=0,
        soft_prompt=soft_prompt,
        opt_state=optimizer().init(soft_prompt),
        rng_key=jax.random.key(99),
        position=SchedulePosition(language="en", epoch=0, batch=0),
    )


def leaves_bytes(tree) -> list[bytes]:
    return [np.asarray(leaf).tobytes() for leaf in jax.tree.leaves(tree)]


def save_steps(workdir: Path, steps: list[int], *, save_every: int = 1, keep: int = 5) -> None:
    with TrainingCheckpoints(workdir, save_every=save_every, max_to_keep=keep) as ckpts:
        for step in steps:
            ckpts.save(trained_state(step))


def step_dir(workdir: Path, step: int) -> Path:
    return workdir / CHECKPOINT_SUBDIR / str(step)


def test_round_trip_is_bitwise(tmp_path):
    saved = trained_state(7)
    with TrainingCheckpoints(tmp_path, save_every=100, max_to_keep=3) as ckpts:
        assert ckpts.save(saved, force=True, reason="final")

    with TrainingCheckpoints(tmp_path, save_every=100, max_to_keep=3) as ckpts:
        restored = ckpts.restore_latest(initial_state())

    assert restored is not None
    assert restored.step == 7
    assert restored.position == saved.position
    assert restored.soft_prompt.dtype == jnp.float32
    assert np.asarray(restored.soft_prompt).tobytes() == np.asarray(saved.soft_prompt).tobytes()
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(saved.opt_state)
    assert leaves_bytes(restored.opt_state) == leaves_bytes(saved.opt_state)
    assert jax.random.key_impl(restored.rng_key) == jax.random.key_impl(saved.rng_key)
    assert np.array_equal(jax.random.key_data(restored.rng_key), jax.random.key_data(saved.rng_key))
    # The restored key must draw the same numbers as the saved one.
    assert np.array_equal(
        jax.random.uniform(restored.rng_key, (4,)), jax.random.uniform(saved.rng_key, (4,))
    )


def test_round_trip_keeps_key_impl(tmp_path):
    saved = trained_state(3)
    saved = TrainState(
        step=saved.step,
        soft_prompt=saved.soft_prompt,
        opt_state=saved.opt_state,
        rng_key=jax.random.key(5, impl="rbg"),
        position=saved.position,
    )
    template = initial_state()
    template = TrainState(
        step=0,
        soft_prompt=template.soft_prompt,
        opt_state=template.opt_state,
        rng_key=jax.random.key(0, impl="rbg"),
        position=template.position,
    )
    with TrainingCheckpoints(tmp_path, save_every=1, max_to_keep=1) as ckpts:
        ckpts.save(saved)
        ckpts.wait_until_finished()
        restored = ckpts.restore(3, template)

    assert jax.random.key_impl(restored.rng_key) == "rbg"
    assert np.array_equal(jax.random.key_data(restored.rng_key), jax.random.key_data(saved.rng_key))


def test_round_trip_mixed_language_position(tmp_path):
    saved = dataclasses.replace(
        trained_state(2), position=SchedulePosition(language=None, epoch=1, batch=3)
    )
    with TrainingCheckpoints(tmp_path, save_every=1, max_to_keep=1) as ckpts:
        ckpts.save(saved)
        ckpts.wait_until_finished()
        restored = ckpts.restore(2, initial_state())

    assert restored.position == SchedulePosition(language=None, epoch=1, batch=3)


def test_restore_keeps_template_sharding(tmp_path):
    devices = np.array(jax.devices())
    assert devices.size == 8, "tests/conftest.py sets 8 host CPU devices"
    mesh = jax.sharding.Mesh(devices, ("data",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
    saved = trained_state(2)
    saved = dataclasses.replace(saved, soft_prompt=jax.device_put(saved.soft_prompt, rows))
    template = initial_state()
    template = dataclasses.replace(
        template,
        soft_prompt=jax.device_put(template.soft_prompt, rows),
        opt_state=jax.tree.map(
            lambda x: jax.device_put(x, rows) if x.ndim == 2 else x, template.opt_state
        ),
    )

    with TrainingCheckpoints(tmp_path, save_every=1, max_to_keep=1) as ckpts:
        ckpts.save(saved)
        ckpts.wait_until_finished()
        restored = ckpts.restore(2, template)

    assert restored.soft_prompt.sharding == rows
    mu = restored.opt_state[1][0].mu
    assert mu.sharding == rows
    assert np.asarray(restored.soft_prompt).tobytes() == np.asarray(saved.soft_prompt).tobytes()


def test_keeps_last_k_and_resumes_latest(tmp_path):
    with TrainingCheckpoints(tmp_path, save_every=2, max_to_keep=2) as ckpts:
        started = [ckpts.save(trained_state(step)) for step in range(1, 8)]
        assert ckpts.save(trained_state(7), force=True, reason="final")

    assert started == [False, True, False, True, False, True, False]
    with TrainingCheckpoints(tmp_path, save_every=2, max_to_keep=2) as ckpts:
        assert ckpts.all_steps() == [6, 7]
        assert ckpts.latest_step() == 7
        resumed = ckpts.resume_or_start(initial_state(), resume=True)
    assert resumed.step == 7
    assert np.asarray(resumed.soft_prompt).tobytes() == (
        np.asarray(trained_state(7).soft_prompt).tobytes()
    )


def test_save_skips_existing_step(tmp_path):
    with TrainingCheckpoints(tmp_path, save_every=1, max_to_keep=3) as ckpts:
        assert ckpts.save(trained_state(4))
        ckpts.wait_until_finished()
        assert not ckpts.save(trained_state(4), force=True)
        assert ckpts.all_steps() == [4]


def test_resume_or_start_without_checkpoints(tmp_path):
    with TrainingCheckpoints(tmp_path, save_every=1, max_to_keep=3) as ckpts:
        state = ckpts.resume_or_start(initial_state(), resume=True)
    assert state.step == 0


def test_resume_off_with_checkpoints_raises(tmp_path):
    save_steps(tmp_path, [1, 2])
    with TrainingCheckpoints(tmp_path, save_every=1, max_to_keep=3) as ckpts:
        with pytest.raises(ValueError, match=r"steps \[1, 2\].*--resume=false"):
            ckpts.resume_or_start(initial_state(), resume=False)


def truncate_array_data(step_path: Path) -> None:
    data_files = list((step_path / "arrays" / "d").iterdir())
    assert data_files, f"no array data files under {step_path}"
    for path in data_files:
        with path.open("r+b") as f:
            f.truncate(10)


def delete_progress(step_path: Path) -> None:
    (step_path / "progress" / "metadata").unlink()


def delete_array_metadata(step_path: Path) -> None:
    (step_path / "arrays" / "_METADATA").unlink()


def overwrite_manifest(step_path: Path) -> None:
    (step_path / "arrays" / "manifest.ocdbt").write_bytes(b"\x00" * 16)


@pytest.mark.parametrize(
    "damage", [truncate_array_data, delete_progress, delete_array_metadata, overwrite_manifest]
)
def test_damaged_latest_falls_back(tmp_path, caplog, damage):
    save_steps(tmp_path, [1, 2, 3])
    damage(step_dir(tmp_path, 3))

    with caplog.at_level(logging.WARNING):
        with TrainingCheckpoints(tmp_path, save_every=1, max_to_keep=5) as ckpts:
            restored = ckpts.restore_latest(initial_state())
            steps_after = ckpts.all_steps()

    assert restored is not None
    assert restored.step == 2
    assert np.asarray(restored.soft_prompt).tobytes() == (
        np.asarray(trained_state(2).soft_prompt).tobytes()
    )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 3" in w and "failed to restore" in w for w in warnings), warnings
    # The damaged step is deleted so that the resumed run can save step 3 again.
    assert steps_after == [1, 2]
    with TrainingCheckpoints(tmp_path, save_every=1, max_to_keep=5) as ckpts:
        assert ckpts.save(trained_state(3))


def test_all_damaged_raises(tmp_path):
    save_steps(tmp_path, [1, 2])
    delete_progress(step_dir(tmp_path, 1))
    delete_progress(step_dir(tmp_path, 2))

    with TrainingCheckpoints(tmp_path, save_every=1, max_to_keep=5) as ckpts:
        with pytest.raises(NoRestorableCheckpointError, match=r"step 2: .*\n.*step 1: "):
            ckpts.restore_latest(initial_state())
        assert ckpts.all_steps() == [1, 2]


def test_other_prompt_shape_raises_and_keeps_checkpoints(tmp_path):
    save_steps(tmp_path, [1, 2])
    soft_prompt = jnp.zeros((4, 16), jnp.float32)
    template = TrainState(
        step=0,
        soft_prompt=soft_prompt,
        opt_state=optimizer().init(soft_prompt),
        rng_key=jax.random.key(0),
        position=SchedulePosition(language="en", epoch=0, batch=0),
    )

    with TrainingCheckpoints(tmp_path, save_every=1, max_to_keep=5) as ckpts:
        with pytest.raises(NoRestorableCheckpointError, match="new --workdir"):
            ckpts.restore_latest(template)
        assert ckpts.all_steps() == [1, 2]


def test_half_written_temporary_dir_ignored(tmp_path):
    save_steps(tmp_path, [1, 2])
    # What a process killed mid-save leaves: orbax's temporary directory for the next step.
    leftover = tmp_path / CHECKPOINT_SUBDIR / "3.orbax-checkpoint-tmp"
    (leftover / "arrays").mkdir(parents=True)
    (leftover / "arrays" / "manifest.ocdbt").write_bytes(b"partial")

    with TrainingCheckpoints(tmp_path, save_every=1, max_to_keep=5) as ckpts:
        assert ckpts.all_steps() == [1, 2]
        restored = ckpts.restore_latest(initial_state())
        assert restored is not None
        assert restored.step == 2
        assert ckpts.save(trained_state(3))
    assert not leftover.exists()


def test_raw_uint32_key_rejected(tmp_path):
    state = trained_state(1)
    raw = TrainState(
        step=1,
        soft_prompt=state.soft_prompt,
        opt_state=state.opt_state,
        rng_key=jax.random.PRNGKey(0),
        position=state.position,
    )
    with TrainingCheckpoints(tmp_path, save_every=1, max_to_keep=1) as ckpts:
        with pytest.raises(TypeError, match=r"jax\.random\.key\(seed\)"):
            ckpts.save(raw)


def test_invalid_manager_options(tmp_path):
    with pytest.raises(ValueError, match="save_every=0"):
        TrainingCheckpoints(tmp_path, save_every=0, max_to_keep=1)
    with pytest.raises(ValueError, match="max_to_keep=0"):
        TrainingCheckpoints(tmp_path, save_every=1, max_to_keep=0)


def fingerprint(**changes) -> RunFingerprint:
    fields = dict(
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        model_hash="sha256:abc",
        dataset="sha256:def",
        objective={"weight_refusal": 1.0, "weight_harmfulness": 0.01, "mode": "mcd"},
        schedule={"kind": "collaborative", "languages": ["en", "da"], "batch_size": 10},
        soft_prompt_shape=(8, 576),
    )
    fields.update(changes)
    return RunFingerprint(**fields)


def test_fingerprint_written_then_matched(tmp_path):
    check_fingerprint(tmp_path, fingerprint())
    stored = json.loads((tmp_path / FINGERPRINT_FILE).read_text())
    assert stored["soft_prompt_shape"] == [8, 576]
    assert stored["objective"]["weight_refusal"] == 1.0

    check_fingerprint(tmp_path, fingerprint())


def test_fingerprint_mismatch_lists_keys(tmp_path):
    check_fingerprint(tmp_path, fingerprint())
    changed = fingerprint(
        objective={"weight_refusal": 2.0, "weight_harmfulness": 0.01, "mode": "mcd"},
        soft_prompt_shape=(16, 576),
    )

    with pytest.raises(FingerprintMismatchError) as excinfo:
        check_fingerprint(tmp_path, changed)

    message = str(excinfo.value)
    assert "objective.weight_refusal: stored 1.0, this run 2.0" in message
    assert "soft_prompt_shape: stored [8, 576], this run [16, 576]" in message
    assert "objective.weight_harmfulness" not in message
    assert "model_hash" not in message
    assert "--force_resume" in message


def test_fingerprint_force_overrides(tmp_path, caplog):
    check_fingerprint(tmp_path, fingerprint())
    changed = fingerprint(dataset="sha256:other")

    with caplog.at_level(logging.WARNING):
        check_fingerprint(tmp_path, changed, force=True)

    assert any("dataset: stored" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / FINGERPRINT_FILE).read_text())["dataset"] == "sha256:other"
    check_fingerprint(tmp_path, changed)


def test_unreadable_fingerprint_raises(tmp_path):
    (tmp_path / FINGERPRINT_FILE).write_text("{not json")
    with pytest.raises(FingerprintMismatchError, match="unreadable"):
        check_fingerprint(tmp_path, fingerprint())
    check_fingerprint(tmp_path, fingerprint(), force=True)
    check_fingerprint(tmp_path, fingerprint())


def test_fingerprint_from_config_ignores_remat(tmp_path):
    config = TrainConfig(
        model=ModelSource(ref="HuggingFaceTB/SmolLM2-135M-Instruct", revision="main"),
        data=DataConfig(),
        method=MethodConfig(),
        schedule=ScheduleConfig(),
        estimation=EstimationConfig(),
        mesh=MeshConfig(),
        distributed=DistributedConfig(),
        checkpoint=CheckpointConfig(workdir=str(tmp_path)),
        logging=LoggingConfig(),
    )
    shape = (40, 576)
    base = RunFingerprint.from_config(config, model_hash="h", dataset="d", soft_prompt_shape=shape)
    check_fingerprint(tmp_path, base)

    with_remat = dataclasses.replace(config, schedule=ScheduleConfig(remat=True))
    remat_fingerprint = RunFingerprint.from_config(
        with_remat, model_hash="h", dataset="d", soft_prompt_shape=shape
    )
    check_fingerprint(tmp_path, remat_fingerprint)

    assert base.model == "HuggingFaceTB/SmolLM2-135M-Instruct@main"
    assert base.schedule["train_languages"] == ["en", "da", "ko", "el", "ga"]
    other_languages = dataclasses.replace(config, data=DataConfig(train_languages=("en", "ko")))
    with pytest.raises(FingerprintMismatchError, match="schedule.train_languages"):
        check_fingerprint(
            tmp_path,
            RunFingerprint.from_config(
                other_languages, model_hash="h", dataset="d", soft_prompt_shape=shape
            ),
        )


def test_fingerprint_includes_anchors_per_label(tmp_path):
    config = TrainConfig(
        model=ModelSource(ref="m"),
        data=DataConfig(),
        method=MethodConfig(),
        schedule=ScheduleConfig(),
        estimation=EstimationConfig(),
        mesh=MeshConfig(),
        distributed=DistributedConfig(),
        checkpoint=CheckpointConfig(workdir=str(tmp_path)),
        logging=LoggingConfig(),
    )
    shape = (40, 576)
    unset = RunFingerprint.from_config(config, model_hash="h", dataset="d", soft_prompt_shape=shape)
    check_fingerprint(tmp_path, unset)

    assert "anchors_per_label" not in unset.objective
    limited = dataclasses.replace(config, data=DataConfig(anchors_per_label=25))
    with pytest.raises(FingerprintMismatchError, match="anchors_per_label"):
        check_fingerprint(
            tmp_path,
            RunFingerprint.from_config(
                limited, model_hash="h", dataset="d", soft_prompt_shape=shape
            ),
        )
