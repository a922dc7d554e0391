"""Reading input files safely: regular files only, inside their folder unless allowed, never more than a cap.

A FIFO, socket or device is refused from its lstat, before any open (so nothing blocks, not even for an
instant); the open itself uses O_NONBLOCK and O_NOFOLLOW, and fstat checks again that what was opened is the
regular file that was checked. At most max_bytes + 1 bytes are ever read, so a file that grows while it is
read, or a link to /dev/zero, cannot use more memory than the cap.
"""

from __future__ import annotations

import errno
import os
import stat

from hipbatch.text import shown

DEFAULT_MAX_FILE_BYTES = 2 * 1024 * 1024  # no kernel source is this big; bigger files are skipped with a reason

_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_NOCTTY", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


class SkipFile(Exception):
    """A source file that cannot be used; the message is the reason recorded."""


def read_regular(
    path: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    follow_symlinks: bool = False,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    root_label: str = "INPUT_DIR",
) -> bytes:
    """The bytes of one regular file, or SkipFile with the reason.

    A symlink is followed only to a regular file, and, unless follow_symlinks, only to one inside root (when
    root is given; root_label names it in the reason). Files over max_bytes are refused from their size, and
    never read past max_bytes + 1.
    """
    path = os.fspath(path)
    try:
        info = os.lstat(path)
    except OSError as e:
        raise SkipFile(f"unreadable: {e.strerror}") from None
    target = path
    if stat.S_ISLNK(info.st_mode):
        target, info = _link_target(path, root, follow_symlinks, root_label)
    if not stat.S_ISREG(info.st_mode):
        _refuse_kind(info.st_mode)
    if info.st_size > max_bytes:
        raise SkipFile(f"too large ({info.st_size:,} bytes > {max_bytes:,}; --max-file-bytes raises the cap)")
    try:
        fd = os.open(target, _OPEN_FLAGS)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SkipFile("changed into a symlink while being read") from None
        raise SkipFile(f"unreadable: {e.strerror}") from None
    try:
        opened = os.fstat(fd)
        if opened.st_ino != info.st_ino or opened.st_dev != info.st_dev:
            raise SkipFile("replaced by another file while being read")
        return _read_at_most(fd, max_bytes, opened.st_size)
    finally:
        os.close(fd)


def _link_target(
    path: str, root: str | os.PathLike[str] | None, follow_symlinks: bool, root_label: str
) -> tuple[str, os.stat_result]:
    """Where a symlink leads, if it may be followed there, and that file's stat."""
    real = os.path.realpath(path)  # root is resolved afresh too (only links get here): a chdir cannot mislead it
    if root is not None and not follow_symlinks and not _inside(real, os.path.realpath(root)):
        hint = " (--follow-symlinks allows it)" if root_label == "INPUT_DIR" else ""
        raise SkipFile(f"symlink to {shown(real)}, outside {root_label}{hint}")
    try:
        return real, os.lstat(real)
    except OSError as e:
        raise SkipFile(f"broken symlink: {e.strerror}") from None


def _refuse_kind(mode: int) -> None:
    kinds = (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    raise SkipFile(f"not a regular file ({kind})")


def _read_at_most(fd: int, max_bytes: int, size: int) -> bytes:
    """The file's bytes: one read of its size (+1, to see the end) in the usual case, never past max_bytes + 1."""
    left = max_bytes + 1
    ask = min(size + 1, left)
    data = os.read(fd, ask)
    if len(data) < ask:  # a short read of a regular file: its end
        return data
    chunks = [data]
    left -= len(data)
    while left > 0:  # longer than fstat said (growing, or a /proc file): go on in bounded steps
        chunk = os.read(fd, min(left, 1 << 16))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    if left <= 0:
        raise SkipFile(f"too large (grew past {max_bytes:,} bytes while being read)")
    return b"".join(chunks)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)
