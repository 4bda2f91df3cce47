"""reasoning-gym composite -> veRL rows: splits, seeds, row format, lazy generation, batching through veRL."""

import json

import numpy as np
import pytest
import reasoning_gym
from omegaconf import OmegaConf
from reasoning_gym.utils import SYSTEM_PROMPTS
from verl.trainer.ppo.utils import create_rl_dataset
from verl.utils.dataset.rl_dataset import collate_fn

from training.data import ReasoningGymDataset, build_reasoning_gym_dataset, split_from_data_files
from training.errors import ConfigError

RG = {
    "datasets": {
        "chain_sum": {"weight": 1, "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}},
        "letter_counting": {"weight": 1, "config": {"min_words": 3, "max_words": 5}},
        "spell_backward": {"weight": 0},
    },
    "dataset_size": 40,
    "val_size": 12,
    "seed": 11,
    "developer_prompt": "DeepSeekZero",
}


def data_cfg(rg=RG, **extra):
    return OmegaConf.create(
        {
            "custom_cls": {"path": "pkg://training.data", "name": "ReasoningGymDataset"},
            "reasoning_gym": rg,
            **extra,
        }
    )


@pytest.fixture(scope="module")
def datasets():
    cfg = data_cfg()
    # Built the way veRL's V1 trainer builds them (verl.trainer.ppo.utils.create_rl_dataset + data.custom_cls).
    train = create_rl_dataset("reasoning_gym://train", cfg, tokenizer=None, processor=None, is_train=True)
    val = create_rl_dataset("reasoning_gym://val", cfg, tokenizer=None, processor=None, is_train=False)
    return train, val


def test_veRL_factory_builds_our_class_for_both_splits(datasets):
    train, val = datasets
    assert type(train) is ReasoningGymDataset and type(val) is ReasoningGymDataset
    assert (train.split, len(train)) == ("train", 40)
    assert (val.split, len(val)) == ("val", 12)
    assert (train.composite.seed, val.composite.seed) == (11, 11 + 40)


def _questions(ds, size_from_config):
    """All questions a composite's datasets can produce at these indices, by dataset name."""
    out = set()
    for name, sub in ds.composite.datasets.items():
        out |= {(name, sub[i]["question"]) for i in range(size_from_config)}
    return out


def test_no_val_item_is_a_train_item(datasets):
    # Every train item comes from sub-dataset `name` at an index < 40; compare with the text, not the seeds.
    # (chain_sum with 2 one-digit terms has few distinct questions, so compare letter_counting only.)
    train, val = datasets
    train_q = {q for name, q in _questions(train, 40) if name == "letter_counting"}
    val_q = [val[i]["raw_prompt"][1]["content"] for i in range(len(val)) if val[i]["data_source"] == "letter_counting"]
    assert val_q and not [q for q in val_q if q in train_q]


def test_old_trainer_seeds_would_have_leaked_val_into_train():
    # The original trainer used seed 1 / val seed 2: val item i is train item i + 1 of the same dataset.
    rg = {"datasets": {"letter_counting": {"weight": 1}}, "dataset_size": 20, "seed": 1}
    train = build_reasoning_gym_dataset(rg, "train", seed=1)
    val = build_reasoning_gym_dataset(rg, "val", seed=2)
    assert [val[i]["question"] for i in range(19)] == [train[i + 1]["question"] for i in range(19)]
    with pytest.raises(ConfigError, match=r"reasoning_gym.val_seed=2 with seed=1: val items would repeat train"):
        build_reasoning_gym_dataset({**rg, "val_seed": 2}, "val")


def test_weight_zero_dataset_is_left_out(datasets):
    train, _ = datasets
    assert sorted(train.composite.datasets) == ["chain_sum", "letter_counting"]
    assert {train[i]["data_source"] for i in range(len(train))} == {"chain_sum", "letter_counting"}


def test_row_format_matches_what_veRL_reads(datasets):
    _, val = datasets
    row = val[3]
    assert row["raw_prompt"] == [
        {"role": "system", "content": SYSTEM_PROMPTS["DeepSeekZero"]},
        {"role": "user", "content": row["extra_info"]["entry"]["question"]},
    ]
    assert row["reward_model"] == {"style": "rule", "ground_truth": row["extra_info"]["entry"]["answer"]}
    assert row["extra_info"]["split"] == "val" and row["extra_info"]["index"] == 3 and row["index"] == 3
    assert row["dummy_tensor"].tolist() == [0]


def test_row_entry_is_the_independently_generated_reasoning_gym_entry(datasets):
    # Ground truth from reasoning-gym directly: the composite picks the dataset with Random(seed + idx) and asks
    # that dataset (seed + position + 1 in the spec list) for item idx.
    _, val = datasets
    for idx in range(len(val)):
        row = val[idx]
        name = row["data_source"]
        position = list(RG["datasets"]).index(name)  # the weight-0 dataset is last, so positions are unchanged
        cfg = {**RG["datasets"][name]["config"], "seed": 51 + position + 1, "size": 12}
        expected = reasoning_gym.create_dataset(name, **cfg)[idx]
        assert row["extra_info"]["entry"]["question"] == expected["question"]
        assert row["extra_info"]["entry"]["answer"] == expected["answer"]


def test_entries_survive_a_json_round_trip(datasets):
    # Tuples in metadata become lists; what matters is that the dataset still scores the round-tripped entry.
    train, _ = datasets
    for i in range(len(train)):
        entry = json.loads(json.dumps(train[i]["extra_info"]["entry"]))
        assert reasoning_gym.get_score_answer_fn(entry["metadata"]["source_dataset"])(entry["answer"], entry) == 1.0


def test_collate_and_tensordict_conversion_keep_entries_per_row(datasets):
    from verl.utils import tensordict_utils as tu

    _, val = datasets
    batch = collate_fn([val[i] for i in range(4)])
    assert batch["dummy_tensor"].shape == (4, 1)
    td = tu.get_tensordict(batch)
    infos = td["extra_info"]
    assert [info["entry"]["question"] for info in infos] == [val.entry(i)["question"] for i in range(4)]
    assert isinstance(batch["raw_prompt"], np.ndarray)


def test_items_are_generated_lazily_from_the_current_dataset_config():
    ds = ReasoningGymDataset(
        "reasoning_gym://train",
        tokenizer=None,
        config=data_cfg(
            {"datasets": {"chain_sum": {"weight": 1, "config": {"max_terms": 2, "max_digits": 1}}}, "dataset_size": 30}
        ),
    )
    assert {ds[i]["extra_info"]["entry"]["metadata"]["num_terms"] for i in range(30)} == {2}
    ds.composite.update_dataset_config("chain_sum", {"min_terms": 4, "max_terms": 4})
    assert {ds[i]["extra_info"]["entry"]["metadata"]["num_terms"] for i in range(30)} == {4}


def test_max_samples_and_index_bounds():
    ds = ReasoningGymDataset(["reasoning_gym://val"], tokenizer=None, config=data_cfg(), max_samples=5)
    assert len(ds) == 5
    with pytest.raises(IndexError):
        ds[5]


def test_build_reasoning_gym_dataset_seeds():
    rg = {"datasets": {"chain_sum": {"weight": 1}}, "dataset_size": 4, "seed": 7}
    assert build_reasoning_gym_dataset(rg, "train").seed == 7
    assert build_reasoning_gym_dataset(rg, "val").seed == 11
    assert build_reasoning_gym_dataset({**rg, "val_seed": 100}, "val").seed == 100
    assert build_reasoning_gym_dataset({**rg, "val_seed": 3}, "val").seed == 3
    assert build_reasoning_gym_dataset(rg, "val", seed=3).seed == 3


@pytest.mark.parametrize(
    ("rg", "message"),
    [
        ({"datasets": {"chain_sum": {"weight": 0}}}, "every weight is 0"),
        ({"datasets": {"chain_sum": {"weight": -1}}}, r"reasoning_gym.datasets.chain_sum.weight=-1.0"),
        ({"datasets": {}}, "reasoning_gym.datasets is empty"),
        ({"datasets": {"chain_summ": {"weight": 1}}}, "cannot build the composite"),
        ({"datasets": {"chain_sum": {"weight": 1, "config": {"max_termz": 3}}}}, "cannot build the composite"),
    ],
)
def test_bad_reasoning_gym_sections(rg, message):
    with pytest.raises(ConfigError, match=message):
        build_reasoning_gym_dataset(rg, "train")


def test_bad_data_files_and_missing_section():
    with pytest.raises(ConfigError, match="expects 'reasoning_gym://train'"):
        split_from_data_files("~/data/rlhf/gsm8k/train.parquet")
    with pytest.raises(ConfigError, match="data.reasoning_gym is missing"):
        ReasoningGymDataset("reasoning_gym://train", tokenizer=None, config=OmegaConf.create({}))
    with pytest.raises(ConfigError, match="developer_prompt='DeepSeek'"):
        ReasoningGymDataset("reasoning_gym://train", None, data_cfg({**RG, "developer_prompt": "DeepSeek"}))
