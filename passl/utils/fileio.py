"""Files are written whole or not at all, and a failed write says why in one line.

- ``atomic_path``: a temporary name beside the target, then a rename; any failure leaves the target as
  it was and removes the temporary. A temporary left by a killed process is removed by
  ``remove_stale_temporaries`` when the next run starts (``TEMPORARY`` matches their names).
- ``writing`` turns an OSError while writing (disk full, file size limit, read-only folder) into a
  :class:`WriteError` naming the file, what happened and what to do.
- ``DirectoryLock``: one process at a time in a folder (an flock, released by the OS however the
  process ends, so a killed run leaves no stale lock); ``move_aside`` keeps an old folder under a new name.
"""
import contextlib
import errno
import fcntl
import hashlib
import os
import re
import resource
import shutil
import socket
import sys
import tempfile
import time

from passl.errors import PasslError, WriteError

__all__ = ["atomic_path", "write_text", "writing", "write_error", "format_bytes", "TEMPORARY",
           "remove_stale_temporaries", "ensure_writable_dir", "DirectoryLock", "move_aside", "sha256_file",
           "WriteError"]


def _file_mode():
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


# What open(path, "w") would give (mkstemp makes 0600 files, which would lock teammates out of
# shared checkpoints and label stores). Read once, at import, while nothing else runs.
FILE_MODE = _file_mode()

# atomic_path's temporaries: ".<name>.<8 characters of mkstemp>.tmp<extension of name>"
TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp(?P<ext>\.[^.]*)?$")
_SPACE = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def format_bytes(count):
    """1536 -> '1.5 KiB'."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024.0
    return f"{count:.1f} GiB"


def _errno_of(error):
    if getattr(error, "errno", None):
        return error.errno
    found = re.search(r"os error (\d+)", str(error))   # safetensors reports the OS error in its text
    return int(found.group(1)) if found else None


def write_error(error, path, needed=None):
    """A one-line :class:`WriteError` for ``error`` (an OSError or a library error wrapping one) met
    while writing ``path``; ``needed``: bytes the whole file takes, when known."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    code = _errno_of(error)
    need = f"; it needs {format_bytes(needed)}" if needed else ""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if code in _READ_ONLY:
        return WriteError(f"cannot write {path}: {os.strerror(code)} (the folder {directory} is read-only for this "
                          "process); choose another output folder")
    if code == errno.EFBIG or code is None and limit != resource.RLIM_INFINITY:
        return WriteError(f"cannot write {path}: this process may write files of at most {format_bytes(limit)} "
                          f"(ulimit -f){need}; nothing was replaced. Raise the limit and run again")
    free = _free_bytes(directory)
    if code in _SPACE or code is None and free is not None and needed and free < needed:
        what = os.strerror(code) if code else "disk full"
        return WriteError(f"cannot write {path}: {what} ({format_bytes(free or 0)} free in {directory}{need}); "
                          "nothing was replaced. Free some space or choose another folder, and run again")
    reason = os.strerror(code) if code else str(error)
    return WriteError(f"cannot write {path}: {reason}")


def _free_bytes(directory):
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


@contextlib.contextmanager
def writing(path, needed=None):
    """Within the block, an OSError (or a library error that wraps one) becomes a WriteError naming
    ``path``. ``needed``: the bytes the file takes, for the message."""
    try:
        yield
    except PasslError:
        raise
    except OSError as e:
        raise write_error(e, path, needed) from None
    except Exception as e:  # noqa: BLE001 - libraries (safetensors) wrap I/O errors in their own types
        if _errno_of(e) is None:
            raise
        raise write_error(e, path, needed) from None


@contextlib.contextmanager
def atomic_path(path, needed=None):
    """Yield a temporary path beside ``path`` with the same extension; when the block finishes, the
    file is renamed onto ``path``; when it raises, the file is deleted and ``path`` is untouched.
    A failed write (disk full, read-only folder) raises WriteError naming ``path`` (``needed``: its
    expected size in bytes, for the message).

        with atomic_path("out/model.pdparams") as tmp:
            paddle.save(state, tmp)
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    extension = os.path.splitext(path)[1]
    with writing(path, needed):
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=f".tmp{extension}")
        os.close(fd)
    try:
        with writing(path, needed):
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


def remove_stale_temporaries(directory, recursive=False):
    """Delete the temporaries of ``atomic_path`` (hidden ``.<name>.<random>.tmp<ext>`` files) that a killed
    process left in ``directory`` (and below it, when ``recursive``). Call it only while no other process
    writes there (e.g. holding a DirectoryLock). Returns [(path, bytes)] of what was removed."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    walk = os.walk(directory) if recursive else [(directory, [], os.listdir(directory))]
    for folder, _, names in walk:
        for name in names:
            match = TEMPORARY.match(name)
            if match and (match.group("ext") or "") == os.path.splitext(match.group("name"))[1]:
                path = os.path.join(folder, name)
                with contextlib.suppress(OSError):
                    size = os.path.getsize(path)
                    os.remove(path)
                    removed.append((path, size))
    return removed


