"""Root file operations on paths a deployment's script can change.

The agent runs as root; a deployment's script (as ``run_as``) may own the directories the
agent later works in: a snapshot's parent, a tar target's ``releases/``.  Between two steps
it can swap any of them for a symlink to a root-only directory.  Path-based calls
(``shutil.rmtree``, ``os.rename(path, …)``, ``open(path)``) would then follow the link and
act as root outside.  Every operation here instead:

- walks from ``/`` one component at a time with ``O_NOFOLLOW | O_DIRECTORY`` (``openat``),
  so a symlink anywhere on the way is refused, never followed;
- names entries relative to an open directory (``dir_fd=``): unlink, rmdir, mkdir, rename,
  symlink, open — never through a path the script can redirect;
- compares what it opened (``st_dev``/``st_ino``) with what was recorded earlier or just
  listed, and refuses when it changed;
- removes trees bottom-up through directory descriptors, unlinking symlinks themselves and
  never crossing into another file system (a mount point is refused, left in place).

A refusal is an :class:`UnsafePath` naming the path and what changed.  Callers resolve a
path once (``DeployContext.check_path``), then hand the resolved path here: from then on no
component may be a symlink.  Blocking code: call it in a thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import secrets
import stat
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "DIR_FLAGS",
    "Dir",
    "Identity",
    "UnsafePath",
    "as_identity",
    "exchange_at",
    "identity",
    "lstat_at",
    "open_dir",
    "open_file_at",
    "open_subdir",
    "private_dir",
    "readlink_at",
    "remove_at",
    "rename_at",
    "replace_symlink",
    "write_file_at",
]

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
Identity = tuple[int, int]
#: Called once per entry a removal visits; may raise to stop it (a budget, a cancel flag).
Step = Callable[[], None]


class UnsafePath(OSError):
    """A root file operation refused because the path is not what it must be (a symlink, a
    replaced directory, another file system); ``str()`` names the path and what changed."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(errno.EPERM, reason, path)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"refusing to work as root on {self.path}: {self.reason}"


def identity(st: os.stat_result) -> Identity:
    """``(st_dev, st_ino)``: what names one file system object."""
    return (st.st_dev, st.st_ino)


def as_identity(recorded: Sequence[int]) -> Identity:
    """An identity as saved in JSON (a two-item list) turned back into a tuple."""
    if len(recorded) != 2:
        raise ValueError(f"an identity is (st_dev, st_ino), not {recorded!r}")
    return (int(recorded[0]), int(recorded[1]))


def _show(ident: Identity) -> str:
    return f"device {ident[0]} inode {ident[1]}"


class Dir:
    """An open directory: its descriptor, the path it was reached by (for messages) and
    its identity.  A context manager that closes it."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        self.stat = os.fstat(fd)
        self.identity = identity(self.stat)

    def join(self, name: str) -> str:
        """The path of entry ``name`` inside, for messages."""
        return os.path.join(self.path, name)

    def expect(self, recorded: Sequence[int] | None) -> None:
        """Refuse when this directory is not the one ``recorded`` earlier."""
        if recorded is not None and as_identity(recorded) != self.identity:
            raise UnsafePath(
                self.path,
                f"it was replaced since it was recorded ({_show(as_identity(recorded))} "
                f"then, {_show(self.identity)} now); check what changed it",
            )

    def close(self) -> None:
        """Close the descriptor (again is harmless)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Dir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_component(parent: int, name: str, shown: str) -> int:
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        try:
            st = os.lstat(name, dir_fd=parent)
        except OSError:
            raise exc from None
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(name, dir_fd=parent)
            raise UnsafePath(
                shown,
                f"it is a symbolic link (to {target}), not a directory; links are not "
                "followed here: name the real directory",
            ) from None
        raise UnsafePath(shown, "it is not a directory") from None


def open_dir(
    path: str | os.PathLike[str],
    *,
    create: bool = False,
    mode: int = 0o755,
    expect: Sequence[int] | None = None,
) -> Dir:
    """Open absolute directory ``path`` walking from ``/`` without following any symlink.

    :param create: make missing components (with ``mode``, less the umask).
    :param expect: the identity recorded earlier; a different directory is refused.
    :raises UnsafePath: a component is a symlink or not a directory, or ``expect`` differs.
    :raises FileNotFoundError: a component is missing and ``create`` is false.
    """
    text = os.fspath(path)
    if not text.startswith("/") or "\0" in text:
        raise UnsafePath(text, "not an absolute path")
    parts = [part for part in os.path.normpath(text).split("/") if part]
    fd = os.open("/", DIR_FLAGS)
    walked = ""
    try:
        for part in parts:
            walked += "/" + part
            try:
                child = _open_component(fd, part, walked)
            except FileNotFoundError:
                if not create:
                    raise FileNotFoundError(errno.ENOENT, "no such directory", walked) from None
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, mode, dir_fd=fd)
                child = _open_component(fd, part, walked)
            os.close(fd)
            fd = child
        handle = Dir(fd, walked or "/")
    except BaseException:
        os.close(fd)
        raise
    try:
        handle.expect(expect)
    except BaseException:
        handle.close()
        raise
    return handle


