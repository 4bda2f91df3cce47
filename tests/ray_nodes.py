"""Real Ray nodes for tests, started with ``ray start --block`` and stopped by PID (never ``ray stop``).

Each node gets its own ports (another Ray cluster may run on the machine) and every cluster its own ``RAY_TMPDIR``,
so the pointer ``ray start`` writes lands in ``RAY_TMPDIR/ray/ray_current_cluster``, never in ``/tmp/ray``. A node can
run inside a :class:`PrivateDisk`: its own mount namespace with a tmpfs over a path, so a file written there on that
node is invisible to the others, as on machines with node-local disks (needs root, ``unshare`` and ``nsenter``). The
namespace is held by a sleeping process, so a node's Ray can be killed and started again with its disk intact.

Example:
    >>> disk_a, disk_b = PrivateDisk([ckpt]), PrivateDisk([ckpt])  # doctest: +SKIP
    >>> head = RayNode.start_head(tmp / "a", env=env, num_gpus=1, disk=disk_a)  # doctest: +SKIP
    >>> worker = RayNode.start_worker(tmp / "b", head.address, env=env, num_gpus=1, disk=disk_b)  # doctest: +SKIP
    >>> disk_b.path(ckpt)  # node B's files, seen from the test  # doctest: +SKIP
    >>> worker.stop(); head.stop(); disk_a.close(); disk_b.close()  # doctest: +SKIP
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_test_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment for a private test cluster: its own short ``RAY_TMPDIR`` (Unix socket paths must stay under
    108 bytes), token authentication off (a local test cluster), no usage stats."""
    env = dict(os.environ if base is None else base)
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def can_make_private_mounts() -> str | None:
    """``None`` if this process can give a child a private tmpfs (mount namespace), else the reason it cannot."""
    if shutil.which("unshare") is None:
        return "no `unshare` binary"
    probe = tempfile.mkdtemp(prefix="mntprobe")
    try:
        out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                              f"mount -t tmpfs -o size=1m tmpfs {shlex.quote(probe)} && touch {probe}/x"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            return f"cannot create a mount namespace with a tmpfs: {out.stderr.strip() or out.returncode}"
        if os.listdir(probe):
            return "the tmpfs mounted in a private namespace is visible outside it"
        return None
    finally:
        shutil.rmtree(probe, ignore_errors=True)


class PrivateDisk:
    """A mount namespace with a private tmpfs over each of ``dirs``, held open by a sleeping process.

    Processes started with :meth:`enter` prefixed to their command see these tmpfs; everyone else sees the host's
    directories. :meth:`path` reads the namespace's view from outside (``/proc/PID/root``).
    """

    def __init__(self, dirs: list[Path], size: str = "4g"):
        self.dirs = [Path(d) for d in dirs]
        mounts = " && ".join(f"mkdir -p {shlex.quote(str(d))} && mount -t tmpfs -o size={size} tmpfs "
                             f"{shlex.quote(str(d))}" for d in self.dirs)
        self.holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                        f"{mounts} && echo mounted && exec sleep infinity"],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       start_new_session=True)
        first = self.holder.stdout.readline().strip()
        if first != "mounted":
            self.close()
            raise RuntimeError(f"cannot mount a private tmpfs: {first}")

    def enter(self) -> list[str]:
        """The command prefix that runs a program inside this namespace."""
        return ["nsenter", f"--target={self.holder.pid}", "--mount", "--"]

    def path(self, p: str | Path) -> Path:
        """``p`` as the processes inside the namespace see it."""
        return Path(f"/proc/{self.holder.pid}/root") / Path(p).relative_to("/")

    def close(self) -> None:
        """End the namespace (its tmpfs and files go with it)."""
        if self.holder.poll() is None:
            self.holder.kill()
        self.holder.wait(timeout=30)


def _ip(node_ip: str | None) -> list[str]:
    # Nodes of one simulated cluster on one machine would otherwise all advertise this machine's IP; veRL orders
    # its ranks by node IP (sort_placement_group_by_node_ip), so on equal IPs rank 0 lands on either node. Distinct
    # loopback addresses (127.0.0.0/8 all reach this machine) make the order what it is on a real cluster.
    return [f"--node-ip-address={node_ip}"] if node_ip else []


class RayStartError(RuntimeError):
    """``ray start`` exited or did not report "Ray runtime started" in time."""


def _session_log_tails(ray_tmpdir: Path, *, since: float, lines: int = 30) -> str:
    """The last ``lines`` of each GCS and raylet log written since ``since``: why a node did not come up.

    ``session_2*`` skips Ray's ``session_latest`` link, which would print each log twice.
    """
    logs = sorted((p for pattern in ("gcs_server*", "raylet*") for p in ray_tmpdir.glob(f"ray/session_2*/logs/{pattern}")
                   if p.is_file() and p.stat().st_mtime >= since and p.stat().st_size), key=lambda p: p.stat().st_mtime)
    return "".join(f"\n--- {p} (last {lines} lines) ---\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
                   for p in logs)


