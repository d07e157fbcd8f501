"""Decode once: preprocessed images kept on disk as memory-mapped arrays, shared by every run and epoch.

Decoding a 3328 x 2560 JPEG 2000 mammogram takes far longer than a training step on its 512 px
version, so medvision decodes each file once through the shared ``Preprocess.display`` path and stores
the result. Layout under ``<root>/<fingerprint>/``, where the fingerprint hashes the preprocessing
configuration (change the image size or windowing and a new cache is used):

- ``shard-<id>.npy``: float32 ``(n, size, size)`` arrays, opened with ``mmap_mode="r"``;
- ``shard-<id>.json``: which file (resolved path, size, modification time) is at which index, and the
  files that failed to decode with their error, so they are not retried until they change.

Shards are written under a temporary name and renamed into place: concurrent runs never see a half
file, and a run killed mid-way loses only its unfinished shard. Nothing in the cache is a patient
identifier beyond the file paths the user already chose.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from medvision import __version__
from medvision.cores import usable_cores
from medvision.errors import DicomError, PreprocessError
from medvision.parallel import decoder, decoding_pool
from medvision.preprocess import Preprocess, PreprocessConfig
from medvision.progress import progress_bar

log = logging.getLogger(__name__)

CACHE_FORMAT = 3  # bumped whenever decoding changes what an image becomes (2: reduced decoding is the 5/3 band;
# 3: the box measured on the low-pass band)
# Failures that say more about this machine than about the file (permissions, a codec installed later):
# never remembered, so they are retried on the next run.
_TRANSIENT = ("unreadable:", "missing_codec:")


def default_cache_root() -> Path:
    """``$MEDVISION_CACHE``, else ``$XDG_CACHE_HOME/medvision/images``, else ``~/.cache/medvision/images``."""
    if os.environ.get("MEDVISION_CACHE"):
        return Path(os.environ["MEDVISION_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "medvision" / "images"


def fingerprint(cfg: PreprocessConfig) -> str:
    text = json.dumps({"format": CACHE_FORMAT, "preprocess": cfg.model_dump(mode="json"),
                       "medvision": __version__}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def file_key(path: str | os.PathLike) -> str:
    """Identity of a file's current contents: resolved path, size and modification time (ns)."""
    p = Path(path).resolve()
    st = p.stat()
    return f"{p}|{st.st_size}|{st.st_mtime_ns}"


# --- decoding, in threads or processes -------------------------------------------------------------

def _decode_one(path: str, pre: Preprocess | None = None) -> tuple[np.ndarray | None, str]:
    pre = pre or decoder()[0]
    try:
        stored, meta = pre.read(path)
        return pre.display(stored, meta), ""
    except (DicomError, PreprocessError) as exc:
        return None, f"{exc.code}: {exc.message}"
    except OSError as exc:
        return None, f"unreadable: {exc.strerror}"


# Below this many files, threads: no pickling of results, and as fast where the codec releases the GIL.
PROCESS_POOL_MIN_FILES = 64


