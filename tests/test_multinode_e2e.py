"""Two Ray nodes with private disks on this machine: multi-node GRPO without shared storage (issue 12).

Each node runs inside its own mount namespace with a private tmpfs at the checkpoint path (tests/ray_nodes.py), so
a file node B writes there is invisible on node A, as on cloud VMs or pods with node-local disks. One rank per node
(`trainer.nnodes=2 trainer.n_gpus_per_node=1`), gloo between them; the driver runs inside node A's namespace and
joins the cluster as the README tells users: the first run through the pointer file `ray start` wrote on its node
(the CPU config's `num_cpus`/`num_gpus` dropped), the later ones through RAY_ADDRESS. The nodes' Ray processes do not inherit the Hub token or endpoint: those reach
the workers through the run itself (an actor argument; the job's runtime environment).

One cluster and two training runs for the module:
1. `first`: 2 steps, `hf_upload.strategy=checkpoint`: the upload on node A (rank 0) gathers rank 1's shards from
   node B through Ray; ground truth: a consolidation of both nodes' files (sha256 of every file).
2. `resumed`: both disks wiped, `resume=auto`, 3 steps: the Hub snapshot is resharded on node A, rank 1's files move
   to node B, veRL trains step 3 only, and each node holds only its own rank's files. Node B's Ray is then killed
   while the step-3 upload waits on the Hub (held): the upload fails naming rank 1 and node B, the run exits 0 (a
   failed upload never fails a run unless `hf_upload.fail_on_error`), `upload_pending.json` is left, and once node B
   is back (same disk) `python -m training.cluster_upload resume` finishes it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import shared_runs
from tests.ray_nodes import PrivateDisk, RayNode, can_make_private_mounts, ray_test_env, remove_ray_tmpdir

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ALICE = "hf_alice_local_token"
HUB_REPO, NS = "alice/multinode", "mn"
SKIP = can_make_private_mounts()
NODE_A_IP, NODE_B_IP = "127.0.0.2", "127.0.0.3"
SMALL = [
    *shared_runs.SMALL,  # the random tiny model (no warm-up build), no validation: plumbing
    "trainer.save_freq=2",
    "trainer.nnodes=2",
    "trainer.n_gpus_per_node=1",
    "hf_upload.enabled=true",
    f"hf_upload.repo_id={HUB_REPO}",
    f"hf_upload.namespace={NS}",
    "hf_upload.strategy=checkpoint",
]


def _sha256_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and ".cache" not in p.parts}


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _ranks(files: list[str], prefix: str = "") -> set[int]:
    """The ranks whose files are under ``prefix + 'actor/'``."""
    return {int(m.group(1)) for f in files if f.startswith(prefix + "actor/")
            and (m := re.search(r"_rank_(\d+)\.pt$", f))}


class Cluster:
    """The two nodes, their disks, and how to run a command on node A."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.ckpt = tmp / "ckpt"  # the same path on both nodes, a different tmpfs on each
        self.ckpt.mkdir()
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("HF_TOKEN", "HF_ENDPOINT", "HUGGING_FACE"))}  # the nodes know no Hub
        self.node_env = ray_test_env({**base, "PYTHONPATH": str(REPO), "VERL_GRPO_HUB_CACHE": str(tmp / "cache")})
        self.disk_a, self.disk_b = PrivateDisk([self.ckpt]), PrivateDisk([self.ckpt])
        self.a = self.b = None
        try:
            # distinct node IPs, as on a real cluster: veRL orders ranks by node IP, so rank 0 is on node A (the head,
            # where the driver and the trainer run) and rank 1 on node B (tests/ray_nodes.py)
            self.a = RayNode.start_head(tmp / "node_a", env=self.node_env, num_cpus=8, num_gpus=1, disk=self.disk_a,
                                        node_ip=NODE_A_IP)
            self.b = self.start_b()
        except BaseException:
            self.close()  # a node that started must not outlive a failed setup
            raise

    def start_b(self) -> RayNode:
        return RayNode.start_worker(self.tmp / "node_b", self.a.address, env=self.node_env, num_cpus=8, num_gpus=1,
                                    disk=self.disk_b, node_ip=NODE_B_IP)

    def driver_env(self, ray_address: bool = True) -> dict[str, str]:
        env = {**self.node_env, "HF_TOKEN": ALICE, "HF_ENDPOINT": os.environ["HF_ENDPOINT"]}
        if ray_address:
            env["RAY_ADDRESS"] = self.a.address
        return env

    def run_on_a(self, name: str, cmd: list[str], on_line=None, timeout: float = 600,
                 ray_address: bool = True) -> tuple[int, str]:
        """Run ``cmd`` inside node A's namespace (it sees node A's disk); return (exit code, output)."""
        return shared_runs.run_streamed(self.disk_a.enter() + cmd, cwd=self.tmp, env=self.driver_env(ray_address),
                                        log_path=self.tmp / f"{name}.log", on_line=on_line, timeout=timeout)

    def train(self, name: str, overrides: list[str], on_line=None, ray_address: bool = True) -> tuple[int, str]:
        cmd = [sys.executable, str(REPO / "train_grpo.py"), f"hydra.run.dir={self.tmp / name / 'hydra'}", *SMALL,
               f"trainer.default_local_dir={self.ckpt / 'run'}", *overrides]
        return self.run_on_a(name, cmd, on_line, ray_address=ray_address)

    def close(self) -> None:
        for node in (self.b, self.a):
            if node is not None:
                node.stop()
        self.disk_a.close()
        self.disk_b.close()
        remove_ray_tmpdir(self.node_env)


