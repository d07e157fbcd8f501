"""How many cores this process may use: the one answer every default thread and worker count reads.

``os.cpu_count()`` counts the host's CPUs: in a container given 2 CPUs on a 64-core node, or under ``taskset``, a
pool sized by it starts 64 decoding processes that share 2 CPUs (each with its full-field buffers), and ONNX Runtime
left to itself does the same with its threads. Two limits apply to a process on Linux, and both are read here:

- its **CPU affinity** (``taskset``, a container's CPU set, Kubernetes' static CPU manager): the CPUs it may run on;
- its **CPU quota** (``docker --cpus``, a Kubernetes CPU limit: cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` /
  ``cpu.cfs_period_us``, the smallest along its cgroup's path): how much CPU time it may use per period. A quota of
  1.5 CPUs counts as 2 cores (rounded up, as Go's runtime and .NET do: a pool of 1 would leave half a CPU unused).
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path

_PROC = Path("/proc/self")
_OCTAL = re.compile(r"\\([0-7]{3})")  # the mount table writes a space in a path as \040, a backslash as \134
QUOTA_REREAD_S = 10.0  # a process's quota can change while it runs (a resized container): read again after this


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def _text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", "surrogateescape")  # a mount point need not be valid UTF-8


def _cgroup_dirs(proc: Path = _PROC) -> list[tuple[str, Path, Path]]:
    """``(version, mount point, folder)`` of this process's cgroup in each mounted hierarchy that can limit CPU time
    (``"v2"``: the unified hierarchy; ``"v1"``: the ``cpu`` controller's), the folder as this process's mount table
    shows it (a container sees its own cgroup as the hierarchy's root)."""
    try:
        groups = _text(proc / "cgroup").splitlines()
        mounts = _text(proc / "mountinfo").splitlines()
    except OSError:
        return []
    paths: dict[str, str] = {}  # "v2" or "v1" -> this process's path in that hierarchy
    for line in groups:
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if number == "0" and controllers == "":
            paths["v2"] = path
        elif "cpu" in controllers.split(","):
            paths["v1"] = path
    found = []
    for line in mounts:
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or not tail:
            continue
        fstype, options = tail[0], tail[2] if len(tail) > 2 else ""
        version = "v2" if fstype == "cgroup2" else "v1" if fstype == "cgroup" and "cpu" in options.split(",") else ""
        path = paths.get(version)
        if path is None:
            continue
        root, point = _unescape(fields[3]), Path(_unescape(fields[4]))
        if root != "/":  # the mount shows only the hierarchy below ``root``: this process's cgroup must be in it
            if not (path == root or path.startswith(root.rstrip("/") + "/")):
                continue
            path = path[len(root.rstrip("/")):]
        if any(part == ".." for part in path.split("/")):
            continue
        found.append((version, point, point / path.lstrip("/")))
    return found


def _quota_in(version: str, folder: Path) -> float | None:
    """The CPU quota set on ``folder`` itself, in CPUs; None where it sets none (or it cannot be read)."""
    try:
        if version == "v2":
            quota, period = _text(folder / "cpu.max").split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota = int(_text(folder / "cpu.cfs_quota_us"))
        period = int(_text(folder / "cpu.cfs_period_us"))
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError, ZeroDivisionError):
        return None


def cpu_quota(proc: Path = _PROC) -> float | None:
    """The CPU time this process may use, in CPUs (1.5: one and a half CPUs' worth each period): the smallest quota
    on its cgroup and on every cgroup above it that it can see; None where none is set, or where what the system
    shows cannot be read (not Linux, an unexpected mount table). This process's own is read again at most every
    ``QUOTA_REREAD_S`` seconds."""
    if proc == _PROC and time.monotonic() - _read_at[0] < QUOTA_REREAD_S:
        return _read_at[1]
    limits = []
    try:
        for version, point, folder in _cgroup_dirs(proc):
            for level in (folder, *folder.parents):
                if (q := _quota_in(version, level)) is not None and q > 0:
                    limits.append(q)
                if level == point or level == level.parent:
                    break
    except (OSError, ValueError):  # a table or file unlike any seen: no quota rather than no service
        limits = []
    quota = min(limits) if limits else None
    if proc == _PROC:
        _read_at[:] = [time.monotonic(), quota]
    return quota


_read_at: list = [-float("inf"), None]  # when this process's quota was last read, and what it was


def affinity_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity where the platform has one, else every CPU)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def usable_cores() -> int:
    """The cores this process may use: its CPUs, fewer where a CPU quota allows less (rounded up)."""
    cpus = len(affinity_cpus())
    quota = cpu_quota()
    return max(1, min(cpus, math.ceil(quota - 1e-9)) if quota else cpus)


def physical_cores() -> int:
    """The physical cores among the CPUs this process may run on (hyper-threads of one core counted once, where
    Linux's ``/sys`` says which share a core; elsewhere each CPU counts), no more than ``usable_cores``: the ONNX
    Runtime intra-op threads to ask for where none are given. Left to itself, ONNX Runtime counts every physical core
    of the machine and pins a thread to each, whatever the process's CPU affinity or quota: in a 2-CPU set of a
    64-core host, 31 threads, most pinned to cores the service was not given."""
    cores = set()
    for cpu in affinity_cpus():
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:  # no topology to read (not Linux, or a restricted /sys): each CPU a core
            cores.add(str(cpu))
    return max(1, min(len(cores), usable_cores()))
