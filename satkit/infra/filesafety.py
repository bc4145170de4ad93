"""Files that are never half-written: atomic writes (temp file beside the target, then rename), HDF5 files
that survive a full disk (`staged_h5`), folder locks, and checks that an output location is writable
before work starts."""
from __future__ import annotations

import errno
import fcntl
import io
import os
import re
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Sequence

import h5py

from satkit.infra.runtime import UserError


# --------------------------------------------------------------------------------------------
# Files: atomic writes (temp file in the same folder + rename), word maps.
# --------------------------------------------------------------------------------------------
def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through `write(file)` to a temp file beside `path`, then rename: never a half-written file.

    The one atomic writer (checkpoints, JSON, figures). The temp file is created with mode "xb" rather
    than mkstemp, so it gets the usual umask permissions rather than 0600. A process killed mid-write
    leaves only a `.NAME.PID.HEX.tmp` file (see remove_stale_temporaries), never a damaged NAME; the
    fsyncs make that hold across a power loss too (see atomic_write_all).
    """
    atomic_write_all([(path, write)])


def atomic_write_all(writes: Sequence[tuple[str | Path, Callable[[BinaryIO], None]]]) -> None:
    """atomic_write for files that belong together (eval's results and metrics): every temp file is
    written before any is renamed, so a full disk or a crash leaves the previous set, not a mix.

    Durable as well as atomic: each temp file is fsynced before any rename (else a power loss can leave
    the new name pointing at an empty or half file, as ext4 and XFS may order the rename first), and each
    folder once after the renames (else the rename itself may be lost, leaving the previous file)."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, write in writes:
            path = Path(path)
            tmp = _temporary_beside(path)
            staged.append((tmp, path))
            with open(tmp, "xb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for folder in dict.fromkeys(path.parent for _, path in staged):
        fsync_folder(folder)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path beside `path` for writers that want a file name (h5py); renamed to `path` on success.

    The writer must have closed the file when the block ends; it is then fsynced, renamed and its folder
    fsynced, as atomic_write_all does."""
    path = Path(path)
    tmp = _temporary_beside(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


class StagedFile(io.FileIO):
    """A staged HDF5 file as HDF5 writes it (through h5py's file-object driver), which never lets HDF5
    see a failed write. HDF5 does not survive one: after ENOSPC its flush and close fail too, it keeps a
    half-closed file, and it crashed at interpreter exit (SIGSEGV after the right error line; h5py issue
    914), whatever we closed. So a failed write is kept in `error` and reported to HDF5 as done; `check`
    raises it, between writes or after HDF5 has closed the file cleanly. The file is deleted anyway."""

    error: OSError | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        try:
            done = 0
            while self.error is None and done < len(view):
                done += super().write(view[done:])
        except OSError as e:
            self.error = e
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        try:
            return super().truncate(size)
        except OSError as e:
            self.error = self.error or e
            return size or 0

    def check(self) -> None:
        if self.error is not None:
            raise self.error


@contextmanager
def staged_h5(path: str | Path, mode: str) -> Iterator[tuple[h5py.File, Callable[[], None]]]:
    """(h5py.File, check) on a staged file (a temp file, mode "w" or "a"); `check()` raises a write that
    failed (a full disk), and so does the end of the block, once HDF5 has closed the file cleanly. The
    caller deletes the file when it raises (it is a temp file: `atomic_path`, or packing's staged set).
    No raw-data chunk cache (rdcc_nbytes=0): data is written at once, so a full disk is seen where it happens.

    The HDF5 writer of packing (split files) and feature_cache (the encoder's annotations)."""
    raw = StagedFile(path, "r+" if mode == "a" else "w+")
    try:
        with h5py.File(raw, mode, rdcc_nbytes=0) as h5:
            yield h5, raw.check
        raw.check()
    finally:
        raw.close()


def fsync_file(path: str | Path) -> None:
    """Push a closed file's data to the disk, before the rename that gives it its final name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: str | Path) -> None:
    """Make the renames in `folder` durable (its entries are data of their own). A file system that cannot
    sync a folder (EINVAL: some network and FUSE mounts) is let be: the renames are done, only less durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def _temporary_beside(path: Path) -> Path:
    """`.NAME.PID.HEX.tmp` in path's folder (created if missing): the one temp name remove_stale_temporaries knows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temp files of atomic writers that were killed (call only while holding the folder's lock)."""
    for tmp in folder.glob(".*.*.tmp"):
        if re.fullmatch(r"\..+\.\d+\.[0-9a-f]{8}\.tmp", tmp.name):
            tmp.unlink(missing_ok=True)


def check_writable(path: str | Path, what: str) -> None:
    """Refuse an output location that cannot be written (read-only disk, no permission, a file in the
    way) before any work starts, rather than after hours of it."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{path}: cannot write {what} there ({existing} is not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
        raise UserError(f"{path}: cannot write {what} there "
                        f"({'read-only file system' if read_only else 'permission denied'})")


@contextmanager
def folder_lock(folder: Path, what: str) -> Iterator[None]:
    """Hold an exclusive flock on folder/.lock (with our pid in it) while writing into `folder`.

    A second writer is refused with one line naming the holder. The kernel drops the lock when its
    process dies, however it dies, so a lock file left by a killed run never blocks the next one.
    """
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise UserError(f"{folder} is in use by another {what} (pid {holder}); wait for it to end or pick "
                        f"another folder (the lock: {folder / '.lock'})") from None
    try:
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
