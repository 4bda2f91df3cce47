"""``hf_upload.resume``: before Ray starts, make the local run directory continue from the Hub.

    hf_upload:
      enabled: true
      repo_id: alice/qwen-grpo
      namespace: exp-a          # one experiment per subfolder; tags exp-a-step-N
      strategy: checkpoint      # every upload is a resume snapshot (model + optimizer + trainer state)
      resume: auto              # auto | never | required
      # +hf_upload.bootstrap_from=PATH: a local HF folder or veRL global_step_N to seed an empty namespace with

:func:`resume_from_hub` (one call in ``train_grpo.py``, after the config checks, before ``run_ppo``):

- only with ``hf_upload.strategy=checkpoint`` (the strategy whose uploads carry resume state); with ``end`` or
  ``every_save``, ``auto`` does nothing and ``required`` is an error;
- namespace empty -> **bootstrap**: the initial model (``actor_rollout_ref.model.path``, or ``bootstrap_from``) is
  pushed as ``step-0`` before training; a later start finds ``step-0`` and does not push it again;
- newest complete snapshot is a resume snapshot -> pull + reshard for this run's world size
  (``trainer.n_gpus_per_node * trainer.nnodes``) into ``trainer.default_local_dir``, and point veRL's resume at it
  (``trainer.resume_mode=resume_path``): veRL loads model, optimizer, lr scheduler, RNG and dataloader itself;
- weights only (``step-0``, or uploads without ``strategy=checkpoint``) -> the Hub weights become the starting
  model (``step-0``: silently, it is the bootstrap; a later step: with a loud warning, fresh optimizer and step 1;
  ``required`` refuses);
- a local checkpoint at the same or a newer step wins (veRL resumes it as usual);
- a snapshot of another model architecture or optimizer -> :class:`IncompatibleResumeError` naming the fields.

Lineage: the W&B run id (``WANDB_RUN_ID`` with ``WANDB_RESUME=allow``, which ``wandb.init`` reads: veRL's tracker
passes no ``id``, so the environment is the seam) and the tensorboard directory (``TENSORBOARD_DIR``, which veRL's
tracker reads) are restored before Ray starts, so workers inherit them. :func:`write_lineage` (called by the trainer
at each save) records them with the config hash into ``global_step_N/lineage.json``, which the uploader carries into
``trainer_state.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from training.errors import IncompatibleResumeError, ResumeError
from training.hub_resume_lora import base_config_dir, lora_differences, run_lora_config
from utils.checkpoint.tempdirs import write_text_atomic

__all__ = ["resume_from_hub", "write_lineage", "compat_fingerprint", "ResumeError", "IncompatibleResumeError",
           "ResumeOutcome", "RESUME_MODES"]

logger = logging.getLogger(__name__)

RESUME_MODES = ("auto", "never", "required")
# What makes a snapshot loadable into this run: tensor shapes (the model) and the optimizer's state layout.
_MODEL_KEYS = ("architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "intermediate_size", "vocab_size", "tie_word_embeddings")
_OPTIM_KEYS = ("optimizer", "optimizer_impl")
_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


@dataclass
class ResumeOutcome:
    """What :func:`resume_from_hub` did: ``action`` is bootstrap | resumed | weights_only | local | none."""

    action: str
    step: int = 0
    tag: str | None = None
    step_dir: str | None = None
    run_id: str | None = None


def compat_fingerprint(cfg: DictConfig, model_path: str | None = None) -> dict[str, Any]:
    """The model architecture and optimizer settings a snapshot must share with this run.

    Args:
        cfg: The run config.
        model_path: A model folder (default ``actor_rollout_ref.model.path``).

    Returns:
        ``{"model": {...config.json fields...}, "optimizer": {...}}`` (JSON-ready).
    """
    from transformers import AutoConfig

    path = model_path or str(cfg.actor_rollout_ref.model.path)
    model_cfg = AutoConfig.from_pretrained(path).to_dict()
    optim = cfg.actor_rollout_ref.actor.optim
    return {"model": {k: model_cfg.get(k) for k in _MODEL_KEYS},
            "optimizer": {k: (str(optim.get(k)) if optim.get(k) is not None else None) for k in _OPTIM_KEYS}}


def config_hash(compat: dict[str, Any]) -> str:
    """A short stable hash of :func:`compat_fingerprint`."""
    return hashlib.sha256(json.dumps(compat, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_lineage(config: DictConfig, step_dir: str | Path) -> Path:
    """Write ``step_dir/lineage.json``: tracking run id, config hash, veRL version, world size.

    Called by the trainer right before veRL saves a checkpoint; the uploader copies it into the snapshot's
    ``trainer_state.json``. Never fails the save: a problem is logged and an empty tracking record written.
    """
    import verl

    step_dir = Path(step_dir)
    step_dir.mkdir(parents=True, exist_ok=True)
    trainer = config.trainer
    run_id = os.environ.get("WANDB_RUN_ID")
    if not run_id:
        try:  # wandb chose the id itself (no Hub lineage): read it from the live run, if any
            import sys

            wandb = sys.modules.get("wandb")
            run_id = wandb.run.id if wandb is not None and wandb.run is not None else None
        except Exception:  # noqa: BLE001 - lineage is best effort; the checkpoint matters more
            run_id = None
    try:
        compat = compat_fingerprint(config)
    except Exception as e:  # noqa: BLE001
        logger.warning("lineage: cannot read the model config (%s)", e)
        compat = {}
    lineage = {
        "tracking": {"wandb_run_id": run_id, "project_name": trainer.get("project_name"),
                     "experiment_name": trainer.get("experiment_name"), "loggers": list(trainer.get("logger") or []),
                     "tensorboard_dir": os.environ.get("TENSORBOARD_DIR")
                     or f"tensorboard_log/{trainer.get('project_name')}/{trainer.get('experiment_name')}"},
        "config_hash": config_hash(compat) if compat else None,
        "compat": compat,
        "verl_version": getattr(verl, "__version__", None),
        "world_size": int(trainer.n_gpus_per_node) * int(trainer.nnodes),
    }
    # Atomic (temp file + rename): a crash mid-save never leaves half a JSON document for the uploader to choke on.
    return write_text_atomic(step_dir / "lineage.json", json.dumps(lineage, indent=2, sort_keys=True))


def resume_from_hub(cfg: DictConfig) -> ResumeOutcome:
    """Bootstrap, pull or skip according to ``hf_upload.resume``; edits ``cfg`` in place (see module docstring).

    Args:
        cfg: The composed run config, after ``prepare_config`` (the model path is a real folder or Hub id).

    Returns:
        A :class:`ResumeOutcome`.

    Raises:
        ResumeError: ``required`` with nothing (or only weights) on the Hub, or without ``strategy=checkpoint``;
            an unknown ``resume`` value.
        IncompatibleResumeError: the snapshot's model or optimizer differs from this run's, naming the fields.
        Preflight errors of the uploader (token, namespace access).
    """
    from training.hub_upload import hf_upload_section

    hf = hf_upload_section(cfg)  # typed: defaults filled in (training/config_schema.py)
    if not hf.enabled:
        return ResumeOutcome("none")
    mode = hf.resume
    if mode not in RESUME_MODES:
        raise ResumeError(f"hf_upload.resume={mode!r}: expected one of {', '.join(RESUME_MODES)}")
    if mode == "never":
        return ResumeOutcome("none")
    strategy = hf.strategy
    if strategy != "checkpoint":
        # Only strategy=checkpoint uploads resume snapshots. Resuming (or bootstrapping step-0) for end/every_save
        # runs would restart a rerun from the last uploaded weights at step 1 and collide with its existing tags.
        if mode == "required":
            raise ResumeError(f"hf_upload.resume=required needs hf_upload.strategy=checkpoint (got {strategy!r}): "
                              "only that strategy uploads the optimizer and trainer state a run resumes from.")
        logger.info("hf_upload.resume=auto: nothing to do with strategy=%s (set hf_upload.strategy=checkpoint to "
                    "make this run resumable from the Hub).", strategy)
        return ResumeOutcome("none")

    from training.hub_upload import uploader_from_config
    from utils.hub.snapshots import find_resume_snapshot

    namespace = (hf.namespace or "").strip("/")
    # The run's own uploader settings (repo, visibility, endpoint, namespace, card), but a plain weights upload:
    # the step-0 bootstrap has no optimizer or trainer state yet.
    uploader = uploader_from_config(cfg, progress=False, strategy="end", optimizer_save_mode=None)
    uploader.preflight()
    where = uploader.repo_id + (f" (namespace {namespace})" if namespace else "")
    world = int(cfg.trainer.n_gpus_per_node) * int(cfg.trainer.nnodes)
    local_dir = Path(str(cfg.trainer.default_local_dir)).absolute()
    snap = find_resume_snapshot(uploader.repo_id, namespace, client=uploader.client)

    if snap is None:
        if mode == "required":
            raise ResumeError(f"hf_upload.resume=required, but {where} holds no snapshot to resume from. Use "
                              "resume=auto to start (and bootstrap the repo), or check repo_id/namespace.")
        run_id = _restore_lineage(None)
        if run_lora_config(cfg) is not None:
            # A LoRA run's step 0 is the base model plus a zero adapter: pushing the whole base model would defeat
            # small adapter uploads. Its first snapshot is its first save.
            logger.info("%s is empty; a LoRA run does not bootstrap it (the base model stays where it is)", where)
            return ResumeOutcome("none", 0, None, run_id=run_id)
        tag = _bootstrap(uploader, cfg, where)
        return ResumeOutcome("bootstrap", 0, tag, run_id=run_id)

    local_step = _local_step(local_dir)
    if local_step is not None and local_step >= snap.step:
        logger.info("Local checkpoint at step %d in %s is not older than %s@%s: veRL resumes it as usual.",
                    local_step, local_dir, where, snap.tag)
        return ResumeOutcome("local", local_step, snap.tag, run_id=_restore_lineage(snap.state))

    from utils.checkpoint.reshard_lora import find_adapter

    adapter = find_adapter(snap.folder)
    _check_compatible(cfg, snap, where, adapter)
    run_id = _restore_lineage(snap.state)
    if snap.resumable:
        from utils.checkpoint.reshard import write_verl_checkpoint

        base = base_config_dir(str(cfg.actor_rollout_ref.model.path)) if adapter is not None else None
        step_dir = write_verl_checkpoint(snap.folder, local_dir, world, step=snap.step, base_model=base)
        with open_dict(cfg):
            cfg.trainer.resume_mode = "resume_path"
            cfg.trainer.resume_from_path = str(step_dir)
        logger.warning("Resuming from %s@%s (step %d, saved at world size %s) at world size %d: %s", where,
                       snap.tag, snap.step, snap.state.get("world_size"), world, step_dir)
        return ResumeOutcome("resumed", snap.step, snap.tag, str(step_dir), run_id)

    if snap.step > 0:
        if mode == "required":
            raise ResumeError(f"hf_upload.resume=required, but {where}@{snap.tag} holds weights only (no optimizer.pt "
                              "/ trainer_state.json: it was not uploaded with hf_upload.strategy=checkpoint).")
        logger.warning("!" * 100)
        logger.warning("%s@%s holds WEIGHTS ONLY (no optimizer state / trainer state): training restarts at step 1 "
                       "from these weights with a FRESH optimizer and lr schedule. Upload with "
                       "hf_upload.strategy=checkpoint for an exact resume.", where, snap.tag)
        logger.warning("!" * 100)
    with open_dict(cfg):  # the Hub copy is authoritative once the namespace exists (step-0 = the bootstrap)
        if adapter is not None:  # veRL's own seam: train on from a pre-trained adapter over the run's base model
            cfg.actor_rollout_ref.model.lora_adapter_path = str(adapter.folder)
        else:
            cfg.actor_rollout_ref.model.path = str(snap.folder)
    return ResumeOutcome("weights_only", snap.step, snap.tag, run_id=run_id)


def _bootstrap(uploader: Any, cfg: DictConfig, where: str) -> str:
    """Push the initial model as step-0 (weights only: the optimizer does not exist yet)."""
    hf = cfg.hf_upload
    source = str(hf.get("bootstrap_from", None) or cfg.actor_rollout_ref.model.path)
    if not os.path.exists(source):  # a Hub model id: fetch its files (weights, config, tokenizer) first
        from huggingface_hub import snapshot_download

        source = snapshot_download(source, allow_patterns=_WEIGHT_PATTERNS)
    src = Path(source)
    logger.warning("%s is empty: bootstrapping it with %s as step-0 before training", where, src)
    if (src / "actor").is_dir() or any(src.glob("model_world_size_*_rank_*.pt")):  # a veRL checkpoint
        res = uploader.upload_from_checkpoint_dir(src, step=0)
    else:
        res = uploader.upload_folder(src, 0)
    return res.tag


def _restore_lineage(state: dict[str, Any] | None) -> str:
    """Export the tracking ids so veRL's tracker (in a Ray worker) continues the same run."""
    tracking = (state or {}).get("tracking") or {}
    run_id = tracking.get("wandb_run_id") or os.environ.get("WANDB_RUN_ID") or uuid.uuid4().hex[:8]
    os.environ["WANDB_RUN_ID"] = run_id
    os.environ.setdefault("WANDB_RESUME", "allow")
    if tracking.get("tensorboard_dir") and "TENSORBOARD_DIR" not in os.environ:
        os.environ["TENSORBOARD_DIR"] = tracking["tensorboard_dir"]
    return run_id


