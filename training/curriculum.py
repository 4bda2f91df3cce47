"""Curriculum: move reasoning-gym difficulty levels up/down during training.

Uses reasoning-gym's own curriculum API: `reasoning_gym.create_curriculum(name)` gives a `BaseCurriculum` whose
attribute levels (`increment_global_level`, `set_attr_level`, ...) generate a dataset config
(`generate_configuration`); `CompositeDataset.update_dataset_config(name, updates)` swaps in a dataset built from
it. Items are generated lazily by index (see `training.data`), so every batch drawn after a change comes from the
new level.

Config (the original trainer's keys; note the meaning of `schedule.automatic`, kept for compatibility with its
configs: `true` = fixed schedule, increment every `update_steps` steps; `false` = driven by success rate):

    curriculum:
      enabled: true
      schedule: {automatic: false, update_steps: 30}
      last_k: 20                  # window of per-completion accuracy scores, per dataset
      success_threshold: 0.70     # mean over the window > this: level up
      failure_threshold: 0.10     # mean over the window < this: level down
      mode: inclusive             # range attributes: inclusive | upper_bound | last_k (reasoning-gym modes)
      curricula:
        knights_knaves: {attribute_levels: {"*": 0}}   # "*" sets every attribute; named ones override it

The window of a dataset is cleared after its level changes, so the next decision is made on completions of the new
level only (the original trainer kept the old scores and could move several levels on one streak).

Example:
    >>> controller = CurriculumController(cfg.curriculum, train_dataset.composite)      # doctest: +SKIP
    >>> controller.record(scores=[1.0, 0.0], data_sources=["chain_sum", "chain_sum"])   # doctest: +SKIP
    []
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from training.config_schema import section_defaults, to_plain
from training.errors import ConfigError, CurriculumError

__all__ = [
    "CURRICULUM_DEFAULTS",
    "CurriculumController",
    "LevelChange",
    "apply_initial_levels",
    "curriculum_section",
    "make_curricula",
]

# Written once, in training/config_schema.py (CurriculumConfig).
CURRICULUM_DEFAULTS: dict[str, Any] = section_defaults("curriculum")
_MODES = ("inclusive", "upper_bound", "last_k")


@dataclass(frozen=True)
class LevelChange:
    """One dataset moving from one global curriculum level to another."""

    dataset: str
    old_level: int
    new_level: int
    reason: str  # "success_rate", "failure_rate" or "schedule"
    success_rate: float | None = None


def curriculum_section(curriculum_cfg: Any) -> dict[str, Any]:
    """Return the curriculum section as a plain dict with defaults filled in."""
    cfg = to_plain(curriculum_cfg) or {}
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"curriculum: expected a mapping, got {type(cfg).__name__}")
    merged = {**CURRICULUM_DEFAULTS, **cfg}
    merged["schedule"] = {**CURRICULUM_DEFAULTS["schedule"], **(cfg.get("schedule") or {})}
    merged["curricula"] = dict(merged.get("curricula") or {})
    if merged["mode"] not in _MODES:
        raise ConfigError(f"curriculum.mode={merged['mode']!r}: use one of {_MODES}")
    last_k, update_steps = merged["last_k"], merged["schedule"]["update_steps"]
    if not isinstance(last_k, int) or not isinstance(update_steps, int) or last_k < 1 or update_steps < 1:
        raise ConfigError(
            f"curriculum.last_k={last_k!r}, curriculum.schedule.update_steps={update_steps!r}: both must be ints >= 1"
        )
    low, high = merged["failure_threshold"], merged["success_threshold"]
    if not 0 <= low < high <= 1:
        raise ConfigError(
            f"curriculum.failure_threshold={low}, success_threshold={high}: "
            "need 0 <= failure_threshold < success_threshold <= 1"
        )
    return merged


def _context(mode: str):
    from reasoning_gym.coaching.base_curriculum import DefaultCurriculumContext, RangeAttributeMode

    return DefaultCurriculumContext(mode=RangeAttributeMode(mode))


def make_curricula(cfg: dict[str, Any], dataset_names) -> dict[str, Any]:
    """Create one reasoning-gym curriculum per configured dataset, set to its configured start levels.

    Args:
        cfg: The curriculum section with defaults (`curriculum_section`).
        dataset_names: Names of the datasets in the composite (weight > 0).

    Raises:
        ConfigError: A dataset not among `dataset_names`, one without a reasoning-gym curriculum, an unknown
            attribute or an out-of-range level.
    """
    from reasoning_gym.factory import create_curriculum, has_curriculum

    curricula = {}
    for name, spec in cfg["curricula"].items():
        if name not in dataset_names:
            raise ConfigError(
                f"curriculum.curricula.{name}: dataset {name!r} is not in reasoning_gym.datasets "
                f"({sorted(dataset_names)}); add it there with a weight > 0"
            )
        if not has_curriculum(name):
            raise ConfigError(f"curriculum.curricula.{name}: reasoning-gym has no curriculum for {name!r}")
        curriculum = create_curriculum(name)
        levels = dict((spec or {}).get("attribute_levels") or {})
        try:
            if "*" in levels:
                curriculum.set_global_level(int(levels.pop("*")))
            for attr, level in levels.items():
                curriculum.set_attr_level(attr, int(level))
        except (KeyError, ValueError) as e:
            raise ConfigError(
                f"curriculum.curricula.{name}.attribute_levels={dict(spec['attribute_levels'])}: {e}; "
                f"attributes of {name!r}: "
                + ", ".join(f"{a} (levels 0..{len(d.levels) - 1})" for a, d in curriculum.attributes.items())
            ) from e
        curricula[name] = curriculum
    return curricula


def _apply(name: str, curriculum, composite, mode: str) -> None:
    """Rebuild dataset `name` of `composite` at the curriculum's current levels (seed and size kept)."""
    from reasoning_gym.coaching.attributes import RangeAttributeDefinition

    generated = curriculum.generate_configuration(context=_context(mode))
    fields = []
    for attr in curriculum.attributes.values():
        if isinstance(attr, RangeAttributeDefinition):
            fields += [attr.lower_field_name, attr.upper_field_name]
        else:
            fields.append(attr.field_name)
    composite.update_dataset_config(name, {f: getattr(generated, f) for f in fields})