def iter_decode(
    paths: Sequence[str], pre: Preprocess, workers: int = 0, kind: str = "auto",
    desc: str = "decode", show_progress: bool = True,
) -> Iterator[tuple[np.ndarray | None, str]]:
    """Decode and preprocess ``paths`` with ``workers`` threads or processes (0 = every core this process may use).

    Yields ``(image or None, error)`` per path, in order, so callers can stream results to disk.
    ``kind="auto"`` uses processes for long lists and threads for short ones. Threads scale only as
    far as the codec releases the GIL: numpy / pillow preprocessing and imagecodecs (JPEG-LS, RLE, JPEG) do,
    pydicom's parsing and OpenJPEG through Pillow do not; ``benchmarks/decode_preprocess.py`` measures both on the machine at hand.
    """
    n = workers or usable_cores()
    if kind == "auto":
        kind = "process" if len(paths) >= PROCESS_POOL_MIN_FILES else "thread"
    with progress_bar(desc, total=len(paths), enabled=show_progress) as advance:
        if n == 1 or len(paths) <= 2:
            results: Iterator = (_decode_one(p, pre) for p in paths)
            for r in results:
                advance()
                yield r
        elif kind == "thread":
            with ThreadPoolExecutor(n) as pool:
                for r in pool.map(lambda p: _decode_one(p, pre), paths):
                    advance()
                    yield r
        else:
            with decoding_pool(n, pre.cfg) as pool:
                for r in pool.map(_decode_one, paths, chunksize=max(1, min(16, len(paths) // (4 * n)))):
                    advance()
                    yield r


def decode_many(paths: Sequence[str], pre: Preprocess, workers: int = 0, kind: str = "auto",
                desc: str = "decode", show_progress: bool = True) -> list[tuple[np.ndarray | None, str]]:
    """``iter_decode`` collected into a list."""
    return list(iter_decode(paths, pre, workers, kind, desc, show_progress))


# --- the cache -------------------------------------------------------------------------------------


class CachedArray:
    """A read-only ``(n, size, size)`` view over cached shards; item access reads one image from disk."""

    def __init__(self, shards: dict[str, np.ndarray], where: list[tuple[str, int]], size: int) -> None:
        self._shards, self._where, self.size = shards, where, size
        self.shape = (len(where), size, size)
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self._where)

    def __getitem__(self, i: int) -> np.ndarray:
        shard, idx = self._where[i]
        return np.array(self._shards[shard][idx])

    def to_array(self) -> np.ndarray:
        out = np.empty(self.shape, np.float32)
        for i in range(len(self)):
            out[i] = self[i]
        return out


class ImageCache:
    """Decode-once store for one preprocessing configuration."""

    def __init__(self, pre: Preprocess, root: str | os.PathLike | None = None) -> None:
        self.pre = pre
        self.dir = Path(root or default_cache_root()) / fingerprint(pre.cfg)

    def _index(self) -> tuple[dict[str, tuple[str, int]], dict[str, str]]:
        entries: dict[str, tuple[str, int]] = {}
        failures: dict[str, str] = {}
        if not self.dir.is_dir():
            return entries, failures
        for meta in sorted(self.dir.glob("shard-*.json")):
            try:
                info = json.loads(meta.read_text())
            except (OSError, ValueError):
                log.warning("ignoring unreadable cache index %s", meta.name)
                continue
            shard = meta.stem
            if info.get("count") and not (self.dir / f"{shard}.npy").is_file():
                continue
            for key, idx in info.get("entries", {}).items():
                entries[key] = (shard, idx)
            failures.update(info.get("failures", {}))
        return entries, failures

    def load(
        self, paths: Sequence[str], workers: int = 0, desc: str = "decode", show_progress: bool = True,
    ) -> tuple[CachedArray, list[int], dict[int, str]]:
        """Images for ``paths``: cached ones read from disk, the rest decoded once and added.

        Returns ``(images, kept, errors)``: ``images[j]`` is the image of ``paths[kept[j]]``;
        ``errors`` maps the index of each path that cannot be decoded to the reason.
        """
        keys: list[str | None] = []
        errors: dict[int, str] = {}
        for i, p in enumerate(paths):
            try:
                keys.append(file_key(p))
            except OSError as exc:
                keys.append(None)
                errors[i] = f"unreadable: {exc.strerror}"
        entries, failures = self._index()
        todo = [i for i, k in enumerate(keys) if k is not None and k not in entries and k not in failures]
        transient: dict[str, str] = {}
        if todo:
            transient = self._add([paths[i] for i in todo], [keys[i] for i in todo], workers, desc, show_progress)
            entries, failures = self._index()
        else:
            log.info("%s: all %d image(s) already cached", desc, len(paths))
        shards: dict[str, np.ndarray] = {}
        where, kept = [], []
        for i, k in enumerate(keys):
            if k is None:
                continue
            if k in failures or k not in entries:
                errors[i] = failures.get(k) or transient.get(k, "not cached")
                continue
            shard, idx = entries[k]
            if shard not in shards:
                shards[shard] = np.load(self.dir / f"{shard}.npy", mmap_mode="r")
            where.append((shard, idx))
            kept.append(i)
        return CachedArray(shards, where, self.pre.cfg.image_size), kept, errors

    def _add(self, paths: list[str], keys: list[str], workers: int, desc: str, show_progress: bool) -> dict[str, str]:
        """Decode ``paths`` straight into a new memory-mapped shard (memory stays at one image per worker).

        Returns the failures that are not remembered (see ``_TRANSIENT``), by key.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        shard = f"shard-{uuid.uuid4().hex[:12]}"
        size = self.pre.cfg.image_size
        tmp_npy = self.dir / f".{shard}.npy.tmp"
        arr = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.float32, shape=(len(paths), size, size))
        entries: dict[str, int] = {}
        failures: dict[str, str] = {}
        transient: dict[str, str] = {}
        try:
            for key, (img, err) in zip(keys, iter_decode(paths, self.pre, workers, desc=desc,
                                                         show_progress=show_progress), strict=True):
                if img is None:
                    # a fixable environment, not the file: reported now, retried next time
                    (transient if err.startswith(_TRANSIENT) else failures)[key] = err
                else:
                    arr[len(entries)] = img
                    entries[key] = len(entries)
            arr.flush()
            arr = None  # close the map before the rename
            os.replace(tmp_npy, self.dir / f"{shard}.npy")  # unused trailing slots are harmless
        except BaseException:
            arr = None
            tmp_npy.unlink(missing_ok=True)
            raise
        tmp = self.dir / f".{shard}.json.tmp"
        tmp.write_text(json.dumps({"count": len(entries), "entries": entries, "failures": failures,
                                   "preprocess": self.pre.cfg.model_dump(mode="json")}))
        os.replace(tmp, self.dir / f"{shard}.json")
        return transient
