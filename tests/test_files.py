"""write_atomically: content, mode, and no partial file left behind."""

import os
import stat

import pytest

from mcd_jax.files import FILE_MODE, write_atomically


def test_writes_text_and_bytes(tmp_path):
    write_atomically(tmp_path / "a.json", "{}\n")
    write_atomically(tmp_path / "b.bin", b"\x00\x01")

    assert (tmp_path / "a.json").read_text() == "{}\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"


def test_file_readable_by_others(tmp_path):
    path = write_atomically(tmp_path / "report.json", "{}")

    assert stat.S_IMODE(os.stat(path).st_mode) == FILE_MODE


def test_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("old")
    write_atomically(path, "new")

    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_missing_folder_raises_and_writes_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_atomically(tmp_path / "absent" / "x.json", "{}")
    assert list(tmp_path.iterdir()) == []
