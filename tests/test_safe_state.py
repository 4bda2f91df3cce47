"""utils/checkpoint/safe_state.py: veRL's real trainer state passes the allow-list and round-trips; anything else is
refused without running. The states are built the way veRL 0.9.1 builds them (its RNG dict with numpy's and
Python's generators, an lr scheduler, StatefulDataLoader with and without workers), without importing veRL."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from utils.checkpoint.errors import CorruptShardError, UnsafePickleError
from utils.checkpoint.safe_state import load_trainer_state, rewrite_trainer_state


def _verl_extra_state() -> dict:
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    opt.step()
    sched.step()
    # verl/utils/checkpoint/checkpoint_manager.py: BaseCheckpointManager.get_rng_state
    rng = {"cpu": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
    return {"lr_scheduler": sched.state_dict(), "rng": rng}


def _dataloader_states() -> list[dict]:
    from torchdata.stateful_dataloader import StatefulDataLoader
    from torchdata.stateful_dataloader.sampler import RandomSampler

    out = []
    for workers in (0, 2):  # verl's create_rl_sampler: a seeded RandomSampler
        gen = torch.Generator()
        gen.manual_seed(1)
        dl = StatefulDataLoader(list(range(20)), batch_size=4, sampler=RandomSampler(list(range(20)), generator=gen),
                                num_workers=workers, collate_fn=lambda x: x)
        it = iter(dl)
        next(it)
        out.append(dl.state_dict())
        del it
    return out


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b) and a.dtype == b.dtype
    return a == b


def test_verls_real_trainer_state_round_trips(tmp_path):
    for i, state in enumerate([_verl_extra_state(), *_dataloader_states()]):
        src, dst = tmp_path / f"s{i}.pt", tmp_path / f"d{i}.pt"
        torch.save(state, src)
        assert _same(rewrite_trainer_state(src, dst), state)
        assert _same(torch.load(dst, weights_only=False), state)  # what veRL reads back
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_in_the_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    torch.save({"lr_scheduler": {}, "rng": {"numpy": _Payload(marker)}}, tmp_path / "evil.pt")
    with pytest.raises(UnsafePickleError) as err:
        rewrite_trainer_state(tmp_path / "evil.pt", tmp_path / "out.pt")
    assert "posix.system" in str(err.value) and "weights_only` set to `False" not in str(err.value)
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


def test_an_object_array_is_refused(tmp_path):
    torch.save({"rng": {"numpy": ("MT19937", np.array([1, "x"], dtype=object), 0, 0, 0.0)}}, tmp_path / "o.pt")
    with pytest.raises(UnsafePickleError):
        load_trainer_state(tmp_path / "o.pt")


def test_a_truncated_file_is_called_corrupt(tmp_path):
    torch.save(_verl_extra_state(), tmp_path / "x.pt")
    (tmp_path / "x.pt").write_bytes((tmp_path / "x.pt").read_bytes()[:100])
    with pytest.raises(CorruptShardError, match="truncated or corrupt"):
        load_trainer_state(tmp_path / "x.pt")