def open_subdir(
    parent: Dir,
    name: str,
    *,
    create: bool = False,
    mode: int = 0o755,
    expect: Sequence[int] | None = None,
) -> Dir:
    """Open directory ``name`` inside ``parent`` without following a symlink; see
    :func:`open_dir` for the parameters."""
    _plain_name(name, parent)
    shown = parent.join(name)
    try:
        fd = _open_component(parent.fd, name, shown)
    except FileNotFoundError:
        if not create:
            raise FileNotFoundError(errno.ENOENT, "no such directory", shown) from None
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, mode, dir_fd=parent.fd)
        fd = _open_component(parent.fd, name, shown)
    handle = Dir(fd, shown)
    try:
        handle.expect(expect)
    except BaseException:
        handle.close()
        raise
    return handle


def private_dir(parent: Dir, name: str, mode: int = 0o700) -> Dir:
    """Create directory ``name`` in ``parent`` (it must not exist) and open it; refuse unless
    what was opened is the new, empty directory owned by the agent with ``mode``."""
    _plain_name(name, parent)
    os.mkdir(name, mode, dir_fd=parent.fd)
    handle = open_subdir(parent, name)
    try:
        st = handle.stat
        if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & ~mode or os.listdir(handle.fd):
            raise UnsafePath(handle.path, "it was replaced or written to while being created")
    except BaseException:
        handle.close()
        raise
    return handle


def _plain_name(name: str, parent: Dir) -> None:
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise UnsafePath(parent.join(name), f"{name!r} is not a plain entry name")


def lstat_at(parent: Dir, name: str) -> os.stat_result | None:
    """``lstat`` of entry ``name`` in ``parent``; ``None`` when missing."""
    _plain_name(name, parent)
    try:
        return os.lstat(name, dir_fd=parent.fd)
    except FileNotFoundError:
        return None


def readlink_at(parent: Dir, name: str) -> str | None:
    """The target of symlink ``name`` in ``parent``; ``None`` when missing.

    :raises UnsafePath: ``name`` exists and is not a symlink.
    """
    _plain_name(name, parent)
    try:
        return os.readlink(name, dir_fd=parent.fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise UnsafePath(parent.join(name), "it is not a symbolic link") from None
        raise


def open_file_at(parent: Dir, name: str, flags: int, mode: int = 0o600) -> int:
    """``openat(parent, name, flags | O_NOFOLLOW)``: a symlink at ``name`` is refused."""
    _plain_name(name, parent)
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=parent.fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(parent.join(name), "it is a symbolic link") from None
        raise


def write_file_at(
    parent: Dir,
    name: str,
    data: bytes,
    mode: int = 0o600,
    *,
    owner: tuple[int, int] | None = None,
    durable: bool = True,
) -> None:
    """Write ``data`` to ``name`` in ``parent`` atomically: a fresh temporary file (created
    exclusively, never through a link) gets the content, ``mode`` and ``owner`` through its
    descriptor, then is renamed over ``name``.  ``durable`` false skips the fsync, for a
    file that need not outlive a power cut (a script about to run, removed after it)."""
    temporary = f".{name}.{secrets.token_hex(6)}.tmp"
    fd = open_file_at(parent, temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=True) as out:
            out.write(data)
            out.flush()
            if owner is not None:
                os.fchown(out.fileno(), *owner)
            os.fchmod(out.fileno(), mode)  # after chown, which clears set-id bits
            if durable:
                os.fsync(out.fileno())
        rename_at(parent, temporary, parent, name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary, dir_fd=parent.fd)
        raise


def rename_at(src_dir: Dir, src: str, dst_dir: Dir, dst: str) -> None:
    """``renameat``: move entry ``src`` of ``src_dir`` to ``dst`` of ``dst_dir`` (replacing
    a file or empty directory there), neither name resolved through a link."""
    _plain_name(src, src_dir)
    _plain_name(dst, dst_dir)
    os.rename(src, dst, src_dir_fd=src_dir.fd, dst_dir_fd=dst_dir.fd)


def replace_symlink(parent: Dir, name: str, target: str) -> None:
    """Point symlink ``name`` in ``parent`` at ``target`` in one step: a new link made under
    a temporary name, renamed over ``name``."""
    temporary = f".{name}-{secrets.token_hex(6)}"
    _plain_name(name, parent)
    os.symlink(target, temporary, dir_fd=parent.fd)
    try:
        rename_at(parent, temporary, parent, name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary, dir_fd=parent.fd)
        raise


_RENAME_EXCHANGE = 2


@functools.cache
def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without renameat2 (glibc < 2.28, musl)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange_at(dir_a: Dir, a: str, dir_b: Dir, b: str) -> bool:
    """Atomically swap entries ``a`` and ``b`` (``renameat2(RENAME_EXCHANGE)`` on the open
    directories).

    :returns: ``False``, having changed nothing, where the system or file system cannot.
    """
    _plain_name(a, dir_a)
    _plain_name(b, dir_b)
    fn = _renameat2()
    if fn is None:
        return False
    if fn(dir_a.fd, os.fsencode(a), dir_b.fd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), dir_b.join(b))


