"""shared.state.atomic_files: content, modes, failures leave the old file, and the file and directory fsyncs."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from shared.state import atomic_files
from shared.state.atomic_files import atomic_path, write_bytes_atomic


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def umask():
    """Set the umask for one test and put the old one back."""
    old = os.umask(0o022)
    try:
        yield lambda value: os.umask(value)
    finally:
        os.umask(old)


def test_write_bytes_content_and_exact_mode_whatever_the_umask(tmp_path, umask):
    umask(0)  # a private file must still be 0600, not 0666
    write_bytes_atomic(tmp_path / "x.key", b"secret", mode=0o600)
    assert (tmp_path / "x.key").read_bytes() == b"secret" and mode(tmp_path / "x.key") == 0o600
    umask(0o077)  # and a public one exactly 0644, although this umask would narrow it to 0600
    write_bytes_atomic(tmp_path / "x.pub", bytearray(b"pub\n"), mode=0o644)
    assert (tmp_path / "x.pub").read_bytes() == b"pub\n" and mode(tmp_path / "x.pub") == 0o644
    assert leftovers(tmp_path) == []


def test_mode_none_is_what_open_would_give(tmp_path, umask):
    umask(0o027)
    write_bytes_atomic(tmp_path / "a.json", b"{}")
    with atomic_path(tmp_path / "b.json") as tmp:
        tmp.write_text("[]")
    (tmp_path / "c.json").write_text("plain")
    assert mode(tmp_path / "a.json") == mode(tmp_path / "b.json") == mode(tmp_path / "c.json") == 0o640


def test_atomic_path_replaces_the_old_file(tmp_path):
    target = tmp_path / "round-1.safetensors"
    target.write_bytes(b"old")
    with atomic_path(target, mode=0o600) as tmp:
        # a hidden temporary next to the target: same file system, and no reader's glob matches it
        assert tmp.parent == tmp_path and tmp.name.startswith(".round-1.safetensors.") and tmp.name.endswith(".tmp")
        assert tmp.exists() and mode(tmp) == 0o600 and target.read_bytes() == b"old"
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # nothing in place before the body ends
    assert target.read_bytes() == b"new" and mode(target) == 0o600
    assert leftovers(tmp_path) == []


def test_safetensors_writer(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    with atomic_path(tmp_path / "a.safetensors") as tmp:
        save_file({"w": torch.arange(4.0)}, str(tmp))
    assert load_file(str(tmp_path / "a.safetensors"))["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert leftovers(tmp_path) == []


def test_exception_inside_the_context_keeps_the_old_file(tmp_path):
    target = tmp_path / "adapter.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="half way"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a fi")
            raise RuntimeError("half way")
    assert target.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_a_writer_that_raises_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "x.key"
    target.write_bytes(b"old")
    real_write = os.write
    calls = []

    def failing_write(fd, data):
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, bytes(data)[:3])  # a short write first, then the disk is full

    monkeypatch.setattr(atomic_files.os, "write", failing_write)
    with pytest.raises(OSError, match="No space"):
        write_bytes_atomic(target, b"new contents", mode=0o600)
    monkeypatch.undo()
    assert target.read_bytes() == b"old" and len(calls) == 2
    assert leftovers(tmp_path) == []


def test_a_failed_rename_leaves_no_temporary(tmp_path):
    target = tmp_path / "occupied"
    target.mkdir()
    (target / "inside").write_text("x")  # os.replace cannot put a file over a non-empty directory
    with pytest.raises(OSError):
        write_bytes_atomic(target, b"data")
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"data")
    assert target.is_dir() and leftovers(tmp_path) == []


def _record_syncs(monkeypatch) -> list[tuple]:
    """Record, in order, every fsync (file or directory, by inode) and every replace."""
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", "dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
        return real_fsync(fd)

    def replace(src, dst, *a, **kw):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(atomic_files.os, "fsync", fsync)
    monkeypatch.setattr(atomic_files.os, "replace", replace)
    return events


@pytest.mark.parametrize("how", ["bytes", "path"])
def test_file_fsynced_before_the_rename_and_directory_after(tmp_path, monkeypatch, how):
    target = tmp_path / "checkpoint.safetensors"
    events = _record_syncs(monkeypatch)
    if how == "bytes":
        write_bytes_atomic(target, b"payload")
    else:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"payload")
    monkeypatch.undo()
    kinds = [e[:2] for e in events]
    assert kinds == [("fsync", "file"), ("replace", events[1][1]), ("fsync", "dir")]
    assert events[0][2] == target.stat().st_ino  # the file fsynced is the one now in place
    assert events[1][2] == str(target)
    assert events[2][2] == tmp_path.stat().st_ino  # the target's own directory, after the rename


def test_no_rename_and_no_directory_sync_on_failure(tmp_path, monkeypatch):
    events = _record_syncs(monkeypatch)
    with pytest.raises(ValueError):
        with atomic_path(tmp_path / "f") as tmp:
            tmp.write_bytes(b"x")
            raise ValueError
    assert events == []


def test_directory_fsync_unsupported_is_tolerated_but_io_errors_are_not(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def fsync_dir_fails(code):
        def fsync(fd):
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise OSError(code, os.strerror(code))
            return real_fsync(fd)
        return fsync

    monkeypatch.setattr(atomic_files.os, "fsync", fsync_dir_fails(errno.EINVAL))
    write_bytes_atomic(tmp_path / "a", b"1")  # a file system that cannot fsync a directory
    assert (tmp_path / "a").read_bytes() == b"1"
    monkeypatch.setattr(atomic_files.os, "fsync", fsync_dir_fails(errno.EIO))
    with pytest.raises(OSError) as info:
        write_bytes_atomic(tmp_path / "b", b"2")
    assert info.value.errno == errno.EIO


def test_does_not_write_through_a_planted_temporary(tmp_path, monkeypatch):
    """A name already taken (a planted file or symlink) is skipped, never opened."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    names = iter(["aaaaaaaaaaaa", "bbbbbbbbbbbb"])
    monkeypatch.setattr(atomic_files.secrets, "token_hex", lambda n: next(names))
    (tmp_path / ".x.key.aaaaaaaaaaaa.tmp").symlink_to(victim)
    write_bytes_atomic(tmp_path / "x.key", b"secret", mode=0o600)
    assert victim.read_bytes() == b"untouched" and (tmp_path / "x.key").read_bytes() == b"secret"
    assert leftovers(tmp_path) == [".x.key.aaaaaaaaaaaa.tmp"]  # the planted link, left for its owner


def test_shared_imports_no_role():
    source = open(atomic_files.__file__).read()
    for role in ("broker", "silo_agent", "trunk_worker", "splitfed"):
        assert f"import {role}" not in source and f"from {role}" not in source