@pytest.fixture(scope="module")
def cluster(hub_server, tmp_path_factory):
    if SKIP:
        pytest.skip(f"needs Linux mount namespaces to give each Ray node a private disk: {SKIP}")
    pointer_before = Path("/tmp/ray/ray_current_cluster").exists()
    hub_server.come_up()
    hub_server.clear_faults()
    c = Cluster(tmp_path_factory.mktemp("multinode"))
    try:
        yield c
    finally:
        c.close()
        if not pointer_before:
            assert not Path("/tmp/ray/ray_current_cluster").exists()


@pytest.fixture(scope="module")
def runs(cluster, hub_server, tmp_path_factory):
    c = cluster
    out: dict = {}
    # joins through `ray start`'s pointer file on node A, no RAY_ADDRESS: the README's multi-node launch
    out["first_rc"], out["first"] = c.train("first", ["trainer.total_training_steps=2", "hf_upload.resume=never"],
                                            ray_address=False)
    assert out["first_rc"] == 0, out["first"][-6000:]
    # each node's own view of the step-2 checkpoint, before anything else touches it
    step2 = c.ckpt / "run" / "global_step_2"
    out["a_after_first"], out["b_after_first"] = _files(c.disk_a.path(step2)), _files(c.disk_b.path(step2))
    both = tmp_path_factory.mktemp("both_nodes") / "global_step_2"
    shutil.copytree(c.disk_a.path(step2), both)
    shutil.copytree(c.disk_b.path(step2), both, dirs_exist_ok=True)  # rank 1's shards: node B only
    out["both_step2"] = both

    for disk in (c.disk_a, c.disk_b):  # fresh node-local disks
        shutil.rmtree(disk.path(c.ckpt / "run"))

    events: dict[str, bool] = {}
    gate = []

    def on_line(line: str) -> None:
        if "multi-node resume:" in line and not events.get("held"):
            # the step-3 upload's preflight is held by the Hub (its client has no read timeout) until node B's Ray
            # is killed, once the trainer is done and only waits for the upload: veRL prints "Final validation
            # metrics" after its last call to the workers. Held, not stalled for a fixed time: no race, no idle wait.
            gate.append(hub_server.hold_next("whoami"))
            events["held"] = True
        if "Final validation metrics" in line and not events.get("killed"):
            c.b.kill()
            events["killed"] = True
            gate[0].set()

    out["resumed_rc"], out["resumed"] = c.train("resumed", ["trainer.total_training_steps=3", "hf_upload.resume=auto"],
                                                on_line)
    out["events"] = dict(events)
    hub_server.clear_faults()
    run = c.ckpt / "run"
    out["a_after_resume"], out["b_after_resume"] = _files(c.disk_a.path(run)), _files(c.disk_b.path(run))
    step3 = run / "global_step_3"
    out["pending_after_kill"] = (c.disk_a.path(step3) / "upload_pending.json").is_file()

    c.b = c.start_b()  # node B is back, with the same disk
    both3 = tmp_path_factory.mktemp("both_nodes3") / "global_step_3"
    shutil.copytree(c.disk_a.path(step3), both3, ignore=shutil.ignore_patterns("upload_pending.json", ".hf_upload*"))
    shutil.copytree(c.disk_b.path(step3), both3, dirs_exist_ok=True)
    out["both_step3"] = both3
    out["resume_rc"], out["resume"] = c.run_on_a("cluster_resume", [sys.executable, "-m", "training.cluster_upload",
                                                                    "resume", str(step3)])
    out["pending_after_resume"] = (c.disk_a.path(step3) / "upload_pending.json").is_file()
    out["a_after_cluster_resume"] = _files(c.disk_a.path(step3))
    return out


def _consolidate(step_dir: Path, out: Path) -> dict[str, str]:
    from utils.load_fsdp_to_hf import consolidate_checkpoint

    consolidate_checkpoint(step_dir / "actor", out, progress=False)
    return _sha256_tree(out)


def _hub(revision: str, dest: Path) -> dict[str, str]:
    from huggingface_hub import snapshot_download

    path = Path(snapshot_download(HUB_REPO, revision=revision, token=ALICE, local_dir=dest))
    return _sha256_tree(path / NS)


