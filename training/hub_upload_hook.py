"""veRL checkpoint callback that pushes saved checkpoints to the Hub (``hf_upload.strategy``), off the critical path.

veRL 0.9.1's V1 trainer builds ``trainer.checkpoint_callback_class`` on the driver (the TaskRunner actor) and calls
``on_save(trainer, global_step, checkpoint_dir)`` after each save. :class:`HubUploadCallback`:

- ``end``: uploads the checkpoint of the last step only; ``every_save``: every save; ``checkpoint``: every save
  with ``optimizer.pt`` (the uploader's ``strategy`` switch; resumable-state extras live in ``utils/``).
- Each upload runs in a low-priority Ray actor pinned to the node of actor rank 0 (it reads the shards from
  ``default_local_dir``, the same path the ranks wrote). On a multi-node run the files of ranks on other nodes (and
  the trainer's ``data.pt``/``lineage.json``) reach it through a small reader actor per node
  (``training/cluster_gather.py``) when they are not already there (node-local disks); on shared storage nothing is
  copied. A node that died or a missing shard fails that upload with the rank and node named, ``upload_pending.json``
  and the command that finishes the job once the node is back. Uploads are queued in a
  :class:`utils.hub.background.BackgroundUploader`: at most one in flight, a newer save replaces a queued older
  one, the final one is never dropped. The training loop never waits for an upload.
- A save is submitted once the step's metrics are known (:meth:`HubUploadCallback.on_step_metrics`, called by the
  trainer after veRL computes them), so commit messages and cards carry that step's rewards.
- :meth:`HubUploadCallback.finish` (the TaskRunner, after ``fit``) waits for the last upload with progress lines.
  A failed upload leaves ``upload_pending.json`` and one ERROR line with the command that finishes the job; the
  run still succeeds unless ``hf_upload.fail_on_error``.
- Checkpoint rotation: veRL's ranks delete old ``global_step_N/actor`` folders beyond ``max_actor_ckpt_to_keep``
  (``BaseCheckpointManager.register_checkpoint``), which would pull shards from under a running consolidation. With
  background uploads this callback takes rotation over: it sets veRL's limit to ``None`` and deletes the same
  folders itself after each save, skipping the pinned ones (uploading or queued) until they are released, on
  every node that holds files of the run (through the readers).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import ray
from omegaconf import open_dict
from verl.trainer.ppo.checkpoint_callback import CheckpointCallback

from training.cluster_gather import ClusterLayout, locate_ranks, start_readers
from training.config_schema import section_defaults
from training.hub_upload import prompt_example, uploader_settings
from training.upload_actor import UploadOutcome, _UploadActor
from utils.hub.background import BackgroundUploader, UploadJob
from utils.hub.card import headline_metrics
from utils.hub.errors import UploadFailedError

__all__ = ["HubUploadCallback", "PROGRESS_EVERY_S", "CLUSTER_RESUME_COMMAND"]

PROGRESS_EVERY_S = 15.0
# Finishes an upload whose gather failed (a node was down): joins the cluster, finds the ranks' files, uploads.
CLUSTER_RESUME_COMMAND = "python -m training.cluster_upload resume"


def _log(msg: str, *, error: bool = False) -> None:
    # print, not logging: Ray forwards actor stdout/stderr to the driver's console, loggers of actors are unset.
    print(f"[hf_upload] {msg}", file=sys.stderr if error else sys.stdout, flush=True)


class HubUploadCallback(CheckpointCallback):
    """Uploads veRL checkpoints to the Hub per ``hf_upload.strategy`` (see the module docstring).

    Args:
        config: The full trainer config (veRL passes it); reads ``hf_upload`` and ``trainer``.
    """

    def __init__(self, config: Any = None):
        super().__init__(config)
        self.settings = {**uploader_settings(config), "progress": False}
        # the card's generate snippet: the run's system prompt and a val question (imports the data module, so
        # here in the TaskRunner, not in the driver's preflight)
        self.settings["card_info"] = {**self.settings["card_info"], **prompt_example(config)}
        self.strategy = self.settings["strategy"]
        self.fail_on_error = bool(config.hf_upload.get("fail_on_error", False))
        wait = config.hf_upload.get("final_wait_timeout", None)
        # unset only in a config built without the typed section: its default is written once, in config_schema
        self.final_wait_timeout = float(wait if wait is not None else section_defaults("hf_upload")["final_wait_timeout"])
        self.keep: int | None = None
        self._saved: list[Path] = []  # this run's step dirs still holding actor shards, oldest first
        self._unsubmitted: tuple[Path, int, bool] | None = None  # saved, waiting for the step's metrics
        self._bg: BackgroundUploader | None = None
        self._node_id: str | None = None
        self._layout: ClusterLayout | None = None  # where the ranks write (multi-node runs)
        self._readers: dict[str, Any] = {}  # node id -> ShardReader, multi-node runs only
        self._actor: Any = None  # the _UploadActor, started by the first upload
        self._finished = False
        self._abandoned: list[UploadJob] = []  # uploads stopped when hf_upload.final_wait_timeout ran out
        if self.strategy != "end":
            self._take_over_rotation(config)

    def _take_over_rotation(self, config: Any) -> None:
        trainer_cfg = config.trainer
        keep = trainer_cfg.get("max_actor_ckpt_to_keep", None)
        if trainer_cfg.get("remove_previous_ckpt_in_save", False):
            keep = 1
        if keep and int(keep) > 0:
            self.keep = int(keep)
            # veRL re-reads these at every save (PPOTrainer._save_checkpoint), on the config object it gave us.
            with open_dict(trainer_cfg):
                trainer_cfg.max_actor_ckpt_to_keep = None
                trainer_cfg.remove_previous_ckpt_in_save = False

    # ------------------------------------------------------------------ veRL's seam
    def on_save(self, trainer: Any, global_step: int, checkpoint_dir: str, async_save: bool = False,
                **kwargs: Any) -> None:
        """veRL's hook after each save: pin the step directory, queue it for upload once its metrics arrive, rotate.

        Args:
            trainer: The veRL trainer (``total_training_steps`` tells the final save; its worker group, rank 0's node).
            global_step: The step just saved.
            checkpoint_dir: Its ``global_step_N`` directory.
        """
        step_dir = Path(checkpoint_dir).resolve()
        final = global_step >= int(getattr(trainer, "total_training_steps", global_step))
        if self._node_id is None:
            self._locate(trainer)
        if self._unsubmitted is not None:  # the previous save never got its metrics: send it without
            self._submit(*self._unsubmitted, metrics=None)
            self._unsubmitted = None
        if self.strategy != "end" or final:
            self._unsubmitted = (step_dir, int(global_step), final)
        self._saved.append(step_dir)
        self._rotate()

    def on_step_metrics(self, global_step: int, metrics: dict[str, Any]) -> None:
        """Submit this step's checkpoint (if any) with its metrics; called by the trainer after veRL computes them."""
        if self._unsubmitted is not None and self._unsubmitted[1] == int(global_step):
            step_dir = self._unsubmitted[0]
            card = _curves_beside_checkpoint(step_dir, int(global_step), metrics)
            self._submit(*self._unsubmitted, metrics={**headline_metrics(metrics, limit=None), **card})
            self._unsubmitted = None

    # ------------------------------------------------------------------ end of run
    def finish(self, *, timeout: float | None = None) -> list[UploadJob]:
        """Wait for the uploads (progress every ``PROGRESS_EVERY_S``), report, rotate; raise if ``fail_on_error``.

        The wait ends after ``timeout`` seconds (default ``hf_upload.final_wait_timeout``): an upload still running
        then is stopped, and its step directory gets ``upload_pending.json`` with the command that finishes it.

        Returns:
            Every upload job of the run.

        Raises:
            UploadFailedError: an upload failed and ``hf_upload.fail_on_error`` is true.
        """
        if self._finished:
            return list(self._bg.jobs) if self._bg else []
        self._finished = True
        if self._unsubmitted is not None:
            self._submit(*self._unsubmitted, metrics=None)
            self._unsubmitted = None
        if self._bg is None:
            return []
        timeout = self.final_wait_timeout if timeout is None else timeout
        started, deadline = time.monotonic(), time.monotonic() + timeout
        abandoned: list[UploadJob] = []
        while not self._bg.wait(min(PROGRESS_EVERY_S, max(0.0, deadline - time.monotonic()))):
            running = [j for j in self._bg.jobs if j.state in ("running", "queued")]
            if time.monotonic() >= deadline:
                self._give_up(running, timeout)
                abandoned = running
                break
            _log(f"waiting for the Hub upload of step(s) {', '.join(str(j.step) for j in running)} "
                 f"({time.monotonic() - started:.0f}s so far, at most {timeout:.0f}s: hf_upload.final_wait_timeout)")
        jobs = self._bg.finish(timeout=0)
        if self._actor is not None:
            ray.kill(self._actor)
            self._actor = None
        self._rotate()
        for reader in self._readers.values():
            ray.kill(reader)
        self._readers = {}
        failed = [j for j in jobs if j.state == "failed" or j in abandoned]
        if failed and self.fail_on_error:
            raise UploadFailedError(f"{len(failed)} Hub upload(s) failed (hf_upload.fail_on_error=true); see the "
                                    "[hf_upload] ERROR lines above for the command that finishes them")
        return jobs

    def _give_up(self, unfinished: list[UploadJob], timeout: float) -> None:
        """The final wait ran out: leave a marker per unfinished upload, say so, and stop the upload actor."""
        from utils.hf_uploader import HuggingFaceUploader
        from utils.hub.pending import PendingUpload, write_pending

        self._abandoned.extend(unfinished)
        options = HuggingFaceUploader(**self.settings).options()
        for job in unfinished:
            reason = (f"the run stopped waiting for this upload after {timeout:.0f}s (hf_upload.final_wait_timeout)")
            try:
                write_pending(job.checkpoint_dir, PendingUpload(
                    checkpoint_dir=str(job.checkpoint_dir), repo_id=self.settings["repo_id"], step=job.step,
                    options={**options, "metrics": dict(job.metrics or {}), "base_model": None}, error=reason))
                _log(f"ERROR step {job.step}: {reason}; stopped it. upload_pending.json left in {job.checkpoint_dir}; "
                     f"finish the job with: python utils/hf_uploader.py resume {job.checkpoint_dir}", error=True)
            except Exception as e:  # noqa: BLE001 - report what we could not leave behind, keep going
                _log(f"ERROR step {job.step}: {reason}, and upload_pending.json could not be written ({e}); retry "
                     f"with: python utils/hf_uploader.py upload {job.checkpoint_dir} --repo-id "
                     f"{self.settings['repo_id']}", error=True)
        if self._actor is not None:  # stops the in-flight upload; its staging folder is swept by the next one
            ray.kill(self._actor)
            self._actor = None

    # ------------------------------------------------------------------ internals
    def _locate(self, trainer: Any) -> None:
        """Find each actor rank's node (veRL's worker group); start a reader per node on a multi-node run."""
        try:
            self._layout = locate_ranks(trainer.actor_rollout_wg)
        except Exception as e:  # noqa: BLE001 - best effort: a single-node run does not care
            _log(f"cannot locate the actor ranks ({type(e).__name__}); uploads run on any node")
            self._node_id = ""  # "": not found (asked once), any node
            return
        self._node_id = self._layout.rank_nodes[0]
        if self._layout.multi_node():
            root = Path(str(self.config.trainer.default_local_dir)).resolve()
            self._readers = start_readers(self._layout.nodes(), root)
            where = ", ".join(f"rank {r}: {self._layout.label(n)}" for r, n in enumerate(self._layout.rank_nodes))
            _log(f"multi-node run ({where}; trainer on {self._layout.label(self._layout.trainer_node)}): uploads "
                 "gather the files of other nodes through Ray when they are not on rank 0's disk")

    def _submit(self, step_dir: Path, step: int, final: bool, *, metrics: dict[str, float] | None) -> None:
        if self._bg is None:
            self._bg = BackgroundUploader(self._upload_on_rank0_node, on_done=self._report)
        self._bg.submit(step_dir, step, final=final, metrics=metrics)
        _log(f"step {step}: {'final ' if final else ''}upload to {self.settings['repo_id']} queued")

    def _upload_on_rank0_node(self, checkpoint_dir: Path, step: int,
                              metrics: dict[str, float] | None) -> UploadOutcome:
        if self._actor is None:
            options: dict[str, Any] = {}
            if self._node_id:
                from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

                options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=self._node_id, soft=False)
            self._actor = _UploadActor.options(**options).remote(self.settings, os.environ.get("HF_TOKEN") or None)
        gather = {"layout": self._layout, "readers": self._readers} if self._readers else None
        outcome: UploadOutcome = ray.get(self._actor.upload.remote(str(checkpoint_dir), step, metrics, gather))
        if outcome.traceback:
            _log(f"step {step}: upload traceback ({outcome.error_class}):\n{outcome.traceback.rstrip()}", error=True)
        return outcome.raise_if_failed()

    def _report(self, job: UploadJob) -> None:
        if job in self._abandoned:  # stopped by the final wait's limit: _give_up already said so, marker left
            return
        if job.state == "done":
            _log(f"step {job.step}: uploaded {job.result.summary}")
            return
        step_dir = job.checkpoint_dir
        failed = isinstance(job.error, UploadFailedError)
        marker = job.error.pending_marker if failed else None
        reason = (job.error.reason if failed else str(job.error)).rstrip(". ")
        command = getattr(job.error, "resume_command", None)
        if marker and command:
            _log(f"ERROR step {job.step}: {reason}. upload_pending.json left in {step_dir}; once the node is back, "
                 f"finish the job with: {command}", error=True)
        elif marker:
            _log(f"ERROR step {job.step}: {reason}. upload_pending.json left in {step_dir}; finish the job with: "
                 f"python utils/hf_uploader.py resume {step_dir}", error=True)
        else:
            _log(f"ERROR step {job.step}: {reason}. Retry with: python utils/hf_uploader.py upload {step_dir} "
                 f"--repo-id {self.settings['repo_id']}", error=True)

    def _rotate(self) -> None:
        """Delete ``actor/`` of step dirs beyond ``keep`` (as veRL would), except pinned ones; oldest first."""
        if not self.keep or len(self._saved) <= self.keep:
            return
        pinned = set(self._bg.pinned_dirs()) if self._bg else set()
        if self._unsubmitted is not None:
            pinned.add(self._unsubmitted[0])
        for step_dir in list(self._saved[: len(self._saved) - self.keep]):
            if step_dir in pinned:
                continue  # an upload reads it; deleted by a later save or at finish
            _log(f"rotation: removing {step_dir / 'actor'} (max_actor_ckpt_to_keep={self.keep})")
            try:
                shutil.rmtree(step_dir / "actor")
            except FileNotFoundError:
                pass  # removed already (by hand, or by veRL)
            except OSError as e:  # said out loud, not ignored: the disk fills up otherwise; retried next save
                _log(f"ERROR rotation could not remove {step_dir / 'actor'}: {e}; will retry at the next save",
                     error=True)
                continue
            if self._readers:  # node-local disks: the other nodes hold their ranks' shards too (veRL rotates on rank 0)
                here = ray.get_runtime_context().get_node_id()
                ray.get([r.remove_tree.remote(str(step_dir / "actor")) for node, r in self._readers.items()
                         if node != here])
            self._saved.remove(step_dir)


def _curves_beside_checkpoint(step_dir: Path, step: int, metrics: dict[str, Any]) -> dict[str, float]:
    """Draw the run's curves up to ``step`` into ``step_dir/training_curves.png`` (the uploader puts it beside the
    model and the card shows it); return the card's result metrics. Best effort: a plot never blocks an upload."""
    log = os.environ.get("VERL_FILE_LOGGER_PATH")  # set by ReasoningGymTrainer when trainer.logger has `file`
    if not log:
        return {}
    try:
        from training.report import CURVES_FILE, curves_for_step

        return curves_for_step(log, step, metrics, step_dir / CURVES_FILE)
    except Exception as e:  # noqa: BLE001 - the upload goes ahead without the picture
        _log(f"step {step}: training curves not drawn ({type(e).__name__}: {e})", error=True)
        return {}
