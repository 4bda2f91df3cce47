"""How this project hands a run to veRL 0.9.1's V1 GRPO trainer, through its seams only.

- :func:`prepare_config` turns the composed Hydra config into what veRL reads: the ``reasoning_gym`` and
  ``curriculum`` sections copied into ``data`` (veRL's dataset factory only passes ``data`` to
  ``data.custom_cls``), ``tiny://qwen2`` resolved to the offline tiny model.
- :class:`ReasoningGymTrainer` is veRL's synchronous V1 trainer (``PPOTrainerSync``) registered as trainer mode
  ``rg_sync`` (``trainer.v1.trainer_mode``). It overrides three methods and copies none of ``fit()``:
  ``_compute_advantage`` (feeds each step's per-completion accuracy to the curriculum controller, then calls
  veRL's), ``_save_checkpoint`` / ``_load_checkpoint`` (curriculum state beside veRL's ``data.pt``). With the
  curriculum disabled it behaves exactly like ``sync``.
- :data:`GRPOTaskRunner` is veRL's ``TaskRunnerV1`` Ray actor, subclassed so that its process imports this
  module (and so registers ``rg_sync``) before veRL looks the trainer mode up.
- The Hub upload hook is veRL's ``trainer.checkpoint_callback_class`` (set by ``training.hub_upload``); two
  small calls here serve it: the step's metrics once veRL computed them (``_compute_metrics``) and the wait for
  the last upload when the run ends (``GRPOTaskRunner.run``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import psutil
import ray
from omegaconf import DictConfig, OmegaConf, open_dict
from verl.trainer.main_ppo import TaskRunnerV1
from verl.trainer.ppo.v1 import PPOTrainerSync, register_trainer

from training.config_checks import TINY_MODEL_PATHS
from training.errors import ConfigError, MissingRewardKeyError
from training.progress import ProgressLine, val_exact

logger = logging.getLogger(__name__)

TRAINER_MODE = "rg_sync"
TINY_MODEL_SCHEME = "tiny://"
CURRICULUM_STATE_FILE = "curriculum_state.json"

__all__ = ["GRPOTaskRunner", "ReasoningGymTrainer", "TRAINER_MODE", "TaskRunnerLauncher", "metric_log_path",
           "prepare_config", "resolve_model_path"]


def resolve_model_path(path: str, *, cache_dir: str | None = None) -> str:
    """Resolve ``tiny://qwen2`` (random init, for fast tests) and ``tiny://qwen2-warm`` (after a short supervised
    warm-up on the demo task, see :mod:`training.warm_model`) to their cached directories; pass others through.

    Args:
        path: ``actor_rollout_ref.model.path``.
        cache_dir: where the tiny model is cached (default: ``$VERL_GRPO_HUB_CACHE`` or ``~/.cache/verl-grpo-hub``).

    Returns:
        A local directory or a Hub id, as veRL expects.

    Raises:
        ConfigError: for an unknown ``tiny://`` name.

    Example:
        >>> resolve_model_path("Qwen/Qwen2.5-3B-Instruct")
        'Qwen/Qwen2.5-3B-Instruct'
    """
    if not str(path).startswith(TINY_MODEL_SCHEME):
        return path
    if path not in TINY_MODEL_PATHS:
        raise ConfigError(f"actor_rollout_ref.model.path={path!r}: unknown tiny model; use one of {list(TINY_MODEL_PATHS)}")
    if path == "tiny://qwen2-warm":
        from training.warm_model import ensure_warm_model

        return ensure_warm_model(cache_dir)
    from training.tiny_model import ensure_tiny_model

    return ensure_tiny_model(cache_dir)


def prepare_config(cfg: DictConfig) -> DictConfig:
    """Wire the project's sections into veRL's config, in place; return ``cfg``.

    Copies ``reasoning_gym`` / ``curriculum`` into ``data`` for ``ReasoningGymDataset``, resolves the model path,
    and points the reward's ``tokenizer_path`` (token-counting rewards) at the resolved model. A Hub token given
    as ``hf_upload.token`` moves to ``HF_TOKEN`` (Ray workers inherit it) and is blanked in the config, which
    veRL prints and hands to its loggers (wandb stores it).
    """
    # TransferQueue sizes its torch thread pool at 8 and warns on every put/get when the machine has fewer physical
    # cores (91 warnings in a 30-step demo on 2 cores): ask for what exists. Ray workers inherit the variable.
    os.environ.setdefault("TQ_NUM_THREADS", str(min(8, psutil.cpu_count(logical=False) or 1)))
    with open_dict(cfg):
        if cfg.get("hf_upload", None) is not None and cfg.hf_upload.get("token", None):
            os.environ["HF_TOKEN"] = str(cfg.hf_upload.token)
            cfg.hf_upload.token = None
        model_path = resolve_model_path(str(cfg.actor_rollout_ref.model.path))
        cfg.actor_rollout_ref.model.path = model_path
        if "reasoning_gym" in cfg:
            cfg.data.reasoning_gym = OmegaConf.to_container(cfg.reasoning_gym, resolve=True)
        if "curriculum" in cfg:
            cfg.data.curriculum = OmegaConf.to_container(cfg.curriculum, resolve=True)
        reward_kwargs = cfg.reward.custom_reward_function.get("reward_kwargs", None)
        if reward_kwargs is not None and str(reward_kwargs.get("tokenizer_path", "")).startswith(TINY_MODEL_SCHEME):
            reward_kwargs.tokenizer_path = model_path
    return cfg


@register_trainer(TRAINER_MODE)
class ReasoningGymTrainer(PPOTrainerSync):
    """veRL's synchronous V1 trainer plus reasoning-gym curriculum updates after each step's rewards."""

    curriculum = None
    progress: ProgressLine | None = None

    def __init__(self, config: DictConfig) -> None:
        super().__init__(config)
        # veRL branches on the mode *name* ("sync" vs the async modes: TransferQueue state in checkpoints,
        # re-issued prompts on resume); this trainer is veRL's sync trainer, so it answers to "sync".
        self.trainer_mode = "sync"
        self.metric_log = metric_log_path(config)

    def on_train_begin(self) -> None:
        super().on_train_begin()
        # Started here, after setup and the initial validation, so s/step and the ETA measure training steps.
        self.progress = ProgressLine(self.total_training_steps, start_step=self.global_steps - 1)

    def _validate(self) -> dict[str, float]:
        val_metrics = super()._validate()
        if self.progress is None:  # before training: the progress lines start later, so say it here
            exact = val_exact(val_metrics)
            shown = ", ".join(f"{task} {value:.2f}" for task, value in sorted(exact.items()))
            print(f"validation before training (step {self.global_steps}): exact-answer accuracy {shown or 'n/a'}",
                  flush=True)
        return val_metrics

    def _init_dataloader(self) -> None:
        super()._init_dataloader()
        self._init_curriculum()

    def _init_curriculum(self) -> None:
        """Attach a curriculum controller to the train dataset's composite when ``curriculum.enabled``."""
        curriculum_cfg = self.config.get("curriculum", None)
        if curriculum_cfg is not None and curriculum_cfg.get("enabled", False):
            from training.curriculum import CurriculumController

            self.curriculum = CurriculumController(curriculum_cfg, self.train_dataset.composite)
            logger.info("curriculum enabled, levels %s", self.curriculum.levels())

    def _compute_advantage(self, batch: Any, metrics: dict) -> Any:
        if self.curriculum is not None:
            self.update_curriculum(*self._step_accuracy(batch), global_step=self.global_steps, metrics=metrics)
        return super()._compute_advantage(batch, metrics)

    def update_curriculum(
        self, scores: list[float], data_sources: list[str], *, global_step: int, metrics: dict | None = None
    ) -> list:
        """Feed one step's per-completion accuracy to the controller; later batches use the new levels.

        Args:
            scores: accuracy per completion (``compute_score``'s ``accuracy``).
            data_sources: dataset name per completion.
            global_step: the step these completions belong to (fixed schedules count steps).
            metrics: the step's metric dict; ``curriculum/<dataset>/level`` etc. are added.

        Returns:
            The ``LevelChange`` list of this step.
        """
        changes = self.curriculum.record(scores, data_sources) + self.curriculum.on_step(global_step)
        for change in changes:
            logger.info("curriculum step %d: %s", global_step, change)
        if metrics is not None:
            metrics.update(self.curriculum.metrics())
        return changes

    @staticmethod
    def _train_accuracy(batch: Any) -> dict[str, float]:
        """``train/exact_acc`` and ``train/accuracy``: means over this step's rollouts (veRL logs val only)."""
        import transfer_queue as tq

        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["extra_fields"])
        infos = [((extra or {}).get("reward_extra_info", {}) or {}) for extra in _as_list(data["extra_fields"])]
        out = {}
        for key, name in (("exact", "train/exact_acc"), ("accuracy", "train/accuracy")):
            values = [float(info[key]) for info in infos if key in info]
            if values:
                out[name] = sum(values) / len(values)
        return out

    def final_report(self) -> None:
        """At the end of a run: the curves PNG beside the metric log and the before/after accuracy table."""
        if self.metric_log is None or not Path(self.metric_log).is_file():
            return
        from training.report import ReportError, write_report

        try:
            png, table = write_report(Path(self.metric_log).parent)
        except (ReportError, OSError, ImportError) as e:  # a report must never fail a finished run
            print(f"training report: not written ({type(e).__name__}: {e})", flush=True)
            return
        print(f"{table}\ntraining curves: {png.resolve()}\n(redraw any time: python -m training.report "
              f"{Path(self.metric_log).parent})", flush=True)

    @staticmethod
    def _step_accuracy(batch: Any) -> tuple[list[float], list[str]]:
        """Per-completion ``accuracy`` and ``data_source`` of a step, from veRL's TransferQueue.

        The agent loop stores the reward function's extra keys under ``extra_fields["reward_extra_info"]``.

        Raises:
            KeyError: if the reward function returned no ``accuracy`` (the curriculum needs it).
        """
        import transfer_queue as tq

        data = tq.kv_batch_get(
            keys=batch.keys, partition_id=batch.partition_id, select_fields=["data_source", "extra_fields"]
        )
        scores = []
        for extra in _as_list(data["extra_fields"]):
            info = (extra or {}).get("reward_extra_info", {}) or {}
            if "accuracy" not in info:
                raise MissingRewardKeyError(
                    "curriculum.enabled needs the reward function to return an 'accuracy' key per completion "
                    f"(training.rewards.compute_score does); got keys {sorted(info)}"
                )
            scores.append(float(info["accuracy"]))
        return scores, [str(x) for x in _as_list(data["data_source"])]

    def _save_checkpoint(self) -> None:
        folder = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
        # lineage (tracking run id, config hash, veRL version) beside the shards, for trainer_state.json
        from training.hub_resume import write_lineage

        write_lineage(self.config, folder)
        if self.curriculum is not None:
            os.makedirs(folder, exist_ok=True)
            from utils.checkpoint.tempdirs import write_text_atomic  # temp file + rename: never half a document

            write_text_atomic(os.path.join(folder, CURRICULUM_STATE_FILE), json.dumps(self.curriculum.state_dict()))
        super()._save_checkpoint()

    def _compute_metrics(self, batch: Any, metrics: dict, timing_raw: dict, global_steps: int, epoch: int) -> Any:
        result = super()._compute_metrics(batch, metrics, timing_raw, global_steps, epoch)
        metrics.update(self._train_accuracy(batch))
        if self.progress is not None:
            self.progress.update(global_steps, metrics)
        # Hub upload hook (training/hub_upload_hook.py): veRL saves before it computes the step's metrics, so the
        # callback submits this step's checkpoint now, with its rewards for the commit message and model card.
        on_step_metrics = getattr(self.checkpoint_callback, "on_step_metrics", None)
        if on_step_metrics is not None:
            on_step_metrics(global_steps, metrics)
        return result

    def _load_checkpoint(self) -> Any:
        self._place_rank_files()
        result = super()._load_checkpoint()
        if self.curriculum is not None and self.global_steps > 0:
            path = os.path.join(
                self.config.trainer.default_local_dir, f"global_step_{self.global_steps}", CURRICULUM_STATE_FILE
            )
            if os.path.exists(path):
                with open(path) as f:
                    self.curriculum.load_state_dict(json.load(f))
                logger.info("curriculum restored from %s: %s", path, self.curriculum.levels())
        return result

    def _place_rank_files(self) -> None:
        """Multi-node with node-local disks: the step veRL is about to load (``hf_upload.resume`` resharded it on
        this node) reaches every rank's node first, through Ray (``training/cluster_gather.py``)."""
        trainer_cfg = self.config.trainer
        if int(trainer_cfg.get("nnodes", 1)) <= 1:
            return
        if trainer_cfg.resume_mode == "resume_path" and trainer_cfg.get("resume_from_path", None):
            step_dir = str(trainer_cfg.resume_from_path)
        elif trainer_cfg.resume_mode == "auto":
            from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path

            step_dir = find_latest_ckpt_path(os.path.abspath(str(trainer_cfg.default_local_dir)))
        else:
            return
        if not step_dir or not os.path.isdir(step_dir):
            return
        from training.cluster_gather import locate_ranks, place_rank_files

        layout = locate_ranks(self.actor_rollout_wg)
        moved = place_rank_files(os.path.abspath(step_dir), layout, os.path.abspath(str(trainer_cfg.default_local_dir)))
        if moved:  # print: Ray forwards actor stdout to the driver's console; actor loggers are unset
            print(f"multi-node resume: the ranks' files of {step_dir} are on their nodes ("
                  + ", ".join(f"{layout.label(n)}: {b / 1e6:.1f} MB copied" for n, b in moved.items()) + ")",
                  flush=True)


