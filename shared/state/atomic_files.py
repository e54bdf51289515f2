"""Atomic, durable file writes: the one helper every role uses to put a file in place.

After a crash or a power cut a reader sees either the old file or the whole new one, never half
of one, and once a call has returned the new file stays (the rename itself is on disk). Each
write goes through the same steps:

1. create a temporary file in the target's own directory (a rename is atomic only within one
   file system), with ``O_CREAT | O_EXCL | O_NOFOLLOW``: never through a pre-planted file or link;
2. write it, flush it and ``os.fsync`` it, so its bytes are on disk before its name is;
3. ``os.replace`` it onto the target: atomic on POSIX, the old file or the new, never neither;
4. ``os.fsync`` the directory, so the rename survives a power cut too (without this, the file
   system may come back with the old file, or none, although the call had returned);

and on any failure before the rename the temporary file is removed.

Two entry points:

* ``write_bytes_atomic(path, data, mode=None)``: the bytes are already in memory;
* ``atomic_path(path, mode=None)``: a context manager yielding the temporary path, for writers
  that want a filename (``safetensors.torch.save_file``, ``Path.write_text``, ``open(p, "wb")``).
  The file is put in place only when the ``with`` body ends without an exception.

``mode``: None gives what ``open()`` would (0o666 less the umask); an int gives exactly that mode
from the first byte (the temporary file is created with it, so the umask can only narrow it, then
``fchmod`` sets it exactly). Private keys pass 0o600.

Neither creates the parent directory: the caller decides whether to, and with which mode.
Temporary names are ``.{name}.{random}.tmp``: hidden, and they never match a reader's glob such as
``*.safetensors``. This module imports no role (it lives in ``shared/``, as the roles' common ground).
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def write_bytes_atomic(path: str | os.PathLike, data: bytes | bytearray | memoryview, mode: int | None = None) -> None:
    """Put ``data`` at ``path`` atomically and durably (see the module docstring)."""
    path = Path(path)
    tmp, fd = _create_temp(path, mode)
    try:
        try:
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextmanager
def atomic_path(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on a clean exit, fsync it and rename it onto ``path``.

    The temporary file already exists (empty, with its mode) when the body runs: the writer opens it
    for writing (truncating), writes and closes it. An exception in the body removes it and leaves
    the old ``path`` as it was.
    """
    path = Path(path)
    tmp, fd = _create_temp(path, mode)
    os.close(fd)
    try:
        yield tmp
        # fsync through a fresh descriptor: it flushes whatever the writer wrote through its own.
        fd = os.open(tmp, os.O_RDONLY | _NOFOLLOW)
        try:
            if mode is not None:
                os.fchmod(fd, mode)  # in case the writer recreated the file instead of truncating it
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _create_temp(path: Path, mode: int | None) -> tuple[Path, int]:
    """A new, empty temporary file next to ``path`` and an open descriptor on it."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, _CREATE_FLAGS, 0o666 if mode is None else mode)
        except FileExistsError:
            continue  # another writer's temporary file: draw another name
        if mode is not None:
            try:
                os.fchmod(fd, mode)  # exactly `mode`, whatever the umask removed
            except BaseException:
                os.close(fd)
                tmp.unlink(missing_ok=True)
                raise
        return tmp, fd
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a directory's entries are data of the directory)."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some file systems (a few network and FUSE ones) cannot fsync a directory; the file is in
        # place all the same, so only a real I/O error is worth failing for.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)