def _local_step(local_dir: Path) -> int | None:
    marker = local_dir / "latest_checkpointed_iteration.txt"
    try:
        step = int(marker.read_text().strip())
    except (OSError, ValueError):
        return None
    return step if (local_dir / f"global_step_{step}").is_dir() else None


def _check_compatible(cfg: DictConfig, snap: Any, where: str, adapter: Any = None) -> None:
    """Compare the snapshot's model config (and recorded optimizer) with this run's; name every difference.

    A LoRA snapshot (``adapter``) or a LoRA run: base model and LoRA shape (:mod:`training.hub_resume_lora`).
    """
    mine = compat_fingerprint(cfg)
    if adapter is not None or run_lora_config(cfg) is not None:
        diffs = lora_differences(cfg, snap, adapter, mine["model"])
    else:
        theirs_model = compat_fingerprint(cfg, str(snap.folder))["model"]
        diffs = [f"model.{k}: Hub {theirs_model.get(k)!r} vs this run {mine['model'].get(k)!r}"
                 for k in _MODEL_KEYS if theirs_model.get(k) != mine["model"].get(k)]
    recorded = ((snap.state or {}).get("compat") or {}).get("optimizer") or {}
    diffs += [f"actor.optim.{k}: Hub {recorded[k]!r} vs this run {mine['optimizer'].get(k)!r}"
              for k in _OPTIM_KEYS if k in recorded and recorded[k] != mine["optimizer"].get(k)]
    if diffs:
        raise IncompatibleResumeError(
            f"{where}@{snap.tag} cannot be resumed by this run: " + "; ".join(diffs) + ". Use another "
            "hf_upload.namespace for a new experiment, or hf_upload.resume=never.")