def metric_log_path(config: Any) -> str | None:
    """Where veRL's ``file`` logger writes this run's metrics: ``<trainer.default_local_dir>/metrics.jsonl``.

    Sets ``VERL_FILE_LOGGER_PATH`` (read by ``verl.utils.tracking.FileLogger`` in this process) unless the user set
    it; a file left by an earlier run in the same folder (a resume) is moved aside to ``metrics-<time>.jsonl``
    first, because veRL opens the log with ``"wb"``. ``None`` when ``trainer.logger`` has no ``file``.
    """
    loggers = config.trainer.get("logger", []) or []
    if isinstance(loggers, str):
        loggers = [loggers]
    if "file" not in loggers:
        return None
    if os.environ.get("VERL_FILE_LOGGER_PATH"):
        return os.environ["VERL_FILE_LOGGER_PATH"]
    from training.report import METRICS_FILE

    path = Path(config.trainer.default_local_dir) / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size:
        path.rename(path.with_name(f"metrics-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"))
    os.environ["VERL_FILE_LOGGER_PATH"] = str(path.resolve())
    return str(path.resolve())


def _as_list(values: Any) -> list:
    # TransferQueue hands non-tensor fields back as a list, a NonTensorStack or a numpy array.
    return values.tolist() if hasattr(values, "tolist") else list(values)