def ensure_writable_dir(directory, flag, how=None):
    """Create ``directory`` and prove that files can be made in it; WriteError naming it and ``flag``
    (the option or key that chose it, e.g. '--out') otherwise, before any work is done. ``how``: how to
    choose another (default: ``flag``)."""
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write_test_")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise WriteError(f"{flag} {directory} is not writable ({e.strerror or e}); choose another folder "
                         f"with {how or flag}") from None
    return directory


class DirectoryLock:
    """An exclusive lock on ``directory``: an flock on the file ``directory/.lock``, held until ``release``
    or until the process ends, whatever the way (the OS releases it; a killed holder leaves at most the
    file, never a lock). ``acquire`` raises WriteError naming the holder when another process has it;
    ``describe`` writes this process into the file for the next one to name. The file is removed on
    ``release`` when this process made it or described itself in it."""

    NAME = ".lock"

    def __init__(self, directory, what="folder", flag="output_dir"):
        self.directory, self.what, self.flag = directory, what, flag
        self.path = os.path.join(directory, self.NAME)
        self._fd, self._owned = None, False

    def acquire(self):
        with writing(self.path):
            os.makedirs(self.directory, exist_ok=True)
        while True:
            fd, created = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise write_error(e, self.path) from None
                holder = self._holder()
                raise WriteError(f"{self.flag} {self.directory} is in use by another {self.what}"
                                 f"{f' ({holder})' if holder else ''}: wait for it to end or stop it, or choose "
                                 f"another {self.flag}") from None
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:   # not a file its last holder removed meanwhile
                self._fd, self._owned = fd, created
                return self
            os.close(fd)

    def _open(self):
        """(descriptor, whether this call made the file)."""
        while True:
            with writing(self.path):
                try:
                    return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE), True
                except FileExistsError:
                    pass
                try:
                    return os.open(self.path, os.O_RDWR), False
                except FileNotFoundError:   # removed by its last holder just now: make it
                    continue

    def _holder(self):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            with open(self.path, encoding="utf-8") as f:
                return f.read().strip()
        return ""

    def describe(self):
        """Record this process (pid, host, start time, command) in the lock file."""
        text = (f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                + " ".join(sys.argv))[:500]
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, text.encode("utf-8") + b"\n", 0)
            self._owned = True

    def release(self, moved_to=None):
        """Give the folder up; ``moved_to``: where the folder went meanwhile (move_aside while holding it)."""
        if self._fd is None:
            return
        if self._owned:   # removed while still held, so that no other process can be holding this file
            with contextlib.suppress(OSError):
                os.remove(os.path.join(moved_to, self.NAME) if moved_to else self.path)
        os.close(self._fd)   # closing the descriptor releases the flock
        self._fd, self._owned = None, False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def move_aside(path):
    """Rename the folder ``path`` to ``path.old-<YYYYmmdd-HHMMSS>`` (a free name); returns the new name."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = f"{os.path.normpath(path)}.old-{stamp}", 1
    while os.path.exists(target):
        target, n = f"{os.path.normpath(path)}.old-{stamp}-{n}", n + 1
    try:
        os.rename(path, target)
    except OSError as e:
        raise WriteError(f"cannot move {path} aside to {target} ({e.strerror}); move or delete it yourself") from None
    return target


def sha256_file(path):
    """The SHA-256 of the file ``path`` as hex, read in chunks (a 600 MB file took 0.7 s on one core)."""
    digest, chunk = hashlib.sha256(), bytearray(1 << 20)
    with open(path, "rb", buffering=0) as f:
        while True:
            count = f.readinto(chunk)
            if not count:
                return digest.hexdigest()
            digest.update(memoryview(chunk)[:count])