@dataclass
class RayNode:
    """One ``ray start --block`` process (and everything it started); ``address`` is the head's GCS address."""

    proc: subprocess.Popen
    log_path: Path
    address: str
    env: dict[str, str]
    disk: PrivateDisk | None = None

    @classmethod
    def start_head(cls, workdir: Path, *, env: dict[str, str], num_cpus: int = 16, num_gpus: int = 0,
                   disk: PrivateDisk | None = None, timeout: float = 120, node_ip: str | None = None) -> RayNode:
        node = cls._start_with_retry(
            workdir, lambda: ["--head", f"--port={free_port()}", f"--ray-client-server-port={free_port()}",
                              *_ip(node_ip)],
            env=env, num_cpus=num_cpus, num_gpus=num_gpus, disk=disk, address="", timeout=timeout)
        # the GCS address as Ray advertises it (this machine's IP): what `ray start` recorded in the pointer file
        node.address = (Path(env["RAY_TMPDIR"]) / "ray" / "ray_current_cluster").read_text().strip()
        return node

    @classmethod
    def start_worker(cls, workdir: Path, head_address: str, *, env: dict[str, str], num_cpus: int = 16,
                     num_gpus: int = 0, disk: PrivateDisk | None = None, timeout: float = 120,
                     node_ip: str | None = None) -> RayNode:
        return cls._start_with_retry(workdir, lambda: [f"--address={head_address}", *_ip(node_ip)], env=env,
                                     num_cpus=num_cpus, num_gpus=num_gpus, disk=disk, address=head_address,
                                     timeout=timeout)

    @classmethod
    def _start_with_retry(cls, workdir: Path, make_args, **kw) -> RayNode:
        # `ray start` gives the raylet a fixed 30 s to register with the GCS (ray/_private/node.py,
        # raylet_start_wait_time_s) and exits when one GCS call overruns it. On a loaded 2-core CI box that happened
        # once in ~20 runs ("The current node timed out during startup"). The node is this test's scaffolding, not
        # the code under test, so one more try on fresh ports, with the first failure (and the GCS/raylet logs)
        # printed, and a second failure raised.
        try:
            return cls._start(workdir, make_args(), **kw)
        except RayStartError as first:
            print(f"ray start failed once, trying again on fresh ports:\n{first}", file=sys.stderr, flush=True)
            return cls._start(workdir, make_args(), **kw)

    @classmethod
    def _start(cls, workdir: Path, args: list[str], *, env: dict[str, str], num_cpus: int, num_gpus: int,
               disk: PrivateDisk | None, address: str, timeout: float) -> RayNode:
        workdir.mkdir(parents=True, exist_ok=True)
        log_path = workdir / f"ray_start.{time.monotonic_ns()}.log"
        head_only = ["--include-dashboard=false"] if "--head" in args else []  # ray start refuses it on workers
        ray_cmd = [RAY, "start", "--block", f"--num-cpus={num_cpus}", *head_only,
                   f"--num-gpus={num_gpus}", "--disable-usage-stats",
                   f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}", *args]
        cmd = (disk.enter() if disk is not None else []) + ray_cmd  # nsenter execs: the PID is ray start's
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                                    start_new_session=True)
        node = cls(proc, log_path, address, env, disk)
        started = time.time()
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in log_path.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                text = log_path.read_text()
                node.stop()
                raise RayStartError(f"ray start failed (rc {proc.returncode}):\n{text[-4000:]}"
                                    f"{_session_log_tails(Path(env['RAY_TMPDIR']), since=started)}")
            time.sleep(0.5)
        return node

    def pids(self) -> list[int]:
        """This node's processes: ``ray start`` and every descendant (GCS, raylet, agents, workers)."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root.pid, *(p.pid for p in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """SIGKILL the node at once (a node that dies): its processes, nothing else."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)

    def stop(self, grace: float = 5) -> None:
        """SIGTERM this node's processes (by PID), SIGKILL what is left after ``grace`` seconds."""
        import psutil

        procs = []
        for pid in self.pids():
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        # A `ray start` that already exited (a failed start) is no longer the parent of what it started, so the walk
        # above misses those. They are still in its process group, which is ours alone (start_new_session).
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def remove_ray_tmpdir(env: dict[str, str]) -> None:
    """Remove the cluster's private ``RAY_TMPDIR`` (session logs, the pointer file)."""
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
