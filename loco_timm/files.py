"""Files written atomically (a temporary name, then ``os.replace``) get the permissions a plain write would give.

``tempfile.mkstemp`` and some libraries create files at 0600; after the rename such a file would be unreadable to
the group and others although every other file of the folder is readable (a shared folder, a cluster job under
another user). :func:`plain_permissions` sets what ``open(path, "w")`` would have set under the current umask.
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

__all__ = ['umask', 'plain_permissions', 'file_digest', 'write_text_atomic']


def umask() -> int:
    """The process's umask (read without changing it for long)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_permissions(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a folder, everything in it) the mode a plain write would: 0666 (files) or 0777
    (folders) minus the umask; executable bits already set are kept."""
    mask = umask()
    root = Path(path)
    for p in [root, *root.rglob('*')] if root.is_dir() else [root]:
        if p.is_symlink():
            continue
        mode = 0o777 if p.is_dir() else 0o666 | (stat.S_IMODE(p.stat().st_mode) & 0o111)
        os.chmod(p, mode & ~mask)


def file_digest(path: str | os.PathLike, digest: Any = None) -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks, fed into ``digest`` (default: a new sha256)."""
    digest = digest if digest is not None else hashlib.sha256()
    with open(path, 'rb') as handle:
        for block in iter(lambda: handle.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``: a kill or a full disk
    leaves the previous file whole (or none), never a half-written one; a failed write removes its temporary file."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
