"""The uploader: consolidate one veRL checkpoint into a temporary folder, push it, tag it, clean up.

The public face is :mod:`utils.hf_uploader` (same names); this module holds the bodies so that the face, the CLI
(:mod:`utils.hub.cli`) and the trainer hook all import one place and nothing imports back.

Example:
    >>> resolve_repo_id("qwen-grpo", "acme")
    'acme/qwen-grpo'
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.checkpoint.dtype_names import normalize_dtype
from utils.checkpoint.layout import find_step_dirs
from utils.checkpoint.tempdirs import make_owned_temp_dir, remove_owned, sweep_stale
from utils.hub.card import CURVES_FILE, CardInfo, headline_metrics, render_model_card
from utils.hub.client import HubClient, PreflightReport, check_repo_id
from utils.hub.errors import (
    HubUnreachableError,
    InvalidOptimizerSaveModeError,
    InvalidRepoIdError,
    InvalidUploadConfigError,
    MissingRepoIdError,
    StagingSpaceError,
    StepNotFoundError,
    TagConflictError,
    UploadFailedError,
)
from utils.hub.pending import (
    PendingUpload,
    clear_pending,
    step_from_path,
    step_lock,
    write_pending,
)
from utils.hub.pipeline import PreUploader
from utils.hub.push import PushPlan, execute_push, plan_push, tag_for_step
from utils.hub.resume_state import stage_resume_files

__all__ = [
    "HuggingFaceUploader",
    "UploadResult",
    "BackfillRow",
    "upload_checkpoint_to_hf",
    "resume_pending",
    "check_staging_space",
    "resolve_repo_id",
    "validate_optimizer_save_mode",
    "VALID_OPTIMIZER_SAVE_MODES",
    "VALID_STRATEGIES",
    "VALID_WEIGHT_FORMATS",
]

logger = logging.getLogger("utils.hf_uploader")  # the public face's name: what users filter on

STAGING_PREFIX = "hf_upload_step"  # <TMPDIR or staging_dir>/hf_upload_step<N>_<random>/model

VALID_OPTIMIZER_SAVE_MODES = (None, "full")
VALID_STRATEGIES = ("end", "every_save", "checkpoint")
VALID_WEIGHT_FORMATS = ("bin", "safetensors")
VALID_LORA_MODES = ("adapter", "merged", "both")  # utils.checkpoint.lora.LORA_MODES (not imported: torch-heavy)


def resolve_repo_id(repo_id: str | None, organization: str | None = None) -> str:
    """Combine ``repo_id`` and ``organization`` into ``namespace/name`` and validate it.

    Args:
        repo_id: ``name`` or ``namespace/name``.
        organization: Namespace for a bare ``name``.

    Returns:
        ``organization/name``, or ``repo_id`` itself when it is already namespaced.

    Raises:
        MissingRepoIdError: ``repo_id`` is empty.
        InvalidRepoIdError: both carry a namespace, a bare name has none, or the id is not a valid Hub id.

    Example:
        >>> resolve_repo_id("qwen-grpo", "acme"), resolve_repo_id("alice/qwen-grpo")
        ('acme/qwen-grpo', 'alice/qwen-grpo')
    """
    if not repo_id or not str(repo_id).strip():
        raise MissingRepoIdError(
            "No repo_id given. Set hf_upload.repo_id (or --repo-id) to 'user/name', or to 'name' with "
            "hf_upload.organization."
        )
    repo_id = str(repo_id).strip()
    if organization:
        if "/" in repo_id:
            raise InvalidRepoIdError(
                f"repo_id '{repo_id}' already has a namespace, so organization='{organization}' is ambiguous. Pass "
                f"either repo_id='{repo_id.split('/')[-1]}' with organization='{organization}', or only repo_id."
            )
        repo_id = f"{organization.strip()}/{repo_id}"
    check_repo_id(repo_id)
    return repo_id


def validate_optimizer_save_mode(mode: str | None) -> str | None:
    """Return ``mode`` if supported, else raise :class:`InvalidOptimizerSaveModeError` listing the valid values."""
    if mode in ("", "none", "None"):
        mode = None
    if mode not in VALID_OPTIMIZER_SAVE_MODES:
        raise InvalidOptimizerSaveModeError(
            f"optimizer_save_mode={mode!r} is not supported; valid values: None (weights only) or 'full' (also "
            "upload a name-keyed optimizer.pt)."
        )
    return mode


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise InvalidUploadConfigError(f"{name}={value!r} is not supported; valid values: {', '.join(valid)}.")
    return value


@dataclass
class UploadResult:
    """What one upload did.

    Attributes:
        repo_id: Target repo.
        step: Training step.
        tag: ``step-N``.
        commit_sha: The commit holding the files (the tag points at it).
        url: Browsable URL of the tagged revision.
        files: Paths sent in this upload (empty when nothing changed).
        bytes: Bytes sent.
        seconds: Wall time (consolidation included).
        skipped: The tag already held identical weights; nothing was uploaded.
        on_main: Whether ``main`` now points at this step.
        consolidation: The engine's ``ConsolidationResult`` when this call consolidated.
    """

    repo_id: str
    step: int
    tag: str
    commit_sha: str
    url: str
    files: list[str] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    skipped: bool = False
    on_main: bool = False
    consolidation: Any = None

    def summary(self) -> str:
        what = "already on the Hub, nothing sent" if self.skipped else \
            f"{len(self.files)} file(s), {self.bytes / 1e6:.1f} MB sent"
        return f"{self.repo_id} {self.tag} @ {self.commit_sha[:8]}: {what} in {self.seconds:.1f}s -> {self.url}"


@dataclass
class BackfillRow:
    """One line of a backfill summary: ``status`` is ``uploaded``, ``skipped`` or ``failed``."""

    step: int
    status: str
    tag: str
    commit_sha: str = ""
    seconds: float = 0.0
    message: str = ""


class HuggingFaceUploader:
    """Consolidate and upload veRL checkpoints of one run to one Hub repo.

    Args:
        repo_id: ``user/name``, ``org/name``, or ``name`` with ``organization``.
        organization: Namespace for a bare ``repo_id``.
        private: Create the repo private. Default ``False`` (as users know it) - a public repo is announced
            with a WARNING at preflight.
        optimizer_save_mode: ``None`` or ``"full"`` (also upload ``optimizer.pt``).
        token: Explicit token (discouraged: prefer ``HF_TOKEN``); never logged, never written anywhere.
        endpoint: Hub URL (default ``HF_ENDPOINT`` or huggingface.co).
        weights_format: ``"bin"`` or ``"safetensors"``.
        dtype: ``"auto"`` (the checkpoint's config dtype), ``"bf16"``, ``"fp16"`` or ``"fp32"``.
        max_shard_size: Largest weight file, e.g. ``"5GB"``.
        strategy: ``end``, ``every_save`` or ``checkpoint`` (``checkpoint`` also uploads ``optimizer.pt``, veRL's
            trainer state under ``resume/`` and ``trainer_state.json``, and writes fp32 weights when ``dtype`` is
            ``auto``: a resume snapshot, see :mod:`utils.hub.resume_state`).
        model_card: Generate ``README.md`` (a hand-written one on the Hub is always kept).
        card_info: Extra card facts: ``base_model``, ``datasets`` (``{task: weight}``), ``extra`` (table rows).
        namespace: Subfolder of the repo for this experiment (tags become ``<namespace>-step-N``).
        staging_dir: Where temporary consolidation folders go (default: the system temp dir, ``TMPDIR``).
        max_attempts, retry_base_delay: Outer retry of whole commits (see :class:`utils.hub.client.HubClient`).
        write_pending_marker: Leave ``upload_pending.json`` in the step directory when an upload fails.
        progress: Show the consolidation progress bar.
        request_timeout: Seconds one Hub request may stall (connect 10 s; read/write this, default 120 or
            ``HF_HUB_UPLOAD_TIMEOUT``) before it fails and is retried - a Hub that never answers cannot hang a run.
        lora: For LoRA checkpoints: ``adapter`` (default: the small PEFT folder), ``merged`` (a plain model with the
            adapters folded in) or ``both`` (merged at the root, the adapter in ``adapter/``). Full fine-tuning
            checkpoints ignore it.
        lora_base_model: ``base_model_name_or_path`` of the adapter (default: ``card_info["base_model"]``, else the
            ``model_name`` of the upload call).
        pipeline: Upload each finished weight file while the consolidation writes the next ones, with the sha256
            computed while writing (:mod:`utils.hub.pipeline`); the commit, tag and card still come last. ``False``:
            consolidate everything, then hash and upload (the older two-pass behaviour).

    Example:
        >>> up = HuggingFaceUploader("qwen-grpo", organization="acme", private=True)  # doctest: +SKIP
        >>> up.preflight()  # doctest: +SKIP
        >>> up.upload_from_checkpoint_dir("checkpoints/run/global_step_500").url  # doctest: +SKIP
    """

    def __init__(
        self,
        repo_id: str | None,
        organization: str | None = None,
        private: bool = False,
        optimizer_save_mode: str | None = None,
        *,
        token: str | None = None,
        endpoint: str | None = None,
        weights_format: str = "bin",
        dtype: str = "auto",
        max_shard_size: str | int = "5GB",
        strategy: str = "end",
        model_card: bool = True,
        card_info: Mapping[str, Any] | None = None,
        namespace: str = "",
        staging_dir: str | Path | None = None,
        max_attempts: int = 4,
        retry_base_delay: float = 2.0,
        write_pending_marker: bool = True,
        progress: bool = True,
        request_timeout: float | None = None,
        lora: str = "adapter",
        lora_base_model: str | None = None,
        pipeline: bool = True,
    ):
        self.repo_id = resolve_repo_id(repo_id, organization)
        self.organization = organization
        self.private = bool(private)
        self.optimizer_save_mode = validate_optimizer_save_mode(optimizer_save_mode)
        self.weights_format = _check_choice("weights_format", weights_format, VALID_WEIGHT_FORMATS)
        self.strategy = _check_choice("strategy", strategy, VALID_STRATEGIES)
        try:  # the consolidation CLI's own check, now rather than after minutes of work
            dtype = normalize_dtype(dtype)
        except ValueError as e:
            raise InvalidUploadConfigError(str(e)) from None
        self.lora = _check_choice("lora", lora, VALID_LORA_MODES)
        if strategy == "checkpoint" and lora == "merged":
            # A resume snapshot of a LoRA run needs the adapter itself: merged weights cannot be split back into A, B.
            self.lora = "both"
        self.lora_base_model = lora_base_model
        # A resume snapshot must hold veRL's fp32 master weights, not a rounded copy: `auto` means fp32 there.
        self.dtype = "fp32" if strategy == "checkpoint" and dtype == "auto" else dtype
        self.max_shard_size = max_shard_size
        self.model_card = model_card
        self.card_info = dict(card_info or {})
        self.namespace = namespace.strip("/")
        self.staging_dir = Path(staging_dir) if staging_dir else None
        self.write_pending_marker = write_pending_marker
        self.progress = progress
        self.request_timeout = request_timeout
        self.pipeline = bool(pipeline)
        self.client = HubClient(token=token, endpoint=endpoint, max_attempts=max_attempts,
                                retry_base_delay=retry_base_delay, request_timeout=request_timeout)
        self._preflight: PreflightReport | None = None
        self._preflight_wrote = False  # a read-only (dry-run) preflight does not count for a real upload

    def __repr__(self) -> str:  # the token is never shown (the client's repr hides it)
        return (f"HuggingFaceUploader(repo_id={self.repo_id!r}, private={self.private}, "
                f"optimizer_save_mode={self.optimizer_save_mode!r}, weights_format={self.weights_format!r}, "
                f"client={self.client!r})")

    @property
    def include_optimizer(self) -> bool:
        return self.optimizer_save_mode == "full" or self.strategy == "checkpoint"

    def options(self) -> dict[str, Any]:
        """The settings needed to redo an upload (written into ``upload_pending.json``; no token)."""
        return {"private": self.private, "optimizer_save_mode": self.optimizer_save_mode,
                "weights_format": self.weights_format, "dtype": self.dtype, "max_shard_size": self.max_shard_size,
                "strategy": self.strategy, "model_card": self.model_card, "card_info": self.card_info,
                "namespace": self.namespace, "endpoint": self.client.endpoint, "lora": self.lora,
                "lora_base_model": self.lora_base_model, "request_timeout": self.request_timeout}

    # ------------------------------------------------------------------ preflight
    def preflight(self, *, create: bool = True) -> PreflightReport:
        """Check token, write access and repo id, and create the repo with the requested visibility.

        Cheap (two or three requests); call it before training starts so a bad token fails in seconds, not at the
        end of the run. The result is cached.

        Raises:
            MissingTokenError, InvalidTokenError, ReadOnlyTokenError, NamespaceAccessError, InvalidRepoIdError,
            InvalidUploadConfigError, HubUnreachableError: each with what to fix.
        """
        if self._preflight is None or (create and not self._preflight_wrote):
            self._preflight = self.client.preflight(self.repo_id, private=self.private, create=create)
            self._preflight_wrote = create
        return self._preflight

    # ------------------------------------------------------------------ upload
    def upload_from_checkpoint_dir(
        self,
        checkpoint_dir: str | Path,
        model_name: str | None = None,
        step: int | None = None,
        *,
        metrics: Mapping[str, float] | None = None,
        commit_message: str | None = None,
    ) -> UploadResult:
        """Consolidate one veRL checkpoint into a fresh temporary folder, upload it, and clean up.

        Args:
            checkpoint_dir: ``global_step_N`` or ``global_step_N/actor``.
            model_name: Base model (local folder), only a fallback source of config/tokenizer when the checkpoint
                has no ``huggingface/`` folder; also named in the model card.
            step: Training step; inferred from ``global_step_N`` when omitted.
            metrics: Metrics at this step for the commit message and model card.
            commit_message: Custom commit title (default: ``Upload step N (metric=value, ...)``).

        Returns:
            An :class:`UploadResult`.

        Raises:
            StepNotFoundError: no step given and none in the path.
            utils.checkpoint.errors.CheckpointError: the checkpoint cannot be consolidated (no marker is written).
            UploadFailedError: the upload failed after all retries; ``.pending_marker`` names the marker left.
            TagConflictError: ``step-N`` already holds different weights.
        """
        started = time.perf_counter()
        checkpoint_dir = Path(checkpoint_dir)
        step = self.check_local(checkpoint_dir, step)  # every local input, before the first Hub request
        step_dir = _step_dir_of(checkpoint_dir)
        try:
            self.preflight()
        except HubUnreachableError as e:  # e.g. the Hub is down at the end of training: resumable, leave a marker
            raise self._failed(e, step, metrics, model_name, step_dir, checkpoint_dir) from e
        with step_lock(step_dir):
            # Staging folders of uploads that were killed (kill -9, a Ray actor stopped at the end of a run) are
            # removed first, when provably ours and stale (utils/checkpoint/tempdirs.py); then the space check.
            parent = self.staging_dir or Path(tempfile.gettempdir())
            sweep_stale(parent, STAGING_PREFIX)
            check_staging_space(checkpoint_dir, self.staging_dir, include_optimizer=self.include_optimizer)
            staging = make_owned_temp_dir(parent, f"{STAGING_PREFIX}{step}_")
            try:
                consolidation, known = self._consolidate_and_preupload(checkpoint_dir, staging, step, model_name)
                if self.strategy == "checkpoint":  # what resume needs, hashed, beside the model
                    stage_resume_files(step_dir, staging / "model", step=step, world_size=consolidation.world_size)
                if (step_dir / CURVES_FILE).is_file():  # drawn by the trainer for this step: uploaded, shown in the card
                    shutil.copyfile(step_dir / CURVES_FILE, staging / "model" / CURVES_FILE)
                result = self._upload(staging / "model", step, metrics=metrics, commit_message=commit_message,
                                      consolidation=consolidation, base_model=model_name, started=started,
                                      pending_dir=step_dir, checkpoint_dir=checkpoint_dir, known=known)
            finally:
                remove_owned(staging)
        clear_pending(step_dir)
        return result

    def upload_folder(
        self,
        hf_dir: str | Path,
        step: int,
        *,
        metrics: Mapping[str, float] | None = None,
        commit_message: str | None = None,
    ) -> UploadResult:
        """Upload an already consolidated Hugging Face folder as ``step``.

        Args:
            hf_dir: A folder ``from_pretrained`` can load (a README.md inside it is uploaded as is).
            step: Training step (tag ``step-N``).
            metrics: Metrics for the commit message and model card.
            commit_message: Custom commit title.

        Returns:
            An :class:`UploadResult`.

        Raises:
            UploadFailedError: after all retries (no marker: there is no step directory to put it in).
        """
        self.preflight()
        return self._upload(Path(hf_dir), int(step), metrics=metrics, commit_message=commit_message,
                            consolidation=None, base_model=None, started=time.perf_counter())

    def plan(self, hf_dir: str | Path, step: int, *, metrics: Mapping[str, float] | None = None) -> PushPlan:
        """What uploading ``hf_dir`` as ``step`` would do, with reads only (the dry run)."""
        return plan_push(self.client, self.repo_id, Path(hf_dir), step=step, namespace=self.namespace,
                         card=self._card_fn(step, metrics, None, None) if self.model_card else None)

    def _upload(self, folder: Path, step: int, *, metrics, commit_message, consolidation, base_model, started,
                pending_dir: Path | None = None, checkpoint_dir: Path | None = None, known=None) -> UploadResult:
        try:
            curves = CURVES_FILE if (folder / CURVES_FILE).is_file() else None
            card = self._card_fn(step, metrics, consolidation, base_model, curves) if self.model_card else None
            plan = plan_push(self.client, self.repo_id, folder, step=step, namespace=self.namespace, card=card,
                             known=known)
            message = self.client.redact(commit_message or _default_message(step, metrics))
            outcome = execute_push(self.client, plan, message=message,
                                   description=_description(step, consolidation, plan))
        except (TagConflictError, InvalidUploadConfigError):
            raise
        except Exception as e:  # noqa: BLE001 - every other failure becomes one clear, token-free error (+ marker)
            raise self._failed(e, step, metrics, base_model, pending_dir, checkpoint_dir) from e
        url = f"{self.client.endpoint}/{self.repo_id}/tree/{outcome.tag}"
        result = UploadResult(self.repo_id, step, outcome.tag, outcome.commit, url, outcome.sent_files,
                              outcome.sent_bytes, time.perf_counter() - started, outcome.skipped, outcome.on_main,
                              consolidation)
        logger.info("Uploaded %s", result.summary())
        return result

    def _failed(self, e: BaseException, step: int, metrics, base_model, pending_dir: Path | None,
                checkpoint_dir: Path | None) -> UploadFailedError:
        """The token-free error for a failed upload, after leaving ``upload_pending.json`` in ``pending_dir``."""
        reason = self.client.redact(f"{type(e).__name__}: {e}".splitlines()[0])[:500]
        marker = None
        if pending_dir is not None and checkpoint_dir is not None and self.write_pending_marker:
            marker = str(write_pending(pending_dir, PendingUpload(
                checkpoint_dir=str(checkpoint_dir.resolve()), repo_id=self.repo_id, step=step,
                options={**self.options(), "metrics": dict(metrics or {}), "base_model": base_model},
                error=reason)))
        hint = f"; finish it later with: python utils/hf_uploader.py resume {pending_dir}" if marker else ""
        what = f"Upload of step {step} to {self.repo_id} failed: {reason}"
        return UploadFailedError(f"{what}{hint}", pending_marker=marker, reason=what)

    def _card_fn(self, step, metrics, consolidation, base_model, curves=None):
        def render() -> str:
            return render_model_card(CardInfo(
                repo_id=self.repo_id, step=step, revision=tag_for_step(step, self.namespace),
                subfolder=self.namespace or None,
                base_model=self.card_info.get("base_model") or (str(base_model) if base_model else None)
                or (getattr(consolidation, "lora", None) or {}).get("base_model_name_or_path"),  # a LoRA run's base
                dtype=getattr(consolidation, "dtype", None) or (None if self.dtype == "auto" else self.dtype),
                world_size=getattr(consolidation, "world_size", None), weights_format=self.weights_format,
                metrics=metrics, datasets=self.card_info.get("datasets"), optimizer=self.include_optimizer,
                extra=self.card_info.get("extra") or {}, dataset_configs=self.card_info.get("dataset_configs"),
                system_prompt=self.card_info.get("system_prompt"),
                example_question=self.card_info.get("example_question"), curves=curves,
                max_new_tokens=int(self.card_info.get("max_new_tokens") or 64), lora=getattr(consolidation, "lora", None)))

        return render

    def _consolidate(self, checkpoint_dir: Path, out_dir: Path, step: int, model_name: str | None,
                     on_file_written=None):
        # The engine (torch-heavy) is imported when needed: the CLI's error paths and preflight stay light.
        from utils.checkpoint.consolidate import consolidate_checkpoint

        return consolidate_checkpoint(checkpoint_dir, out_dir, weights_format=self.weights_format, dtype=self.dtype,
                                      max_shard_size=self.max_shard_size, include_optimizer=self.include_optimizer,
                                      base_model=model_name, progress=self.progress, lora=self.lora,
                                      lora_base_model=self.lora_base_model or self.card_info.get("base_model")
                                      or (str(model_name) if model_name else None), on_file_written=on_file_written)

    def _consolidate_and_preupload(self, checkpoint_dir: Path, staging: Path, step: int, model_name: str | None):
        """Consolidate into ``staging/model``; with ``pipeline``, upload each finished file meanwhile.

        Returns:
            ``(consolidation, known)``: ``known`` maps file names to ``(sha256, operation)`` for the commit (no file
            is hashed twice), or ``None`` without the pipeline.
        """
        if not self.pipeline:
            return self._consolidate(checkpoint_dir, staging / "model", step, model_name), None
        pre = PreUploader(self.client, self.repo_id, links_dir=staging / "preupload", prefix=self.namespace,
                          tag=tag_for_step(step, self.namespace))
        try:
            consolidation = self._consolidate(checkpoint_dir, staging / "model", step, model_name, on_file_written=pre)
        finally:
            known = pre.finish()
        if pre.failure is None:
            logger.info("pre-uploaded %.1f MB to %s while consolidating", pre.uploaded_bytes / 1e6, self.repo_id)
        return consolidation, known

    def check_local(self, checkpoint_dir: str | Path, step: int | None = None) -> int:
        """Check everything local about an upload before any Hub request: a mistyped path must not create a repo.

        Reads only file names and ``fsdp_config.json``: the folder is a complete veRL checkpoint (every rank of
        one world size), holds the optimizer files when ``optimizer.pt`` is requested, the step is known, and the
        staging disk has room. Format and dtype were checked when the uploader was built.

        Returns:
            The step.

        Raises:
            StepNotFoundError: no step given and none in the path.
            utils.checkpoint.errors.CheckpointError: not a checkpoint, missing or mixed rank files, bad fsdp_config.
            StagingSpaceError: not enough room to consolidate.
        """
        from utils.checkpoint.errors import MissingRankFileError
        from utils.checkpoint.layout import detect_layout

        checkpoint_dir = Path(checkpoint_dir)
        step = self._infer_step(checkpoint_dir, step)
        layout = detect_layout(checkpoint_dir)
        if self.include_optimizer and not layout.optim_files:
            raise MissingRankFileError(
                f"{layout.actor_dir}: no optim_world_size_{layout.world_size}_rank_*.pt files, but optimizer.pt was "
                "requested (optimizer_save_mode='full' or strategy='checkpoint'); upload the weights only, or point "
                "at a checkpoint saved with its optimizer.")
        check_staging_space(checkpoint_dir, self.staging_dir, include_optimizer=self.include_optimizer)
        return step

    @staticmethod
    def _infer_step(checkpoint_dir: Path, step: int | None) -> int:
        if step is not None:
            return int(step)
        found = step_from_path(checkpoint_dir.resolve())
        if found is None:
            raise StepNotFoundError(
                f"Cannot tell the training step of {checkpoint_dir}: no 'global_step_N' in its path. Pass step=N "
                "(CLI: --step N)."
            )
        return found

    def background(self, on_done=None):
        """A :class:`utils.hub.background.BackgroundUploader` that runs this uploader in a worker thread."""
        from utils.hub.background import BackgroundUploader

        return BackgroundUploader(lambda d, s, m: self.upload_from_checkpoint_dir(d, step=s, metrics=m),
                                  on_done=on_done)

    # ------------------------------------------------------------------ many steps
    def backfill(self, run_dir: str | Path, steps: list[int] | None = None) -> list[BackfillRow]:
        """Upload every ``global_step_*`` of ``run_dir`` (or only ``steps``) in step order.

        Idempotent: a step whose tag exists is skipped without consolidating. One failing step does not stop the
        others; each gets a row with the reason.

        Returns:
            One :class:`BackfillRow` per step, in order.

        Raises:
            StepNotFoundError: a requested step has no directory (before anything is uploaded).
            Preflight errors (token, namespace) before anything is uploaded.
        """
        found = dict(find_step_dirs(run_dir))
        if steps is not None:
            missing = sorted(set(steps) - set(found))
            if missing:
                raise StepNotFoundError(f"{run_dir} has no global_step_{missing[0]} (steps present: {sorted(found)})")
            found = {s: found[s] for s in steps}
        if not found:
            raise StepNotFoundError(f"{run_dir} holds no global_step_N directories")
        self.preflight()
        rows = []
        for step in sorted(found):
            tag = tag_for_step(step, self.namespace)
            t0 = time.perf_counter()
            if tag in self.client.refs(self.repo_id)[1]:
                rows.append(BackfillRow(step, "skipped", tag, message="tag exists"))
                continue
            try:
                res = self.upload_from_checkpoint_dir(found[step], step=step)
                rows.append(BackfillRow(step, "uploaded", tag, res.commit_sha, time.perf_counter() - t0,
                                        f"{len(res.files)} file(s), {res.bytes / 1e6:.1f} MB"))
            except Exception as e:  # noqa: BLE001 - one failure must not stop the rest; reported in the table
                rows.append(BackfillRow(step, "failed", tag, seconds=time.perf_counter() - t0,
                                        message=self.client.redact(str(e).splitlines()[0])[:200]))
                logger.error("backfill: step %d failed: %s", step, rows[-1].message)
        return rows


def upload_checkpoint_to_hf(
    checkpoint_dir: str | Path,
    model_name: str | None = None,
    repo_id: str | None = None,
    step: int | None = None,
    organization: str | None = None,
    private: bool = False,
    optimizer_save_mode: str | None = None,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    weights_format: str = "bin",
    dtype: str = "auto",
    strategy: str = "end",
    commit_message: str | None = None,
    model_card: bool = True,
    max_shard_size: str | int = "5GB",
    metrics: Mapping[str, float] | None = None,
    **uploader_kwargs: Any,
) -> UploadResult:
    """Consolidate a veRL FSDP checkpoint and upload it to the Hub in one call.

    Args:
        checkpoint_dir: ``.../global_step_N`` (or its ``actor/`` folder).
        model_name: Base model path, a fallback for config/tokenizer only (the checkpoint's own ``huggingface/``
            folder wins).
        repo_id: ``user/name``, ``org/name``, or ``name`` with ``organization``.
        step: Training step; inferred from ``global_step_N`` when omitted.
        organization: Namespace for a bare ``repo_id``.
        private: Create the repo private.
        optimizer_save_mode: ``None`` or ``"full"``.
        token, endpoint, weights_format, dtype, strategy, model_card, max_shard_size: see
            :class:`HuggingFaceUploader`.
        commit_message: Custom commit title.
        metrics: Metrics for the commit message and model card.
        **uploader_kwargs: Further :class:`HuggingFaceUploader` options (``card_info``, ``staging_dir``, ...).

    Returns:
        An :class:`UploadResult` (repo id, commit sha, URL, tag, files, bytes, seconds).

    Raises:
        MissingRepoIdError, InvalidRepoIdError, InvalidOptimizerSaveModeError, StepNotFoundError: bad arguments.
        MissingTokenError, InvalidTokenError, ReadOnlyTokenError, NamespaceAccessError: preflight failures.
        UploadFailedError: the upload failed after retries (``upload_pending.json`` left in the step directory).

    Example:
        >>> res = upload_checkpoint_to_hf("checkpoints/run/global_step_500", repo_id="alice/qwen-grpo",
        ...                               private=True)  # doctest: +SKIP
        >>> res.tag, res.url  # doctest: +SKIP
        ('step-500', 'https://huggingface.co/alice/qwen-grpo/tree/step-500')
    """
    uploader = HuggingFaceUploader(repo_id, organization, private, optimizer_save_mode, token=token,
                                   endpoint=endpoint, weights_format=weights_format, dtype=dtype,
                                   max_shard_size=max_shard_size, strategy=strategy, model_card=model_card,
                                   **uploader_kwargs)
    return uploader.upload_from_checkpoint_dir(checkpoint_dir, model_name, step, metrics=metrics,
                                               commit_message=commit_message)


def resume_pending(
    run_dir: str | Path = ".", *, token: str | None = None, endpoint: str | None = None
) -> list[tuple[Path, UploadResult | Exception]]:
    """Finish every upload that left an ``upload_pending.json`` under ``run_dir`` (searched recursively).

    The settings come from each marker; the token from ``token``, ``HF_TOKEN`` or the saved login (markers never
    hold one). The token goes only to the endpoint the user named (``endpoint``, else ``HF_ENDPOINT``, else
    huggingface.co): a marker that names another one is refused (a marker file is not consent to send a token
    somewhere). A finished upload removes its marker.

    Returns:
        ``(step_dir, UploadResult or the exception)`` per marker, in path order. Failures are returned, not raised,
        so one bad marker does not block the others.
    """
    from utils.hub.pending import PENDING_MARKER, read_pending

    out: list[tuple[Path, UploadResult | Exception]] = []
    for marker in sorted(Path(run_dir).rglob(PENDING_MARKER)):
        step_dir = marker.parent
        try:
            pending = read_pending(step_dir)
            opts = dict(pending.options)
            metrics, base_model = opts.pop("metrics", None), opts.pop("base_model", None)
            opts["endpoint"] = _consented_endpoint(opts.get("endpoint"), endpoint, marker)
            uploader = HuggingFaceUploader(pending.repo_id, token=token, **opts)
            result = uploader.upload_from_checkpoint_dir(pending.checkpoint_dir, base_model, pending.step,
                                                         metrics=metrics)
            out.append((step_dir, result))
        except Exception as e:  # noqa: BLE001 - reported per marker
            out.append((step_dir, e))
    return out


def _consented_endpoint(recorded: str | None, explicit: str | None, marker: Path) -> str:
    """The endpoint ``resume`` may send the token to: the user's; a marker naming another one is refused."""
    import os

    from utils.hub.errors import PendingUploadError

    mine = (explicit or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    if recorded and recorded.rstrip("/") != mine:
        raise PendingUploadError(
            f"{marker} names the Hub endpoint {recorded}, but this command would use {mine}; resume does not send "
            f"your token to an endpoint named only by a file. If {recorded} is yours, run again with --endpoint "
            f"{recorded} (or HF_ENDPOINT={recorded}).")
    return mine


def check_staging_space(checkpoint_dir: str | Path, staging_dir: str | Path | None, *,
                        include_optimizer: bool = False) -> int:
    """Fail before consolidating when the staging filesystem cannot hold the consolidated model.

    The estimate is an upper bound: the model rank files' total size (the merged weights are at most that: same
    dtype or smaller), plus the optimizer rank files when ``optimizer.pt`` is written.

    Returns:
        The estimate in bytes.

    Raises:
        StagingSpaceError: less free space than the estimate.
    """
    root = Path(checkpoint_dir)
    patterns = ["model_world_size_*_rank_*.pt"] + (["optim_world_size_*_rank_*.pt"] if include_optimizer else [])
    need = sum(f.stat().st_size for pattern in patterns for f in root.rglob(pattern))
    where = Path(staging_dir) if staging_dir else Path(tempfile.gettempdir())
    free = shutil.disk_usage(where).free
    if need > free:
        raise StagingSpaceError(
            f"Consolidating {root} needs up to {need / 1e9:.1f} GB in {where}, which has {free / 1e9:.1f} GB free. "
            "Free space there, or pass staging_dir=... (CLI --staging-dir, or TMPDIR) on a larger disk."
        )
    return need


def _step_dir_of(checkpoint_dir: Path) -> Path:
    """The ``global_step_N`` folder (where markers and locks go) for a step or actor directory."""
    checkpoint_dir = checkpoint_dir.resolve()
    if checkpoint_dir.name == "actor" and checkpoint_dir.parent.name.startswith("global_step_"):
        return checkpoint_dir.parent
    return checkpoint_dir


def _default_message(step: int, metrics: Mapping[str, float] | None) -> str:
    shown = ", ".join(f"{k}={v:.4g}" for k, v in headline_metrics(metrics).items())
    return f"Upload step {step}" + (f" ({shown})" if shown else "")


def _description(step: int, consolidation: Any, plan: PushPlan) -> str:
    parts = [f"step: {step}", f"tag: {plan.tag}"]
    if consolidation is not None:
        parts += [f"world size: {getattr(consolidation, 'world_size', '?')}",
                  f"dtype: {getattr(consolidation, 'dtype', '?')}",
                  f"consolidated in {getattr(consolidation, 'seconds', 0.0):.1f}s"]
    parts.append(f"files sent: {len(plan.to_send)} ({plan.bytes_to_send / 1e6:.1f} MB)")
    return "\n".join(parts)
