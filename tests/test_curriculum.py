"""Curriculum: success streaks raise levels (later items come from the new level), failures lower them, schedule."""

import pytest
from omegaconf import OmegaConf

from training.curriculum import CurriculumController, LevelChange
from training.data import ReasoningGymDataset, build_reasoning_gym_dataset
from training.errors import ConfigError

RG = {"datasets": {"chain_sum": {"weight": 1}, "letter_counting": {"weight": 1}}, "dataset_size": 60, "seed": 3}
CUR = {
    "enabled": True,
    "schedule": {"automatic": False, "update_steps": 2},
    "last_k": 4,
    "success_threshold": 0.7,
    "failure_threshold": 0.1,
    "curricula": {"chain_sum": {"attribute_levels": {"*": 0}}},
}


def num_terms(ds, n=60):
    """num_terms of the chain_sum items at indices 0..n-1, read from the rows veRL would get."""
    rows = [ds[i] for i in range(n)]
    return {r["extra_info"]["entry"]["metadata"]["num_terms"] for r in rows if r["data_source"] == "chain_sum"}


@pytest.fixture
def train():
    return ReasoningGymDataset("reasoning_gym://train", None, OmegaConf.create({"reasoning_gym": RG}))


def test_forced_success_streak_raises_the_level_and_new_items_come_from_it(train):
    controller = CurriculumController(CUR, train.composite)
    assert controller.levels() == {"chain_sum": 0}
    assert num_terms(train) == {2}  # level 0: exactly 2 terms (reasoning-gym's curriculum)
    assert controller.record([1.0] * 3, ["chain_sum"] * 3) == []  # window not full yet
    changes = controller.record([1.0, 0.0, 1.0], ["chain_sum", "letter_counting", "chain_sum"])
    assert changes == [LevelChange("chain_sum", 0, 1, "success_rate", 1.0)]
    # Inclusive mode: level 1 draws 2..3 terms; items fetched now (same indices) come from the new level.
    assert num_terms(train) == {2, 3}
    assert controller.metrics()["curriculum/chain_sum/level"] == 1.0
    assert "curriculum/chain_sum/success_rate" not in controller.metrics()  # window cleared after the move


def test_failure_streak_lowers_the_level_and_middle_rates_hold(train):
    controller = CurriculumController(
        {**CUR, "curricula": {"chain_sum": {"attribute_levels": {"*": 2}}}}, train.composite
    )
    assert controller.levels() == {"chain_sum": 2}
    assert num_terms(train) == {2, 3, 4}
    assert controller.record([1.0, 0.0, 1.0, 0.0], ["chain_sum"] * 4) == []  # 0.5: hold
    assert controller.record([0.0] * 4, ["chain_sum"] * 4) == [LevelChange("chain_sum", 2, 1, "failure_rate", 0.0)]
    assert num_terms(train) == {2, 3}


def test_levels_stop_at_the_bounds(train):
    controller = CurriculumController(CUR, train.composite)
    assert controller.record([0.0] * 4, ["chain_sum"] * 4) == []  # already at level 0


def test_fixed_schedule_moves_every_update_steps(train):
    controller = CurriculumController({**CUR, "schedule": {"automatic": True, "update_steps": 2}}, train.composite)
    assert controller.record([1.0] * 10, ["chain_sum"] * 10) == []  # the schedule, not success, decides
    assert controller.on_step(1) == []
    assert controller.on_step(2) == [LevelChange("chain_sum", 0, 1, "schedule", None)]
    assert controller.on_step(3) == []
    assert num_terms(train) == {2, 3}


def test_state_dict_round_trip_restores_levels_and_windows(train):
    controller = CurriculumController(CUR, train.composite)
    controller.record([1.0] * 4, ["chain_sum"] * 4)
    controller.record([1.0, 0.0], ["chain_sum"] * 2)
    state = controller.state_dict()
    assert state["levels"]["chain_sum"] == {"num_terms": 1, "num_digits": 1}
    assert state["windows"] == {"chain_sum": [1.0, 0.0]}

    fresh = ReasoningGymDataset("reasoning_gym://train", None, OmegaConf.create({"reasoning_gym": RG}))
    restored = CurriculumController(CUR, fresh.composite)
    assert num_terms(fresh) == {2}
    restored.load_state_dict(state)
    assert restored.levels() == {"chain_sum": 1} and restored.state_dict() == state
    assert num_terms(fresh) == {2, 3}


def test_start_levels_apply_to_train_and_val_through_the_data_config():
    cfg = OmegaConf.create(
        {"reasoning_gym": RG, "curriculum": {**CUR, "curricula": {"chain_sum": {"attribute_levels": {"num_terms": 3}}}}}
    )
    for split in ("train", "val"):
        ds = ReasoningGymDataset(f"reasoning_gym://{split}", None, cfg)
        assert num_terms(ds) == {2, 3, 4, 5}, split


def test_seed_is_kept_across_level_changes(train):
    before = {k: (d.seed, d.size) for k, d in train.composite.datasets.items()}
    controller = CurriculumController(CUR, train.composite)
    controller.record([1.0] * 4, ["chain_sum"] * 4)
    assert {k: (d.seed, d.size) for k, d in train.composite.datasets.items()} == before


@pytest.mark.parametrize(
    ("cur", "message"),
    [
        ({"curricula": {"spell_backward": {"attribute_levels": {"*": 0}}}}, r"curricula.spell_backward: .*not in"),
        (
            {"curricula": {"chain_sum": {"attribute_levels": {"num_termz": 0}}}},
            r"num_termz.*num_terms \(levels 0..10\)",
        ),
        ({"curricula": {"chain_sum": {"attribute_levels": {"num_terms": 99}}}}, r"Invalid level: 99"),
        ({"success_threshold": 0.1, "failure_threshold": 0.5}, "need 0 <= failure_threshold < success_threshold"),
        ({"last_k": 0}, r"curriculum.last_k=0"),
        ({"mode": "sideways"}, r"curriculum.mode='sideways'"),
    ],
)
def test_bad_curriculum_configs(cur, message):
    composite = build_reasoning_gym_dataset(RG, "train")
    with pytest.raises(ConfigError, match=message):
        CurriculumController({**CUR, **cur}, composite)


def test_record_rejects_mismatched_lengths(train):
    with pytest.raises(ValueError, match="2 scores but 1 data_sources"):
        CurriculumController(CUR, train.composite).record([1.0, 0.0], ["chain_sum"])