# --------------------------------------------------------------------------- removal


def remove_at(
    parent: Dir,
    name: str,
    *,
    expect: Sequence[int] | None = None,
    step: Step | None = None,
) -> bool:
    """Remove entry ``name`` of ``parent`` whatever it is; a directory with everything in it.

    Never follows a symlink (a link is unlinked itself), never crosses into another file
    system (a mount point inside is refused and left mounted), and refuses a directory
    that changes while it is being opened.  Read-only directories are emptied all the same.

    :param expect: the identity recorded for ``name``; something else there is refused.
    :param step: called once per entry visited (a work budget; it may raise to stop).
    :returns: whether there was anything to remove.
    """
    st = lstat_at(parent, name)
    if st is None:
        return False
    if expect is not None and identity(st) != as_identity(expect):
        raise UnsafePath(
            parent.join(name),
            f"it was replaced since it was recorded ({_show(as_identity(expect))} then, "
            f"{_show(identity(st))} now); not removing it",
        )
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=parent.fd)
        return True
    with open_subdir(parent, name, expect=identity(st)) as top:
        _empty(top, top.stat.st_dev, step)
    os.rmdir(name, dir_fd=parent.fd)
    return True


def _writable(handle: Dir) -> None:
    # Root ignores permission bits; anyone else must open a read-only directory first.
    if os.geteuid() != 0 and handle.stat.st_mode & stat.S_IRWXU != stat.S_IRWXU:
        os.fchmod(handle.fd, stat.S_IMODE(handle.stat.st_mode) | stat.S_IRWXU)


def _empty(top: Dir, device: int, step: Step | None) -> None:
    """Delete everything inside ``top``, depth first, holding at most one descriptor per
    level (an explicit stack: deep trees do not hit Python's recursion limit).

    The tree may change meanwhile: an entry already gone is skipped, a directory that became
    a link is unlinked as a link, one that gained entries is listed again."""
    _writable(top)
    stack: list[tuple[Dir, list[str]]] = [(top, os.listdir(top.fd))]
    try:
        while stack:
            handle, names = stack[-1]
            if names:
                if step is not None:
                    step()
                child = _enter_or_unlink(handle, names.pop(), device)
                if child is not None:
                    stack.append((child, os.listdir(child.fd)))
                continue
            stack.pop()
            if not stack:
                break
            parent = stack[-1][0]
            try:  # a subdirectory now empty: remove it from its parent
                os.rmdir(os.path.basename(handle.path), dir_fd=parent.fd)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno == errno.ENOTDIR:  # replaced by a link or file: unlink that
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.basename(handle.path), dir_fd=parent.fd)
                elif exc.errno == errno.ENOTEMPTY:
                    name = os.path.basename(handle.path)
                    if identity(os.lstat(name, dir_fd=parent.fd)) != handle.identity:
                        raise UnsafePath(
                            handle.path, "it was replaced while being removed"
                        ) from None
                    if step is not None:
                        step()
                    stack.append((handle, os.listdir(handle.fd)))  # written to: list again
                    continue
                else:
                    raise
            handle.close()
    finally:
        for handle, _ in stack[1:]:
            handle.close()


def _enter_or_unlink(handle: Dir, name: str, device: int) -> Dir | None:
    """Unlink entry ``name`` of ``handle`` unless it is a directory; open that one (made
    writable) and return it.  ``None`` when there is nothing more to do for it."""
    try:
        st = os.lstat(name, dir_fd=handle.fd)
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=handle.fd)
            return None
        if st.st_dev != device:
            raise UnsafePath(
                handle.join(name),
                "it is a mount point (another file system); unmount it first: "
                "removal never crosses file systems",
            )
        try:
            child = open_subdir(handle, name, expect=identity(st))
        except UnsafePath:
            now = os.lstat(name, dir_fd=handle.fd)
            if stat.S_ISDIR(now.st_mode):
                raise
            os.unlink(name, dir_fd=handle.fd)  # became a link or file: remove that, only
            return None
    except FileNotFoundError:
        return None  # gone already
    try:
        _writable(child)
    except BaseException:
        child.close()
        raise
    return child