def apply_initial_levels(curriculum_cfg: Any, composite) -> dict[str, Any]:
    """Set every curriculum dataset of `composite` to its configured start level; return the curricula.

    Used for the val composite too, so that validation starts at the same difficulty as training.
    """
    cfg = curriculum_section(curriculum_cfg)
    curricula = make_curricula(cfg, composite.datasets)
    for name, curriculum in curricula.items():
        _apply(name, curriculum, composite, cfg["mode"])
    return curricula


class CurriculumController:
    """Moves dataset levels of a reasoning-gym composite by success rate or on a fixed schedule.

    Args:
        curriculum_cfg: The `curriculum` config section (dict or OmegaConf).
        composite: The train `CompositeDataset` (`ReasoningGymDataset.composite`); updated in place.

    Raises:
        ConfigError: A curriculum for a dataset not in the composite or without a reasoning-gym curriculum, an
            unknown attribute or level, bad thresholds.
    """

    def __init__(self, curriculum_cfg: Any, composite) -> None:
        self.cfg = curriculum_section(curriculum_cfg)
        self.composite = composite
        self.fixed_schedule = bool(self.cfg["schedule"]["automatic"])
        self.update_steps = int(self.cfg["schedule"]["update_steps"])
        self.last_k = int(self.cfg["last_k"])
        self.success_threshold = float(self.cfg["success_threshold"])
        self.failure_threshold = float(self.cfg["failure_threshold"])
        self.curricula = make_curricula(self.cfg, composite.datasets)
        self._windows: dict[str, deque[float]] = {n: deque(maxlen=self.last_k) for n in self.curricula}
        for name in self.curricula:
            self._apply(name)

    def _apply(self, name: str) -> None:
        _apply(name, self.curricula[name], self.composite, self.cfg["mode"])

    def levels(self) -> dict[str, int]:
        """Return the current global level (highest attribute level) of each curriculum dataset."""
        return {name: c.get_max_level() for name, c in self.curricula.items()}

    def _move(self, name: str, up: bool, reason: str, rate: float | None) -> LevelChange | None:
        curriculum = self.curricula[name]
        old = curriculum.get_max_level()
        moved = curriculum.increment_global_level() if up else curriculum.decrement_global_level()
        if not moved:
            return None  # already at the top/bottom level
        self._apply(name)
        self._windows[name].clear()
        return LevelChange(name, old, curriculum.get_max_level(), reason, rate)

    def record(self, scores: Sequence[float], data_sources: Sequence[str]) -> list[LevelChange]:
        """Add one step's per-completion accuracy scores; move levels if a full window crosses a threshold.

        Args:
            scores: Accuracy of each completion (1.0 = correct), e.g. the `accuracy` key of `compute_score`.
            data_sources: The dataset name of each completion (the row's `data_source`); others are ignored.

        Returns:
            The level changes made (empty on a fixed schedule, where `on_step` decides).

        Raises:
            ValueError: `scores` and `data_sources` differ in length.
        """
        if len(scores) != len(data_sources):
            raise CurriculumError(f"record(): {len(scores)} scores but {len(data_sources)} data_sources")
        for score, source in zip(scores, data_sources, strict=True):
            if source in self._windows:
                self._windows[source].append(float(score))
        if self.fixed_schedule:
            return []
        changes = []
        for name, window in self._windows.items():
            if len(window) < self.last_k:
                continue
            rate = sum(window) / len(window)
            change = None
            if rate > self.success_threshold:
                change = self._move(name, up=True, reason="success_rate", rate=rate)
            elif rate < self.failure_threshold:
                change = self._move(name, up=False, reason="failure_rate", rate=rate)
            if change is not None:
                changes.append(change)
        return changes

    def on_step(self, global_step: int) -> list[LevelChange]:
        """On a fixed schedule (`schedule.automatic: true`), raise every level each `update_steps` steps."""
        if not self.fixed_schedule or global_step <= 0 or global_step % self.update_steps != 0:
            return []
        changes = [self._move(name, up=True, reason="schedule", rate=None) for name in self.curricula]
        return [c for c in changes if c is not None]

    def metrics(self) -> dict[str, float]:
        """Per-dataset level and windowed success rate, named for veRL's metric logger."""
        out: dict[str, float] = {}
        for name, curriculum in self.curricula.items():
            out[f"curriculum/{name}/level"] = float(curriculum.get_max_level())
            window = self._windows[name]
            if window:
                out[f"curriculum/{name}/success_rate"] = sum(window) / len(window)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Levels of every attribute and the score windows (plain Python; `torch.save`/JSON friendly)."""
        return {
            "levels": {
                name: {attr: c.get_attr_level(attr) for attr in c.attributes} for name, c in self.curricula.items()
            },
            "windows": {name: list(w) for name, w in self._windows.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore levels and windows saved by `state_dict` and rebuild the affected datasets.

        Raises:
            ConfigError: The state names a dataset this run has no curriculum for.
        """
        for name, levels in state["levels"].items():
            if name not in self.curricula:
                raise ConfigError(
                    f"curriculum state names dataset {name!r}, but curriculum.curricula has {sorted(self.curricula)}"
                )
            for attr, level in levels.items():
                self.curricula[name].set_attr_level(attr, int(level))
            self._apply(name)
        for name, window in state.get("windows", {}).items():
            if name in self._windows:
                self._windows[name] = deque((float(s) for s in window), maxlen=self.last_k)
