"""medvision.cores: every default pool and thread count follows the CPUs and the CPU quota the process was given."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from medvision.cores import affinity_cpus, cpu_quota, usable_cores


def _proc(tmp_path: Path, cgroup: str, mounts: list[tuple[str, Path, str, str]]) -> Path:
    """A ``/proc/self`` holding ``cgroup`` and a mount table of ``(root, mount point, fstype, super options)``."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text("".join(
        f"{30 + i} 23 0:{40 + i} {root} {point} rw,nosuid,nodev,noexec,relatime shared:9 - {fstype} cgroup {options}\n"
        for i, (root, point, fstype, options) in enumerate(mounts)))
    return proc


def _write(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text)


def test_a_containers_cgroup_v2_quota_is_read(tmp_path):
    # a container with its own cgroup namespace (docker --cpus=1.5 on cgroup v2): its cgroup is the mount's root
    mount = tmp_path / "sys/fs/cgroup"
    _write(mount, cpu_max="150000 100000\n", **{"cgroup.controllers": "cpu io memory pids\n"})
    proc = _proc(tmp_path, "0::/\n", [("/", mount, "cgroup2", "rw,nsdelegate")])
    assert cpu_quota(proc) == 1.5


def test_the_smallest_quota_on_the_way_up_applies(tmp_path):
    # a Kubernetes pod's limit (2 CPUs) above its container's (3 CPUs, never reachable): 2
    mount = tmp_path / "sys/fs/cgroup"
    pod, container = mount / "kubepods/pod1", mount / "kubepods/pod1/c1"
    _write(mount / "kubepods", cpu_max="max 100000\n")
    _write(pod, cpu_max="200000 100000\n")
    _write(container, cpu_max="300000 100000\n")
    proc = _proc(tmp_path, "0::/kubepods/pod1/c1\n", [("/", mount, "cgroup2", "rw")])
    assert cpu_quota(proc) == 2.0
    (pod / "cpu.max").write_text("max 100000\n")
    (container / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(proc) is None  # "max": no quota


def test_a_cgroup_v1_quota_seen_through_the_mount_of_the_containers_own_cgroup(tmp_path):
    # cgroup v1 without a cgroup namespace: /proc/self/cgroup names the host's path, the mount shows it as its root
    mount = tmp_path / "sys/fs/cgroup/cpu,cpuacct"
    _write(mount, cpu_cfs_quota_us="50000\n", cpu_cfs_period_us="100000\n")
    proc = _proc(tmp_path, "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n",
                 [("/docker/abc", mount, "cgroup", "rw,cpu,cpuacct"),
                  ("/docker/abc", tmp_path / "sys/fs/cgroup/memory", "cgroup", "rw,memory")])
    assert cpu_quota(proc) == 0.5
    (mount / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota(proc) is None


def test_a_cgroup_outside_what_the_mount_shows_is_not_read(tmp_path):
    # the process's cgroup (/B/c) is not below the mount's root (/A): the folder at the mount point is /A's, not its
    mount = tmp_path / "cpu"
    _write(mount, cpu_cfs_quota_us="50000\n", cpu_cfs_period_us="100000\n")
    _write(mount / "c", cpu_cfs_quota_us="50000\n", cpu_cfs_period_us="100000\n")
    proc = _proc(tmp_path, "4:cpu:/B/c\n", [("/A", mount, "cgroup", "rw,cpu")])
    assert cpu_quota(proc) is None
    (proc / "cgroup").write_text("4:cpu:/A/../B\n")
    assert cpu_quota(proc) is None


def test_mount_points_with_escaped_and_undecodable_characters(tmp_path):
    # the mount table writes a space as \040 and a backslash as \134; a path's bytes need not be UTF-8
    mount = os.fsencode(tmp_path) + b"/cgroup v2 \\ \xe9"
    os.makedirs(mount)
    with open(mount + b"/cpu.max", "wb") as fh:
        fh.write(b"250000 100000\n")
    escaped = os.fsencode(tmp_path).replace(b" ", b"\\040") + b"/cgroup\\040v2\\040\\134\\040\xe9"
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text("0::/\n")
    (proc / "mountinfo").write_bytes(b"30 23 0:40 / " + escaped + b" rw,relatime shared:9 - cgroup2 cgroup2 rw\n")
    assert cpu_quota(proc) == 2.5


def test_no_cgroup_to_read_means_no_quota(tmp_path):
    assert cpu_quota(tmp_path / "nowhere") is None
    proc = _proc(tmp_path, "garbage without colons\n0::/\n", [("/", tmp_path / "missing", "cgroup2", "rw")])
    assert cpu_quota(proc) is None


def _cgroup_with_quota(cpus: float) -> tuple[Path, Path] | None:
    """A real cgroup limited to ``cpus`` CPUs (cgroup v1's cpu controller, or v2's where it is delegated), as
    ``(its cgroup.procs, its folder)``; None where this machine does not let the tests make one."""
    name, quota = f"medvision-test-{uuid.uuid4().hex[:8]}", str(int(cpus * 100000))
    hierarchies = []
    if Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").is_file():
        hierarchies.append(("v1", Path("/sys/fs/cgroup/cpu")))
    control = Path("/sys/fs/cgroup/cgroup.subtree_control")
    if control.is_file() and "cpu" in control.read_text().split():
        hierarchies.append(("v2", Path("/sys/fs/cgroup")))
    for version, mount in hierarchies:
        folder = mount / name
        try:
            folder.mkdir()
        except OSError:
            continue
        try:
            if version == "v1":
                (folder / "cpu.cfs_period_us").write_text("100000")
                (folder / "cpu.cfs_quota_us").write_text(quota)
            else:
                (folder / "cpu.max").write_text(f"{quota} 100000")
        except OSError:
            folder.rmdir()
            continue
        return folder / "cgroup.procs", folder
    return None


def test_a_process_in_a_real_cgroup_with_a_cpu_quota_sizes_its_pools_by_it(artifact):
    made = _cgroup_with_quota(1.0)
    if made is None:
        pytest.skip("this machine does not let a test create a cgroup with a CPU quota (not root, or no writable "
                    "cgroup hierarchy with the cpu controller); the cgroup files are read in the tests above")
    procs, folder = made
    probe = ("import json, sys; from medvision.cores import cpu_quota, usable_cores, physical_cores; "
             "from medvision.serving.engine import Engine; from medvision.serving.settings import Settings; "
             "e = Engine(sys.argv[1]); "
             "print(json.dumps({'quota': cpu_quota(), 'usable': usable_cores(), 'physical': physical_cores(), "
             "'decoders': Settings().decoders, 'onnx_threads': e.session.get_session_options().intra_op_num_threads}))")
    try:  # the shell joins the cgroup, then becomes Python: the probe starts inside it
        out = subprocess.run(["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(procs), sys.executable, "-c", probe,
                              str(artifact)], capture_output=True, text=True, timeout=120,
                             env={k: v for k, v in os.environ.items() if k != "MEDVISION_DECODE_PROCESSES"})
    finally:
        for _ in range(50):  # the probe's exit can take a moment to leave the cgroup empty
            try:
                folder.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["quota"] == 1.0
    assert got["usable"] == got["physical"] == got["onnx_threads"] == 1
    assert got["decoders"] == 0  # one core: the service decodes in its own threads, no worker processes
    # outside the cgroup this process keeps every CPU it may run on
    assert usable_cores() == len(affinity_cpus()) or cpu_quota() is not None
