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


def test_the_temporaries_of_atomic_path_are_what_remove_stale_temporaries_removes(tmp_path):
    from passl.utils.fileio import TEMPORARY, remove_stale_temporaries
    seen = []
    for name in ("latest.pdckpt", "config.yaml", "labels.npy", "README"):
        with atomic_path(tmp_path / name) as tmp:
            seen.append(os.path.basename(tmp))
            assert TEMPORARY.match(os.path.basename(tmp)).group("name") == name
            with open(tmp, "w") as f:
                f.write("x")
            (tmp_path / "sub").mkdir(exist_ok=True)
            with open(tmp_path / "sub" / os.path.basename(tmp), "w") as f:   # as a killed write leaves it
                f.write("xy")
    (tmp_path / ".hidden").write_text("mine")
    assert remove_stale_temporaries(str(tmp_path)) == []                  # only in the folder asked
    removed = remove_stale_temporaries(str(tmp_path), recursive=True)
    assert sorted(os.path.basename(p) for p, _ in removed) == sorted(seen) and {n for _, n in removed} == {2}
    assert sorted(os.listdir(tmp_path / "sub")) == []
    assert ".hidden" in os.listdir(tmp_path)


def test_write_errors_say_what_happened_in_one_line(tmp_path, monkeypatch):
    import errno

    from passl.utils import fileio
    path = str(tmp_path / "epoch_0002.pdckpt")
    full = fileio.write_error(OSError(errno.ENOSPC, "No space left on device"), path, needed=3 << 20)
    assert str(full).startswith(f"cannot write {path}: No space left on device (") and "it needs 3.0 MiB" in str(full)
    assert "nothing was replaced. Free some space" in str(full)
    read_only = fileio.write_error(OSError(errno.EROFS, "Read-only file system"), path)
    assert str(read_only) == (f"cannot write {path}: Read-only file system (the folder {tmp_path} is read-only for "
                              "this process); choose another output folder")
    wrapped = fileio.write_error(RuntimeError("Error while serializing: I/O error: Disk quota exceeded (os error 122)"),
                                 path)
    assert "Disk quota exceeded" in str(wrapped)                            # safetensors' wording, errno parsed
    limited = fileio.write_error(OSError(errno.EFBIG, "File too large"), path, needed=1 << 20)
    assert "(ulimit -f); it needs 1.0 MiB" in str(limited)
    assert all("\n" not in str(e) for e in (full, read_only, wrapped, limited))


def test_a_lock_file_lives_as_long_as_its_holder_uses_the_folder(tmp_path):
    from passl.errors import WriteError
    from passl.utils.fileio import DirectoryLock
    with DirectoryLock(str(tmp_path), "job", "--out") as lock:
        lock.describe()
        with pytest.raises(WriteError, match=rf"--out {tmp_path} is in use by another job \(pid {os.getpid()} on "):
            DirectoryLock(str(tmp_path), "job", "--out").acquire()
    assert os.listdir(tmp_path) == []                                       # gone with a clean release
    (tmp_path / ".lock").write_text("pid 1 on elsewhere: a run that was killed\n")   # left by a killed holder
    with DirectoryLock(str(tmp_path), "job", "--out"):                       # no lock is held on it: taken
        pass
    assert (tmp_path / ".lock").read_text() == "pid 1 on elsewhere: a run that was killed\n"   # not ours: kept