def test_the_first_run_joined_the_cluster_ray_start_made_on_its_node(runs, cluster):
    # the README's launch: `ray start` on every node, then `python train_grpo.py` on the head; cpu_demo's
    # num_cpus/num_gpus, which made ray.init refuse to join a running cluster, are left out
    log = runs["first"]
    assert f"ray: joining the Ray cluster at {cluster.a.address} (`ray start` on this node" in log, log[:3000]
    assert "not passing num_cpus, num_gpus" in log and "must not be provided" not in log
    assert "ray: joining the Ray cluster at" in runs["resumed"] and "(RAY_ADDRESS)" in runs["resumed"]


def test_each_node_wrote_only_its_own_ranks_files(runs):
    # one rank per node; the copies gathered for the upload were removed after it
    ranks_a, ranks_b = _ranks(runs["a_after_first"]), _ranks(runs["b_after_first"])
    assert len(ranks_a) == len(ranks_b) == 1 and ranks_a | ranks_b == {0, 1}, (runs["a_after_first"],
                                                                               runs["b_after_first"])
    (rank_b,) = ranks_b
    assert [f for f in runs["b_after_first"] if f.startswith("actor/")] == [
        f"actor/{kind}_world_size_2_rank_{rank_b}.pt" for kind in ("extra_state", "model", "optim")]


def test_the_upload_from_node_a_holds_rank_1s_shards_read_on_node_b(runs, tmp_path):
    log = runs["first"]
    assert re.search(r"\[hf_upload\] multi-node run \(rank 0: node \w+ \([\d.]+\), rank 1: node \w+", log), log[-3000:]
    (rank_b,) = _ranks(runs["b_after_first"])
    assert f"actor/model_world_size_2_rank_{rank_b}.pt" not in runs["a_after_first"]  # so the upload read it on node B
    assert re.search(r"\[hf_upload\] step 2: uploaded .*gathered [1-9]\d* file\(s\)", log)
    local = _consolidate(runs["both_step2"], tmp_path / "local")
    hub = _hub(f"{NS}-step-2", tmp_path / "hub")
    assert local
    for name, digest in local.items():
        assert hub.get(name) == digest, name


def test_a_fresh_two_node_run_resumes_from_the_hub_at_step_3_with_each_node_holding_its_own_ranks(runs):
    log = runs["resumed"]
    assert runs["resumed_rc"] == 0, log[-6000:]
    steps = sorted({int(m) for m in re.findall(r"\bstep (\d+)/\d+ \|", log)})  # the progress lines
    assert steps == [3], steps
    assert "multi-node resume: the ranks' files of" in log and "MB copied" in log
    for step in (2, 3):  # 2: resharded from the Hub; 3: saved by the resumed run
        prefix = f"global_step_{step}/"
        ranks_a, ranks_b = _ranks(runs["a_after_resume"], prefix), _ranks(runs["b_after_resume"], prefix)
        assert len(ranks_a) == len(ranks_b) == 1 and ranks_a | ranks_b == {0, 1}, (step, runs["a_after_resume"],
                                                                                   runs["b_after_resume"])


def test_node_b_killed_mid_upload_fails_it_clearly_and_resume_finishes_it_once_the_node_is_back(runs, tmp_path):
    from huggingface_hub import HfApi

    assert runs["events"] == {"held": True, "killed": True}
    log = runs["resumed"]
    assert runs["resumed_rc"] == 0  # documented: a failed upload does not fail the run (hf_upload.fail_on_error)
    errors = [line for line in log.splitlines() if "[hf_upload] ERROR step 3" in line]
    assert len(errors) == 1, log[-6000:]
    (rank_b,) = _ranks(runs["b_after_resume"], "global_step_3/")
    assert f"of rank {rank_b}" in errors[0] and re.search(r"node \w{8} \([\d.]+\)", errors[0]), errors[0]
    assert "once the node is back, finish the job with: python -m training.cluster_upload resume" in errors[0]
    assert runs["pending_after_kill"]

    assert runs["resume_rc"] == 0, runs["resume"][-4000:]
    assert not runs["pending_after_resume"]
    assert _ranks(runs["a_after_cluster_resume"]) == _ranks(runs["a_after_resume"], "global_step_3/")  # no copies
    tags = {t.name for t in HfApi(token=ALICE).list_repo_refs(HUB_REPO).tags}
    assert {f"{NS}-step-2", f"{NS}-step-3"} <= tags
    local = _consolidate(runs["both_step3"], tmp_path / "local")
    hub = _hub(f"{NS}-step-3", tmp_path / "hub")
    for name, digest in local.items():
        assert hub.get(name) == digest, name


def test_the_hub_token_reaches_no_log_or_file_of_the_cluster(runs, cluster):
    leaked = subprocess.run(["grep", "-rl", ALICE, cluster.node_env["RAY_TMPDIR"]], capture_output=True, text=True)
    assert leaked.stdout == "", leaked.stdout
    for name in ("first", "resumed"):
        assert ALICE not in runs[name]
