"""MetricsWriter on real files: JSONL rows, TensorBoard event records, logs, progress bar."""

import io
import json
import logging
import struct
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import pytest
from tensorboardX.crc32c import crc32c
from tensorboardX.proto import event_pb2

from mcd_jax.training.metrics import (
    METRICS_FILE,
    TENSORBOARD_SUBDIR,
    MetricsWriter,
    ThroughputMeter,
)


def masked_crc(data: bytes) -> int:
    """The masked CRC32C of the TFRecord format."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path: Path) -> list[event_pb2.Event]:
    """Parse a TFRecord event file, checking both CRCs of every record."""
    events = []
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
        header = data[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
        assert length_crc == masked_crc(header), f"bad length CRC at byte {offset}"
        payload = data[offset + 12 : offset + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[offset + 12 + length : offset + 16 + length])
        assert payload_crc == masked_crc(payload), f"bad payload CRC at byte {offset}"
        events.append(event_pb2.Event.FromString(payload))
        offset += 16 + length
    return events


def scalar_events(workdir: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for path in sorted((workdir / TENSORBOARD_SUBDIR).iterdir()):
        for event in read_events(path):
            for value in event.summary.value:
                series.setdefault(value.tag, []).append((event.step, value.simple_value))
    return series


def read_rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / METRICS_FILE).read_text().splitlines()]


def test_writes_jsonl_and_tensorboard(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        with MetricsWriter(tmp_path, log_every=2, total_steps=3) as writer:
            for step in (1, 2, 3):
                writer.write(
                    step,
                    {"loss/total": jnp.float32(step / 10), "learning_rate": 1e-3},
                    language="da",
                )

    rows = read_rows(tmp_path)
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert rows[1]["language"] == "da"
    assert rows[1]["loss/total"] == pytest.approx(0.2)
    assert rows[1]["learning_rate"] == 1e-3
    assert isinstance(rows[1]["time"], float)

    series = scalar_events(tmp_path)
    assert [step for step, _ in series["loss/total"]] == [1, 2, 3]
    assert series["loss/total"][2][1] == pytest.approx(0.3)
    assert series["learning_rate"][0] == (1, pytest.approx(1e-3))

    summaries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert summaries == [
        "step 2/3 [da] loss/total=0.2 learning_rate=0.001",
        "step 3/3 [da] loss/total=0.3 learning_rate=0.001",
    ]


def test_non_finite_written_as_null(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(1, {"loss/total": float("nan"), "loss/refusal": float("inf")})

    (row,) = read_rows(tmp_path)
    assert row["loss/total"] is None
    assert row["loss/refusal"] is None
    assert not (tmp_path / TENSORBOARD_SUBDIR).exists()


def test_non_scalar_value_rejected(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        with pytest.raises(TypeError, match="'loss/total'"):
            writer.write(1, {"loss/total": jnp.ones(3)})


def test_non_primary_writes_nothing(tmp_path):
    with MetricsWriter(tmp_path / "run", is_primary=False) as writer:
        writer.write(1, {"loss/total": 1.0})
    assert not (tmp_path / "run").exists()


def test_resume_drops_rows_after_start(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        for step in range(1, 6):
            writer.write(step, {"loss/total": float(step)})
    # A process killed mid-write leaves a partial last line.
    with (tmp_path / METRICS_FILE).open("a") as f:
        f.write('{"step": 6, "loss/to')

    with MetricsWriter(tmp_path, tensorboard=False, start_step=3) as writer:
        writer.write(4, {"loss/total": 40.0})

    rows = read_rows(tmp_path)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert rows[3]["loss/total"] == 40.0


def test_resume_purges_tensorboard_steps(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        for step in range(1, 6):
            writer.write(step, {"loss/total": float(step)})
    # Both writers start within the same second, in the same process.
    first_files = set((tmp_path / TENSORBOARD_SUBDIR).iterdir())
    with MetricsWriter(tmp_path, start_step=3) as writer:
        writer.write(4, {"loss/total": 40.0})

    files = set((tmp_path / TENSORBOARD_SUBDIR).iterdir())
    assert len(files) == 2
    (resumed_file,) = files - first_files
    events = read_events(resumed_file)
    purges = [e for e in events if e.session_log.status == event_pb2.SessionLog.START]
    assert [e.step for e in purges] == [4]
    assert [step for step, _ in scalar_events(tmp_path)["loss/total"]] == [1, 2, 3, 4, 5, 4]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_terminal(tmp_path, monkeypatch):
    piped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", piped)
    with MetricsWriter(tmp_path / "piped", tensorboard=False, total_steps=3) as writer:
        for step in (1, 2, 3):
            writer.write(step, {"loss/total": 1.0})
    assert piped.getvalue() == ""

    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with MetricsWriter(tmp_path / "tty", tensorboard=False, total_steps=3) as writer:
        for step in (1, 2, 3):
            writer.write(step, {"loss/total": 1.0})
    assert "3/3" in terminal.getvalue()


def test_invalid_log_every_rejected(tmp_path):
    with pytest.raises(ValueError, match="log_every=0"):
        MetricsWriter(tmp_path, log_every=0)


def test_throughput_meter():
    meter = ThroughputMeter()
    time.sleep(0.05)
    measured = meter.measure(num_examples=10, num_tokens=1000)
    assert 0 < measured["throughput/examples_per_s"] <= 10 / 0.05
    assert measured["throughput/tokens_per_s"] == pytest.approx(
        100 * measured["throughput/examples_per_s"]
    )
