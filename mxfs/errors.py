"""Domain errors, and the one place where they become errno values.

Everything below ``fs`` raises these (or plain ``OSError``); ``fs`` turns them into
``pyfuse3.FUSEError`` with :func:`errno_for`.  Keeping the mapping here means the FUSE layer stays a
thin translation and the CLI can report the same failures in words.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator


class MxfsError(Exception):
    """Base class: a failure the user can be told about, with the errno a reader will see."""

    errno: int = errno.EIO


class InvalidName(MxfsError):
    """A path component that cannot be a repo id, revision or file: never sent to the Hub."""

    errno = errno.ENOENT


class NameTooLong(MxfsError):
    errno = errno.ENAMETOOLONG


class NotFound(MxfsError):
    """The repo, revision or file does not exist on the Hub (or is not visible to this token)."""

    errno = errno.ENOENT


class AccessDenied(MxfsError):
    """Gated or private repo without access: the fix is a token, so say so."""

    errno = errno.EACCES


class HubUnavailable(MxfsError):
    """The Hub could not be reached, or kept failing, and the bytes are not in the cache."""

    errno = errno.EIO


class OfflineMiss(MxfsError):
    """``HF_HUB_OFFLINE`` is set and the cache does not hold what was asked for."""

    errno = errno.ENOENT


class IntegrityError(MxfsError):
    """Downloaded bytes did not match the Hub's checksum."""

    errno = errno.EIO


class RegistryUnavailable(MxfsError):
    errno = errno.EIO


class DiskFull(MxfsError):
    errno = errno.ENOSPC


class ReadOnly(MxfsError):
    errno = errno.EROFS


def first_domain_error(group: BaseExceptionGroup) -> MxfsError | None:
    """The first domain error among the leaves of an exception group (from a nursery), if any."""
    for exc in group.exceptions:
        if isinstance(exc, MxfsError):
            return exc
        if isinstance(exc, BaseExceptionGroup) and (found := first_domain_error(exc)) is not None:
            return found
    return None


@contextlib.contextmanager
def domain_errors_ungrouped() -> Iterator[None]:
    """Let a nursery's domain error out as itself, not wrapped in an ExceptionGroup.

    Parallel workers fail together (one error cancels the siblings); callers want to know *what*
    failed (EACCES, ENOSPC, EIO), so the first domain error stands for the whole group.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        found = first_domain_error(group)
        if found is None:
            raise
        raise found from group


def errno_for(exc: BaseException) -> int:
    """The errno a FUSE caller should see for ``exc``."""
    if isinstance(exc, MxfsError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO
