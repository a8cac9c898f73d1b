"""Read a user-named file safely: a regular file only, and never more than a cap.

Every file the registry reads (generation files, tuning tables, overrides files, a
``--hf-config``) goes through ``read_capped``. A FIFO would block ``open()`` forever and
``/dev/zero`` would never end, so the file is opened without blocking, checked on the open
descriptor (no window between the check and the read), refused by size first, and read for at
most the cap plus one byte (a file that grows while read is still refused).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class FileRefused(Exception):
    """The file cannot be read as data: ``message`` says why, ``hint`` what to do."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.message, self.hint = message, hint


def not_regular(mode: int) -> str | None:
    """What a non-regular file is ("a FIFO (named pipe)"), or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def read_capped(path: Path, cap: int) -> bytes:
    """The bytes of regular file ``path``, at most ``cap`` of them; raises FileRefused."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise FileRefused(
            f"cannot read file: {e.strerror or e}", "check that it exists and is readable"
        ) from None
    try:
        st = os.fstat(fd)
        what = not_regular(st.st_mode)
        if what is not None:
            raise FileRefused(
                f"is {what}, not a regular file", "name a regular file; data is never streamed"
            )
        if st.st_size > cap:
            raise FileRefused(
                f"file is {st.st_size} bytes, over the {cap}-byte limit",
                "data files are small; is this the right file?",
            )
        chunks, got = [], 0
        while got <= cap:
            chunk = os.read(fd, cap + 1 - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got > cap:
            raise FileRefused(
                f"file grew past the {cap}-byte limit while it was read",
                "data files are small; is this the right file?",
            )
        return b"".join(chunks)
    except OSError as e:
        raise FileRefused(
            f"cannot read file: {e.strerror or e}", "check that it exists and is readable"
        ) from None
    except MemoryError:
        raise FileRefused("out of memory while reading the file", "free memory and retry") from None
    finally:
        os.close(fd)
