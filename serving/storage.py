"""The data folder: every file the service writes from what it receives, named by the service, kept inside.

Layout under ``data_dir``: ``instances/ab/<32 hex>.dcm`` (received images), ``reports/<32 hex>.dcm`` (SRs and
heatmap captures), ``incoming/`` (parts while a request streams in), ``renders/`` (the review UI's PNG cache).
No name is ever built from request data: UIDs are checked where they enter, and still never reach a path. A new
file gets a random name and is linked in exclusively, so it can never replace another file (another site's
above all). Folders are 0700 and files 0600: they hold patient data. A path read back from the database is
checked to lie inside the folder before it is opened.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
import uuid
from pathlib import Path

from medvision.errors import MedvisionError

FOLDER_MODE = 0o700
FILE_MODE = 0o600


class OutsideDataFolder(MedvisionError):
    code = "outside_data_folder"


def private_folder(path: Path) -> Path:
    """``path`` (and missing parents, each) created 0700; an existing ``path`` is tightened to 0700."""
    missing = []
    for p in (path, *path.parents):
        if p.exists():
            break
        missing.append(p)
    for p in reversed(missing):
        p.mkdir(mode=FOLDER_MODE, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(FOLDER_MODE)
    return path


def fsync_folder(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DataFolder:
    """The service's ``data_dir``."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = private_folder(Path(root)).resolve()

    def folder(self, name: str) -> Path:
        return private_folder(self.root / name)

    @property
    def incoming(self) -> Path:
        return self.folder("incoming")

    def inside(self, path: str | os.PathLike) -> Path:
        """``path`` resolved, if it lies inside the data folder; ``OutsideDataFolder`` otherwise."""
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(self.root):
            raise OutsideDataFolder("a stored path points outside the data folder")
        return resolved

    def sweep_incoming(self, older_than_seconds: float = 3600) -> int:
        """Delete parts a request left in ``incoming/`` when the service died under it (they hold patient data);
        only old ones, since another service process may be receiving into the same folder. Returns how many."""
        import time

        gone = 0
        cutoff = time.time() - older_than_seconds
        for p in self.incoming.iterdir():
            try:
                if p.is_file() and p.stat().st_mtime < cutoff:
                    p.unlink()
                    gone += 1
            except FileNotFoundError:
                continue
        return gone

    def temporary(self, suffix: str = ".part") -> tuple[int, Path]:
        """A new private temporary file in ``incoming/``: ``(fd, path)``."""
        fd, name = tempfile.mkstemp(dir=self.incoming, suffix=suffix)  # mkstemp: mode 0600, O_EXCL
        return fd, Path(name)

    def file_instance(self, source: Path) -> Path:
        """Move a received file (already fsynced) into ``instances/`` under a new name; returns the new path."""
        return self._link_in(source, "instances", fan_out=True)

    def write_dataset(self, ds) -> Path:
        """A DICOM object the service made (an SR, a capture), written to ``reports/`` under a name derived from its
        SOP Instance UID (a hash: no character of the UID reaches the path). The service derives those UIDs from
        what the object says, so the same object made twice (a job run again after a crash between writing it and
        recording it) lands on the same file: the one already there is kept, nothing is left unreferenced."""
        name = hashlib.sha256(str(ds.SOPInstanceUID).encode()).hexdigest()[:40]
        target = self.folder("reports") / f"{name}.dcm"
        if target.is_file():
            return target
        fd, tmp = self.temporary(".dcm")
        try:
            with os.fdopen(fd, "wb") as fh:
                ds.save_as(fh, enforce_file_format=True)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                _link_exclusive(tmp, target)
            except FileExistsError:  # another process wrote the same object meanwhile: theirs stands
                return target
            os.chmod(target, FILE_MODE)
            fsync_folder(target.parent)
            return target
        finally:
            tmp.unlink(missing_ok=True)

    def _link_in(self, source: Path, folder: str, fan_out: bool = False) -> Path:
        for _ in range(8):
            name = uuid.uuid4().hex
            parent = self.folder(f"{folder}/{name[:2]}") if fan_out else self.folder(folder)
            target = parent / f"{name}.dcm"
            try:
                _link_exclusive(source, target)
            except FileExistsError:  # 2^-122: never in practice, but never over another file either
                continue
            source.unlink(missing_ok=True)
            os.chmod(target, FILE_MODE)
            fsync_folder(parent)
            return target
        raise OSError(errno.EEXIST, "could not find a free file name in the data folder")


def _link_exclusive(source: Path, target: Path) -> None:
    """``target`` becomes ``source``'s content atomically, failing if ``target`` exists."""
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        # a file system without hard links: reserve the name exclusively, then replace our own empty file
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
        os.replace(source, target)
