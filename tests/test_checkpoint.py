"""checkpoint.py's files: atomic writes leave the old file or the new one, never a half-written one or a stray
temporary file."""

import errno
import os

import pytest

import checkpoint


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary_file(tmp_path):
    """The disk fills after the temporary file was created and partly written: the target keeps its old content,
    the error names the target, and the temporary file is gone."""
    path = tmp_path / "config.json"
    path.write_text("old")

    def fills_the_disk(tmp):
        with open(tmp, "w") as f:
            f.write("half of the new")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError, match=f"could not write {path}: .*No space left on device"):
        checkpoint.atomic_write(str(path), fills_the_disk)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["config.json"]
    checkpoint.write_json(str(path), {"new": 1})  # and the next write goes through
    assert checkpoint.read_json(str(path)) == {"new": 1} and os.listdir(tmp_path) == ["config.json"]


def test_temporary_files_of_interrupted_saves_are_recognised():
    assert checkpoint.is_temp_file("model.safetensors.tmp1234")  # ours: NAME.tmpPID
    assert checkpoint.is_temp_file(".tmpA1b2C3")  # safetensors' save_file
    assert not checkpoint.is_temp_file("model.safetensors") and not checkpoint.is_temp_file("eval.json")
