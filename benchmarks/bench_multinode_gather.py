"""Multi-node upload without shared storage vs the same checkpoint on shared storage (issue 12; target <= 1.3x).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_multinode_gather.py                  # medium preset, W=2
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_multinode_gather.py --preset tiny --repeats 1

Needs root (mount namespaces). Builds a real FSDP2 checkpoint at W=2 (``tests/fsdp_writer.py``), then starts two
Ray nodes on this machine, each in its own mount namespace with a private tmpfs at the checkpoint path
(``tests/ray_nodes.py``): node A holds rank 0's files (and the trainer's), node B rank 1's. A local Hub server runs
in its own process. Timed, each into a fresh repo, alternating, in a fresh upload actor on node A (the hook's own
``_UploadActor``, ``strategy=checkpoint``: model + optimizer.pt + resume files):

- shared: every rank's files on node A's disk (what shared storage gives): consolidate + upload;
- gather: rank 1's files only on node B: the actor first copies them through the readers (Ray object store,
  chunked), then consolidates + uploads, then removes the copies.

Printed: checkpoint size, bytes moved over Ray per upload, wall times and their ratio, peak RSS of the upload actor
(the gathering process) in both cases.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# bench_upload sets the Hub client's environment (no Xet, no telemetry, a private HF_HOME, no HF_TOKEN) on import,
# before anything imports huggingface_hub
from benchmarks.bench_upload import TOKEN, start_server  # noqa: E402


def _rss_mb(actor) -> float:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="medium", choices=["tiny", "medium"])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from tests.fsdp_writer import write_checkpoint
    from tests.ray_nodes import PrivateDisk, RayNode, can_make_private_mounts, ray_test_env, remove_ray_tmpdir

    reason = can_make_private_mounts()
    if reason:
        sys.exit(f"cannot simulate node-local disks here: {reason}")
    work = Path(tempfile.mkdtemp(prefix="bench-mn-"))
    src = write_checkpoint(work / "src", world_size=2, tied=False, preset=args.preset)
    src_step = src.step_dir
    ckpt_bytes = sum(f.stat().st_size for f in (src_step / "actor").glob("*_rank_*.pt"))
    server, url = start_server(work / "hub")
    os.environ["HF_ENDPOINT"] = url

    run = work / "ckpt"  # node-local on each node
    run.mkdir()
    step = src_step.name
    env = ray_test_env({**os.environ, "PYTHONPATH": str(ROOT)})
    disk_a, disk_b = PrivateDisk([run]), PrivateDisk([run])
    a = b = None
    try:
        # node A: everything but rank 1 (rank 0 and the trainer's files); node B: rank 1 only
        shutil.copytree(src_step, disk_a.path(run / step), ignore=shutil.ignore_patterns("*_rank_1.pt"))
        (disk_b.path(run / step) / "actor").mkdir(parents=True)
        for f in (src_step / "actor").glob("*_rank_1.pt"):
            shutil.copyfile(f, disk_b.path(run / step) / "actor" / f.name)
        a = RayNode.start_head(work / "node_a", env=env, num_cpus=2, num_gpus=0, disk=disk_a)
        b = RayNode.start_worker(work / "node_b", a.address, env=env, num_cpus=2, num_gpus=0, disk=disk_b)

        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        os.environ["RAY_ADDRESS"] = a.address
        ray.init(log_to_driver=False)
        from training.cluster_gather import ClusterLayout, start_readers
        from training.upload_actor import _UploadActor

        nodes = [n for n in ray.nodes() if n["Alive"]]
        head = next(n["NodeID"] for n in nodes if n["Resources"].get("node:__internal_head__"))
        other = next(n["NodeID"] for n in nodes if n["NodeID"] != head)
        ips = {n["NodeID"]: n["NodeManagerAddress"] for n in nodes}
        layout = ClusterLayout((head, other), head, ips)
        readers = start_readers([head, other], run)
        on_a = NodeAffinitySchedulingStrategy(node_id=head, soft=False)
        settings = {"strategy": "checkpoint", "progress": False, "private": True}
        from utils.hub.client import HubClient

        times: dict[str, list[float]] = {"shared": [], "gather": []}
        rss: dict[str, list[float]] = {"shared": [], "gather": []}
        moved: list[int] = []
        shared_dir = src_step  # a host path: node A sees it as shared storage holding every rank
        for i in range(args.repeats):
            for mode in ("shared", "gather"):
                repo = f"bench/bench-{mode}-{i}"
                HubClient(token=TOKEN).preflight(repo, private=True)
                actor = _UploadActor.options(scheduling_strategy=on_a).remote({**settings, "repo_id": repo}, TOKEN)
                ray.get(actor.__ray_call__.remote(lambda self: None))  # started and warm-free: time the upload only
                started = time.perf_counter()
                if mode == "shared":
                    out = ray.get(actor.upload.remote(str(shared_dir), 2, None))
                else:
                    out = ray.get(actor.upload.remote(str(run / step), 2, None, {"layout": layout,
                                                                                 "readers": readers}))
                times[mode].append(time.perf_counter() - started)
                assert out.status == "uploaded", out
                rss[mode].append(_rss_mb(actor))
                if mode == "gather":
                    moved.append(out.bytes_gathered)
                ray.kill(actor)
        shared, gather = statistics.median(times["shared"]), statistics.median(times["gather"])
        print(f"checkpoint ({args.preset}, W=2): rank files {ckpt_bytes / 1e6:.1f} MB "
              f"(rank 1's: {sum(f.stat().st_size for f in (src_step / 'actor').glob('*_rank_1.pt')) / 1e6:.1f} MB)")
        print(f"bytes moved over Ray per upload: {statistics.median(moved) / 1e6:.1f} MB "
              f"({statistics.median(moved) / ckpt_bytes:.0%} of the rank files)")
        print(f"upload wall time: shared storage {shared:.2f}s, node-local + gather {gather:.2f}s, "
              f"ratio {gather / shared:.2f}x (target <= 1.3x); runs: {times}")
        print(f"peak RSS of the upload actor: shared {max(rss['shared']):.0f} MB, gather {max(rss['gather']):.0f} MB")
        ray.shutdown()
    finally:
        for node in (b, a):
            if node is not None:
                node.stop()
        disk_a.close()
        disk_b.close()
        remove_ray_tmpdir(env)
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
