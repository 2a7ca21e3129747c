"""Files are written whole or not at all: a temporary name beside the target, then a rename."""
import contextlib
import os
import tempfile


def _file_mode():
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


# What open(path, "w") would give (mkstemp makes 0600 files, which would lock teammates out of
# shared checkpoints and label stores). Read once, at import, while nothing else runs.
FILE_MODE = _file_mode()


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path`` with the same extension; when the block finishes, the
    file is renamed onto ``path``; when it raises, the file is deleted and ``path`` is untouched.

        with atomic_path("out/model.pdparams") as tmp:
            paddle.save(state, tmp)
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    extension = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=f".tmp{extension}")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text(path, text):
    """Write ``text`` (UTF-8) to ``path`` atomically. Returns ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return path
