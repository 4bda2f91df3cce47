"""Uploads of multi-node runs without shared storage: gather the other nodes' files first, or finish later.

:func:`gather_for_upload` runs inside the upload actor (rank 0's node): it copies the files of other nodes' ranks
(and the trainer's ``data.pt``/``lineage.json``) into the local step directory through the readers
(``training/cluster_gather.py``). When a node is gone or a shard is missing, it leaves ``upload_pending.json`` (the
run's upload settings, never the token) and returns an error naming the rank and the node, with the command that
finishes the job once the node is back::

    RAY_ADDRESS=HEAD:PORT python -m training.cluster_upload resume <run>/global_step_N

Run that on the node that holds the marker (rank 0's node): it joins the cluster, asks a reader on every alive node
which ranks' files it holds, copies the missing ones here, finishes the upload from the marker (token from
``HF_TOKEN`` or the saved login), and removes the copies.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from training.cluster_gather import ClusterLayout, probe_holders, wanted_files
from training.ray_cluster import plan_ray_init, refuses_connections
from utils.checkpoint.errors import RankFileUnavailableError
from utils.checkpoint.sources import GatherReport, gather_files
from utils.hub.pending import PendingUpload, read_pending, write_pending

__all__ = ["gather_for_upload", "rank_kinds", "resume_command", "main"]


def resume_command(step_dir: str | Path) -> str:
    """The command line that finishes a gather-failed upload of ``step_dir``."""
    return f"python -m training.cluster_upload resume {step_dir}"


def rank_kinds(uploader: Any) -> list[str]:
    """The rank file kinds an upload reads: ``model``; ``optim`` with ``optimizer.pt``; ``extra_state`` for resume."""
    kinds = ["model"]
    if getattr(uploader, "include_optimizer", False):
        kinds.append("optim")
    if getattr(uploader, "strategy", "end") == "checkpoint":
        kinds.append("extra_state")
    return kinds


def gather_for_upload(uploader: Any, step_dir: Path, step: int, metrics: dict[str, float] | None, *,
                      layout: ClusterLayout, readers: dict[str, Any]) -> tuple[GatherReport | None, dict | None]:
    """Copy the other nodes' files of ``step_dir`` here; on failure leave the pending marker.

    Returns:
        ``(report, None)`` when everything is here, or ``(None, failure)`` with the upload actor's error dict
        (``error`` names rank and node, ``marker``, ``resume_command``).
    """
    import ray

    here = ray.get_runtime_context().get_node_id()
    wanted = wanted_files(step_dir, layout, readers, here=here, kinds=rank_kinds(uploader))
    try:
        return gather_files(step_dir, wanted), None
    except RankFileUnavailableError as e:
        marker = write_pending(step_dir, PendingUpload(
            checkpoint_dir=str(step_dir), repo_id=uploader.repo_id, step=int(step),
            options={**uploader.options(), "metrics": dict(metrics or {}), "base_model": None},
            error=f"gather: {e}"[:500]))
        return None, {"ok": False, "marker": str(marker), "resume_command": resume_command(step_dir),
                      "error": f"Upload of step {step} to {uploader.repo_id} failed: {e}"}


def _resume(step_dir: Path, root: Path | None) -> int:
    import ray

    from utils.hf_uploader import resume_pending

    pending = read_pending(step_dir)
    if pending is None:
        print(f"cluster_upload: no upload_pending.json in {step_dir}: nothing to finish", file=sys.stderr)
        return 2
    try:
        world = _world_size(step_dir)
    except RankFileUnavailableError as e:
        print(f"cluster_upload: {e}", file=sys.stderr)
        return 2
    # RAY_ADDRESS, else the cluster `ray start` recorded on this node (the one the run used). Checked first: ray.init
    # waits minutes on an address where nothing listens, and "auto" would join any cluster it finds on the machine.
    plan = plan_ray_init({})
    why_not = plan.reason if plan.action == "start" else refuses_connections(plan.address)
    if why_not:
        print(f"cluster_upload: no Ray cluster to join ({why_not}). Start Ray on this node and on the nodes that "
              "hold the other ranks' files (`ray start --head` here, `ray start --address=HEAD:6379` there), or "
              "set RAY_ADDRESS=HEAD:PORT, then run this again.", file=sys.stderr)
        return 2
    ray.init(address=plan.address, log_to_driver=False)
    try:
        layout, readers = probe_holders(step_dir, world, root or step_dir.parent)
        from utils.hf_uploader import HuggingFaceUploader

        settings = {k: v for k, v in pending.options.items() if k not in ("metrics", "base_model")}
        kinds = rank_kinds(HuggingFaceUploader(pending.repo_id, **settings))
        wanted = wanted_files(step_dir, layout, readers, here=ray.get_runtime_context().get_node_id(), kinds=kinds)
        try:
            report = gather_files(step_dir, wanted)
        except RankFileUnavailableError as e:
            print(f"cluster_upload: {e}", file=sys.stderr)
            return 1
        print(f"cluster_upload: {report.summary()}", flush=True)
        results = resume_pending(step_dir)
        failed = [(d, r) for d, r in results if isinstance(r, Exception)]
        for d, r in results:
            print(f"cluster_upload: {d}: {'FAILED ' + str(r) if isinstance(r, Exception) else r.summary()}",
                  flush=True)
        if not failed:
            report.remove_fetched()
        return 1 if failed else 0
    finally:
        ray.shutdown()


def _world_size(step_dir: Path) -> int:
    """W from this node's own rank files (``model_world_size_W_rank_r.pt``)."""
    for f in sorted((step_dir / "actor").glob("model_world_size_*_rank_*.pt")):
        return int(f.name.split("_")[3])
    raise RankFileUnavailableError(f"{step_dir / 'actor'} holds no model_world_size_W_rank_r.pt: run this on the "
                                   "node that holds upload_pending.json (actor rank 0's node)")


def main(argv: list[str] | None = None) -> int:
    """``python -m training.cluster_upload resume STEP_DIR [--run-dir DIR]``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m training.cluster_upload", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    resume = sub.add_parser("resume", help="finish an upload whose gather failed (joins the Ray cluster)")
    resume.add_argument("step_dir", type=Path, help="<run>/global_step_N holding upload_pending.json")
    resume.add_argument("--run-dir", type=Path, default=None, help="the run directory (default: STEP_DIR/..)")
    args = parser.parse_args(argv)
    return _resume(args.step_dir.resolve(), args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