@ray.remote
class GRPOTaskRunner(TaskRunnerV1.__ray_actor_class__):  # type: ignore[name-defined, misc]
    """veRL's V1 task runner that registers ``rg_sync`` in its own Ray process before veRL looks it up.

    Args:
        hub_token: The Hub token for the upload hook (an argument: a joined cluster's workers do not inherit the
            launching shell's ``HF_TOKEN``, and Ray logs runtime-env variables in clear).
    """

    def __init__(self, hub_token: str | None = None):
        if hub_token:
            os.environ["HF_TOKEN"] = hub_token
        super().__init__()

    def run(self, config: DictConfig) -> None:
        # Ray ships this class by value, so the actor process has not imported this module: do it here.
        import training.trainer  # noqa: F401

        try:
            super().run(config)
        finally:
            # Hub upload hook: the last (background) upload must finish before the run ends; this waits with
            # progress lines and raises only with hf_upload.fail_on_error (training/hub_upload_hook.py).
            trainer = getattr(self, "trainer", None)
            finish = getattr(getattr(trainer, "checkpoint_callback", None), "finish", None)
            if finish is not None:
                finish()
        final_report = getattr(trainer, "final_report", None)
        if final_report is not None:
            final_report()


class TaskRunnerLauncher:
    """What ``run_ppo(task_runner_class=...)`` gets: it calls ``.remote()`` (or ``.options(...).remote()``).

    Starts :class:`GRPOTaskRunner` on the driver's node (the trainer writes ``data.pt`` and the step tracker
    there, where ``hf_upload.resume`` prepared them: with node-local disks they must be on the same disk) with the
    Hub token as an argument.

    Example:
        >>> run_ppo(cfg, task_runner_class=TaskRunnerLauncher())  # doctest: +SKIP
    """

    def __init__(self, options: dict[str, Any] | None = None):
        self._options = dict(options or {})

    def options(self, **options: Any) -> TaskRunnerLauncher:
        return TaskRunnerLauncher({**self._options, **options})

    def remote(self) -> Any:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = ray.get_runtime_context().get_node_id()
        options = {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=here, soft=False), **self._options}
        return GRPOTaskRunner.options(**options).remote(hub_token=_hub_token())


def _hub_token() -> str | None:
    """``HF_TOKEN`` (``hf_upload.token`` was moved there), else the saved login of this machine, else ``None``."""
    token = os.environ.get("HF_TOKEN") or None
    if token is None:
        try:
            from huggingface_hub import get_token

            token = get_token()
        except Exception:  # noqa: BLE001 - no login is fine: uploads then report the missing token themselves
            token = None
    return token
