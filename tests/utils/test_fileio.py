"""atomic_path: whole files or nothing, with the permissions a plain open() gives."""
import os
import stat

import pytest

from passl.utils.fileio import atomic_path, write_text


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_success_replaces_the_target_with_plain_open_permissions(tmp_path):
    target = tmp_path / "sub" / "model.pdparams"
    with atomic_path(target) as tmp:
        assert tmp.endswith(".pdparams") and os.path.dirname(tmp) == str(target.parent)
        with open(tmp, "w") as f:
            f.write("new")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert target.read_text() == "new"
    assert _mode(target) == _mode(plain)      # not mkstemp's 0600
    assert os.listdir(target.parent) == ["model.pdparams"]


def test_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "latest.pdckpt"
    write_text(target, "good")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "good"
    assert os.listdir(tmp_path) == ["latest.pdckpt"]
