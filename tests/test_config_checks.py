"""check_run_config: bad configs fail before Ray starts, naming the key, the value and the fix."""

import copy
import doctest

import pytest
from omegaconf import OmegaConf

import training.config_checks
import training.data
import training.rewards
from training.config_checks import check_run_config
from training.errors import ConfigError

GOOD = {
    "reasoning_gym": {
        "datasets": {
            "chain_sum": {"weight": 1, "config": {"max_terms": 2, "max_digits": 1}},
            "knights_knaves": {"weight": 0.5},
            "spell_backward": {"weight": 0},
        },
        "dataset_size": 100,
        "developer_prompt": "DeepSeekZero",
    },
    "actor_rollout_ref": {"model": {"path": "tiny://qwen2"}},
    "data": {"max_response_length": 64, "dataloader_num_workers": 0},
    "reward": {
        "custom_reward_function": {
            "path": "pkg://training.rewards",
            "name": "compute_score",
            "reward_kwargs": {
                "use_accuracy": True,
                "secondary_rewards": [{"name": "format", "scaling_factor": 0.2}, {"name": "cosine", "max_tokens": 64}],
                "tokenizer_path": "tiny://qwen2",
            },
        }
    },
    "curriculum": {
        "enabled": True,
        "last_k": 20,
        "curricula": {"knights_knaves": {"attribute_levels": {"*": 0, "n_people": 1}}},
    },
}


def with_(key, value):
    """GOOD with the dotted `key` set to `value` (None deletes it)."""
    cfg = copy.deepcopy(GOOD)
    *parents, last = key.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return cfg


def test_good_config_passes_as_dict_and_as_omegaconf(tmp_path):
    check_run_config(GOOD)
    check_run_config(OmegaConf.create(GOOD))
    (tmp_path / "config.json").write_text("{}")
    check_run_config(with_("actor_rollout_ref.model.path", str(tmp_path)))
    check_run_config(with_("actor_rollout_ref.model.path", "Qwen/Qwen2.5-3B-Instruct"))
    check_run_config(with_("curriculum.enabled", False))


def test_interpolations_are_resolved():
    cfg = OmegaConf.create(
        with_("reward.custom_reward_function.reward_kwargs.tokenizer_path", "${actor_rollout_ref.model.path}")
    )
    check_run_config(cfg)


BAD = [
    # (key, value, message regex)
    ("reasoning_gym", None, r"reasoning_gym section is missing"),
    ("reasoning_gym.datasets", {}, r"reasoning_gym.datasets is empty"),
    (
        "reasoning_gym.datasets.chain_summ",
        {"weight": 1},
        r"reasoning_gym.datasets.chain_summ: unknown reasoning-gym dataset; did you mean 'chain_sum'",
    ),
    ("reasoning_gym.datasets.qqqqq", {"weight": 1}, r"datasets.qqqqq: unknown reasoning-gym dataset; no close match"),
    ("reasoning_gym.datasets.chain_sum.weight", -1, r"datasets.chain_sum.weight=-1: weights must be >= 0"),
    ("reasoning_gym.datasets.chain_sum.weight", "heavy", r"datasets.chain_sum.weight='heavy': expected a number"),
    ("reasoning_gym.datasets.chain_sum.wieght", 1, r"datasets.chain_sum: unknown key\(s\) \['wieght'\]"),
    (
        "reasoning_gym.datasets.chain_sum.config",
        {"max_termz": 2},
        r"datasets.chain_sum.config=\{'max_termz': 2\}: .*max_termz.*accepts \[.*'max_terms'",
    ),
    (
        "reasoning_gym.datasets.chain_sum.config",
        {"min_terms": 0},
        r"datasets.chain_sum.config=\{'min_terms': 0\}: rejected by ChainSumConfig",
    ),
    (
        "reasoning_gym.developer_prompt",
        "DeepseekZero",
        r"developer_prompt='DeepseekZero': not in .*SYSTEM_PROMPTS.*did you mean 'DeepSeekZero'",
    ),
    ("reasoning_gym.dataset_size", 0, r"reasoning_gym.dataset_size=0: expected a positive int"),
    ("reasoning_gym.seed", 1, None),  # placeholder replaced below (val_seed case)
    ("actor_rollout_ref.model.path", None, r"actor_rollout_ref.model.path=None: set it to"),
    ("actor_rollout_ref.model.path", "/no/such/model", r"model.path='/no/such/model': no such directory"),
    ("actor_rollout_ref.model.path", "tiny://llama", r"model.path='tiny://llama': unknown built-in model"),
    (
        "reward.custom_reward_function.reward_kwargs.secondary_rewards",
        [{"name": "formatt"}],
        r"secondary_rewards\[0\].name='formatt' is not a reward.*did you mean 'format'",
    ),
    ("reward.custom_reward_function.reward_kwargs.tokenizer_path", None, r"cosine\) counts tokens: set"),
    ("reward.secondary_rewards", [{"name": "lenght"}], r"reward.secondary_rewards\[0\].name='lenght'"),
    (
        "curriculum.curricula",
        {"spell_backward": {"attribute_levels": {"*": 0}}},
        r"curricula.spell_backward: dataset 'spell_backward' is not in reasoning_gym.datasets",
    ),
    ("curriculum.curricula", {}, r"curriculum.enabled=true but curriculum.curricula is empty"),
    (
        "curriculum.curricula.knights_knaves.attribute_levels",
        {"n_peple": 0},
        r"attribute_levels=\{'n_peple': 0\}.*n_people \(levels 0..3\)",
    ),
    ("curriculum.curricula.knights_knaves.attribute_levels", {"n_people": 7}, r"Invalid level: 7"),
    ("curriculum.success_threshold", 0.05, r"need 0 <= failure_threshold < success_threshold"),
    ("data.dataloader_num_workers", 8, r"data.dataloader_num_workers=8 with curriculum.enabled=true"),
]
BAD[[b[0] for b in BAD].index("reasoning_gym.seed")] = (
    "reasoning_gym.val_seed",
    2,
    r"reasoning_gym.val_seed=2 with seed=1: val items would repeat train items",
)


@pytest.mark.parametrize(("key", "value", "message"), BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_bad_configs_name_the_key_and_the_fix(key, value, message):
    cfg = with_(key, value)
    with pytest.raises(ConfigError, match=message):
        check_run_config(cfg)
    with pytest.raises(ConfigError, match=message):
        check_run_config(OmegaConf.create(cfg))


def test_all_weights_zero():
    cfg = with_("reasoning_gym.datasets", {"chain_sum": {"weight": 0}, "gcd": {"weight": 0.0}})
    cfg["curriculum"]["enabled"] = False
    with pytest.raises(ConfigError, match=r"every weight is 0 \(\['chain_sum', 'gcd'\]\)"):
        check_run_config(cfg)


def test_curriculum_for_a_dataset_without_one():
    cfg = with_("reasoning_gym.datasets.gsm_symbolic", {"weight": 1})
    cfg["curriculum"]["curricula"] = {"gsm_symbolic": {"attribute_levels": {"*": 0}}}
    with pytest.raises(ConfigError, match="reasoning-gym has no curriculum for 'gsm_symbolic'"):
        check_run_config(cfg)


@pytest.mark.parametrize("module", [training.config_checks, training.data, training.rewards])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
