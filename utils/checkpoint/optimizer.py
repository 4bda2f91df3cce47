"""Consolidate veRL's per-rank FSDP2 optimizer files into one name-keyed ``optimizer.pt``.

veRL saves ``optimizer.state_dict()`` per rank: state keyed by integer ids (the order of ``model.parameters()``),
``exp_avg``/``exp_avg_sq`` as DTensors sharded like their parameters, ``step`` as a 0-d tensor. We write torch's
*full* optimizer state dict layout, the one ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict(...,
full_state_dict=True)`` returns and ``set_optimizer_state_dict`` accepts at any world size::

    {"state": {"model.layers.0.mlp.up_proj.weight": {"step": t, "exp_avg": t, "exp_avg_sq": t}, ...},
     "param_groups": [{"lr": ..., "betas": ..., ..., "params": ["model.embed_tokens.weight", ...]}]}

The whole result is held in memory once for ``torch.save`` (a zip of pickles cannot be streamed cleanly); its
peak is the full optimizer state (~8 bytes per parameter for AdamW in fp32).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from utils.checkpoint.errors import CorruptShardError, FSDP1OptimizerError, OptimizerMismatchError
from utils.checkpoint.merge import MappedFiles, assemble, load_rank_file

__all__ = ["consolidate_optimizer"]

_FSDP1_HELP = ("FSDP1 keeps optimizer state per *flat parameter* (all of a wrapped module's parameters concatenated, "
               "padded, then split across ranks); torch saves no map from those flat slices back to parameter names, "
               "so it cannot be consolidated into a name-keyed optimizer.pt. Train with actor.strategy=fsdp2 to get a "
               "portable optimizer state, or consolidate without --optimizer.")


def load_optimizer_ranks(files: Sequence[Path], mapped: MappedFiles) -> list[dict[str, Any]]:
    """Each rank's optimizer state dict (memory-mapped, registered in ``mapped``), checked to be one."""
    out = []
    for f in files:
        sd = load_rank_file(f)
        mapped.register(f)
        if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
            raise CorruptShardError(f"{f}: expected an optimizer state dict with 'state' and 'param_groups'")
        out.append(sd)
    return out


def consolidate_optimizer(
    files: Sequence[Path],
    param_names: Sequence[str],
    param_shapes: dict[str, tuple[int, ...]],
    out_path: Path,
    *,
    fsdp_version: int | None = None,
) -> int:
    """Merge the per-rank optimizer files and write a name-keyed ``optimizer.pt``.

    Args:
        files: ``optim_world_size_W_rank_r.pt`` for r = 0..W-1.
        param_names: unique parameter names in ``model.parameters()`` order (id i -> ``param_names[i]``).
        param_shapes: full shape of every parameter, to cross-check each merged state tensor.
        out_path: where to write ``optimizer.pt``.
        fsdp_version: from ``fsdp_config.json``; 1 is refused up front.

    Returns:
        The size of the written file in bytes.

    Raises:
        FSDP1OptimizerError: FSDP1 flat-parameter state.
        OptimizerMismatchError: ids, count or shapes do not line up with the model's parameters.
        CorruptShardError, UnsupportedPlacementError, ReplicaMismatchError: see :mod:`utils.checkpoint.merge`.

    Example:
        >>> consolidate_optimizer(layout.optim_files, expected.param_names, expected.shapes,  # doctest: +SKIP
        ...                       out / "optimizer.pt", fsdp_version=layout.fsdp_version)
    """
    if fsdp_version == 1:
        raise FSDP1OptimizerError(f"{files[0].parent}/fsdp_config.json says FSDP_version=1. {_FSDP1_HELP}")
    mapped = MappedFiles()
    ranks = load_optimizer_ranks(files, mapped)
    groups = ranks[0]["param_groups"]
    ids = [i for g in groups for i in g["params"]]
    if sorted(ids) != list(range(len(param_names))):
        raise OptimizerMismatchError(
            f"{files[0]}: param_groups hold {len(ids)} parameter ids, the model config has {len(param_names)} "
            "parameters; the optimizer does not belong to this model (or trains only part of it).")
    state: dict[str, dict[str, Any]] = {}
    for pid in sorted(ranks[0]["state"]):
        name = param_names[pid]
        entry = {}
        for k, v in ranks[0]["state"][pid].items():
            if not isinstance(v, torch.Tensor):
                entry[k] = v
                continue
            label = f"optimizer state[{pid}] ({name}).{k}"
            if not isinstance(v, DTensor) and v.ndim > 0 and tuple(v.shape) != param_shapes[name]:
                raise FSDP1OptimizerError(
                    f"{label} in {files[0]} is a plain tensor of shape {tuple(v.shape)}, not {param_shapes[name]}: a "
                    f"flat-parameter shard. {_FSDP1_HELP}")
            try:
                values = [r["state"][pid][k] for r in ranks]
            except KeyError as e:
                raise OptimizerMismatchError(f"{label}: missing on some ranks; the files are not one save") from e
            t = assemble(label, values, files, release=mapped.release)
            if t.ndim > 0 and tuple(t.shape) != param_shapes[name]:
                raise OptimizerMismatchError(
                    f"{label}: merged shape {tuple(t.shape)} differs from the parameter's {param_shapes[name]}; the "
                    "parameter order of the optimizer does not match the model config.")
            entry[k] = t
        state[name] = entry
    full_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [param_names[i] for i in g["params"]]}
                   for g in groups]
    torch.save({"state": state, "param_groups": full_groups}, out_path)
    return out_path.stat().st_size
