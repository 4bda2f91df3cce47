"""Write veRL's own FSDP2 checkpoint layout, for any world size, from a consolidated model + ``optimizer.pt``.

The inverse of :mod:`utils.load_fsdp_to_hf`: a resume snapshot (see :mod:`utils.hub.resume_state`) becomes exactly what
veRL 0.9.1's ``FSDPCheckpointManager.load_checkpoint`` reads on each rank, at the *current* world size W::

    RUN_DIR/global_step_N/actor/model_world_size_W_rank_r.pt        {name: DTensor Shard(0) on a 1-D ('fsdp',) mesh}
    RUN_DIR/global_step_N/actor/optim_world_size_W_rank_r.pt        optimizer.state_dict(): ids in parameters() order,
                                                                    exp_avg/exp_avg_sq sharded like their parameter
    RUN_DIR/global_step_N/actor/extra_state_world_size_W_rank_r.pt  {"lr_scheduler": ..., "rng": ...} (validated and
                                                                    re-serialized: utils.checkpoint.safe_state)
    RUN_DIR/global_step_N/actor/fsdp_config.json, actor/huggingface/  (config, generation config, tokenizer)
    RUN_DIR/global_step_N/data.pt, curriculum_state.json, lineage.json
    RUN_DIR/latest_checkpointed_iteration.txt                        written last

DTensors need a process group, so W gloo processes are spawned (as veRL's own ranks would be); each reads the
consolidated files and writes its own three files. Each rank reads only its own rows (``safe_open().get_slice``
or a memory-mapped ``.bin``/``optimizer.pt``), cut by torch's ``Shard(0)`` rule (``torch.chunk``, which FSDP2's
state dicts use) and wrapped with ``DTensor.from_local``: no tensor travels between processes and a rank's memory
peak is its shard.

RNG and lr scheduler: every rank's scheduler is the same, so rank 0's is used everywhere. RNG states are per rank:
at the saved world size each rank gets its own; at another world size every rank gets rank 0's (there is no
meaningful map from W to W' generators; sampling stays seeded, it just does not replay the old per-rank streams).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from utils.checkpoint.errors import OptimizerMismatchError, ReshardError
from utils.checkpoint.model_config import ExpectedModel, load_expected_model
from utils.checkpoint.safe_state import check_weights_pickle, rewrite_trainer_state
from utils.checkpoint.tempdirs import make_owned_temp_dir, remove_owned, sweep_stale, write_text_atomic
from utils.hub.resume_state import CURRICULUM_FILE, LINEAGE_FILE, RESUME_DIR

__all__ = ["write_verl_checkpoint", "ReshardError", "ConsolidatedWeights", "shard_rows"]

logger = logging.getLogger(__name__)

# Files of a consolidated folder that are not side files of veRL's actor/huggingface/ folder.
_NOT_SIDE_FILES = ("pytorch_model", "model.safetensors", "model-", "optimizer.pt", "README.md", "trainer_state.json",
                   "adapter_")


class ConsolidatedWeights:
    """Read rows of the tensors of a consolidated folder (bin or safetensors, sharded or not) without loading it.

    Each rank reads only its own rows: safetensors through ``safe_open(...).get_slice`` (reads just those bytes),
    ``.bin`` through a memory-mapped ``torch.load`` (only the touched pages are read). Peak memory per rank is its
    shard, not the model.

    Raises:
        ReshardError: no weight files in ``folder``.
    """

    def __init__(self, folder: Path):
        import torch
        from safetensors import safe_open

        folder = Path(folder)
        self._st: dict[str, Any] = {}
        self._bin: dict[str, Any] = {}
        self._handles = []
        for f in sorted(folder.glob("model*.safetensors")):
            h = safe_open(str(f), framework="pt")
            self._handles.append(h)
            self._st.update({k: h for k in h.keys()})  # noqa: SIM118 - safe_open is not a Mapping
        for f in sorted(folder.glob("pytorch_model*.bin")):
            self._bin.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        if not self._st and not self._bin:
            raise ReshardError(f"{folder} holds no model weights (pytorch_model*.bin or model*.safetensors)")

    def __contains__(self, key: str) -> bool:
        return key in self._st or key in self._bin

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._st[key].get_slice(key).get_shape()) if key in self._st else tuple(self._bin[key].shape)

    def rows(self, key: str, start: int, stop: int) -> Any:
        """``tensor[start:stop]`` as a fresh tensor (0-d tensors: the value)."""
        if key in self._st:
            sl = self._st[key].get_slice(key)
            return sl[:] if not sl.get_shape() else sl[start:stop]
        t = self._bin[key]
        return (t[start:stop] if t.ndim else t).clone()


def shard_rows(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of rank ``rank`` under ``Shard(0)``: torch.chunk's rule (ceil-sized chunks, the last
    ones short or empty), which DTensor and FSDP2's state dicts use.

    Example:
        >>> [shard_rows(10, 4, r) for r in range(4)], shard_rows(2, 3, 2)
        ([(0, 3), (3, 6), (6, 9), (9, 10)], (2, 2))
    """
    size = -(-n // world_size)
    start = min(rank * size, n)
    return start, min(start + size, n)


def write_verl_checkpoint(
    snapshot_dir: str | Path,
    run_dir: str | Path,
    world_size: int,
    *,
    step: int,
    weights_only: bool = False,
    base_model: str | Path | None = None,
) -> Path:
    """Reshard a consolidated snapshot into veRL's checkpoint layout for ``world_size`` under ``run_dir``.

    Args:
        snapshot_dir: Consolidated folder: config/tokenizer, weights, ``optimizer.pt``, ``resume/`` (from
            :func:`utils.hub.resume_state.stage_resume_files`).
        run_dir: veRL's ``trainer.default_local_dir``; ``global_step_{step}`` is created inside it.
        world_size: The world size of the run that will load it (``n_gpus_per_node * nnodes``).
        step: The global step the snapshot was saved at.
        weights_only: Write only the model shards (no optimizer/extra state); veRL must then be told to load only
            the model (``actor.checkpoint.load_contents=[model]``).
        base_model: for a LoRA snapshot (a PEFT adapter, see :mod:`utils.checkpoint.reshard_lora`): a local folder
            with the base model's ``config.json`` (the run's ``actor_rollout_ref.model.path``); the shards hold the
            adapters only, as veRL's ``save_lora_only`` writes them, and the base weights come from the model path.

    Returns:
        The ``global_step_{step}`` directory.

    Raises:
        ReshardError: ``global_step_{step}`` already exists in ``run_dir``, or the snapshot lacks a required file.
        OptimizerMismatchError: ``optimizer.pt`` names parameters the model does not have (or misses some).

    Note:
        The ranks are started with ``spawn``, which re-imports the caller's ``__main__``: call this from a script
        under ``if __name__ == "__main__":`` (the CLI and ``train_grpo.py`` are).

    Example:
        >>> write_verl_checkpoint("snap/exp-a", "checkpoints/run", world_size=8, step=300)  # doctest: +SKIP
        PosixPath('checkpoints/run/global_step_300')
    """
    import torch.multiprocessing as mp

    snapshot_dir, run_dir = Path(snapshot_dir).resolve(), Path(run_dir).resolve()
    if world_size < 1:
        raise ReshardError(f"world_size must be >= 1, got {world_size}")
    target = run_dir / f"global_step_{step}"
    if target.exists():
        raise ReshardError(f"{target} already exists; remove it, or point --out / trainer.default_local_dir at an "
                           "empty directory.")
    from utils.checkpoint.reshard_lora import check_lora_optimizer, find_adapter, lora_rank_worker, peft_parameters

    adapter = find_adapter(snapshot_dir)
    if adapter is not None and (base_model is None or not (Path(base_model) / "config.json").is_file()):
        raise ReshardError(f"{snapshot_dir} is a LoRA snapshot (an adapter without base weights): pass base_model, a "
                           f"folder with the base model's config.json (got {base_model}).")
    config_dir = Path(base_model) if adapter is not None else snapshot_dir
    required = ["config.json"] + ([] if weights_only else ["optimizer.pt", f"{RESUME_DIR}/extra_state_rank_0.pt"])
    required = required[1:] if adapter is not None else required
    missing = [r for r in required if not (snapshot_dir / r).is_file()]
    if missing:
        raise ReshardError(f"{snapshot_dir} lacks {', '.join(missing)}: it is not a resume snapshot "
                           "(uploaded with hf_upload.strategy=checkpoint).")
    saved_ws = len(list((snapshot_dir / RESUME_DIR).glob("extra_state_rank_*.pt")))
    if not weights_only and saved_ws != world_size:
        logger.warning("Resharding from world size %d to %d: every rank gets rank 0's RNG state (the lr scheduler "
                       "is the same on all ranks).", saved_ws, world_size)
    run_dir.mkdir(parents=True, exist_ok=True)
    sweep_stale(run_dir, ".global_step_")  # a pull killed mid-way left its staging folder: ours and stale
    staging = make_owned_temp_dir(run_dir, f".global_step_{step}.")  # same filesystem: atomic rename
    try:
        actor = staging / "actor"
        actor.mkdir()
        # Built once here (transformers on the meta device), handed to the ranks: they import torch only.
        # Every pickle the ranks will read is opened here first (weights_only=True): a refused or broken file is
        # reported by name, not as a bare ProcessRaisedException from a spawned rank.
        for f in sorted(snapshot_dir.glob("pytorch_model*.bin")):
            check_weights_pickle(f, what="model weights")
        if adapter is not None:
            params = peft_parameters(config_dir, adapter.config)
            if not weights_only:
                check_weights_pickle(snapshot_dir / "optimizer.pt", what="optimizer state")
                check_lora_optimizer(snapshot_dir, adapter, params)
            worker, args = lora_rank_worker, (str(adapter.folder), params, weights_only)
        else:
            expected = load_expected_model(snapshot_dir)
            _check_optimizer_names(snapshot_dir, expected, weights_only)
            worker, args = _rank_worker, (weights_only, expected)
        # veRL unpickles these with weights_only=False: only validated, re-serialized state (before any rank starts)
        if not weights_only:
            for rank in range(world_size):
                src = snapshot_dir / RESUME_DIR / f"extra_state_rank_{rank if saved_ws == world_size else 0}.pt"
                rewrite_trainer_state(src, actor / f"extra_state_world_size_{world_size}_rank_{rank}.pt",
                                      what="veRL's extra state")
        if (snapshot_dir / RESUME_DIR / "data.pt").is_file():
            rewrite_trainer_state(snapshot_dir / RESUME_DIR / "data.pt", staging / "data.pt",
                                  what="veRL's dataloader state")
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(worker, args=(world_size, str(snapshot_dir), str(actor), *args,
                                             os.path.join(tmp, "init")),
                               nprocs=world_size, start_method="spawn")
        (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": world_size}, indent=4))
        hf = actor / "huggingface"
        hf.mkdir()
        for f in sorted(snapshot_dir.iterdir()):
            if f.is_file() and not f.name.startswith(_NOT_SIDE_FILES):
                shutil.copyfile(f, hf / f.name)
        if adapter is not None:  # the adapter folder has no config.json: the base model's, as veRL saves it
            shutil.copyfile(config_dir / "config.json", hf / "config.json")
            from utils.checkpoint.reshard_lora import write_lora_meta

            write_lora_meta(actor, adapter)
        for name in (CURRICULUM_FILE, LINEAGE_FILE):  # JSON; data.pt was validated and re-serialized above
            if (snapshot_dir / RESUME_DIR / name).is_file():
                shutil.copyfile(snapshot_dir / RESUME_DIR / name, staging / name)
        os.replace(staging, target)
        remove_owned(staging)  # only its owner record is left at the old name
    except BaseException:
        remove_owned(staging)
        raise
    write_text_atomic(run_dir / "latest_checkpointed_iteration.txt", str(step))
    logger.info("Wrote veRL checkpoint %s for world size %d", target, world_size)
    return target


def _check_optimizer_names(snapshot_dir: Path, expected: ExpectedModel, weights_only: bool) -> None:
    """Fail in the parent, with names, before W processes start: optimizer.pt must cover exactly the parameters."""
    if weights_only:
        return
    import torch

    check_weights_pickle(snapshot_dir / "optimizer.pt", what="optimizer state")
    full = torch.load(snapshot_dir / "optimizer.pt", map_location="cpu", weights_only=True, mmap=True)
    names = [n for g in full["param_groups"] for n in g["params"]]
    extra, missing = sorted(set(names) - set(expected.param_names)), sorted(set(expected.param_names) - set(names))
    if extra or missing:
        raise OptimizerMismatchError(
            f"{snapshot_dir / 'optimizer.pt'} does not match the model of {snapshot_dir / 'config.json'}: parameters "
            f"only in the optimizer {extra[:5]}, only in the model {missing[:5]}.")


def _rank_worker(rank: int, world_size: int, snapshot_dir: str, actor_dir: str, weights_only: bool,
                 expected: ExpectedModel, init_file: str) -> None:
    """One rank: join the gloo group, cut this rank's slices, write veRL's three per-rank files."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        snap, actor = Path(snapshot_dir), Path(actor_dir)
        # veRL's FSDP2 mesh on one node: 1-D, named 'fsdp', on the device type of the ranks ("cpu" here; a GPU run
        # unpickles the mesh with its own device type when it loads, as it does for its own files).
        mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("fsdp",))

        def local(rows: torch.Tensor, full_shape: tuple[int, ...]) -> Any:
            """This rank's rows as a DTensor: no communication, and a compact storage (a view would make
            torch.save write the whole underlying tensor into every rank file)."""
            rows = rows.float() if rows.is_floating_point() else rows  # veRL's FSDP2 masters are fp32
            rows = rows.contiguous().clone()
            full = torch.Size(full_shape)
            stride = torch.empty(full, device="meta").stride()
            return DTensor.from_local(rows, mesh, [Shard(0)], run_check=False, shape=full, stride=stride)

        weights = ConsolidatedWeights(snap)
        model_sd: dict[str, Any] = {}
        for key in expected.shapes:  # model.state_dict() order, tied aliases included (one DTensor, two names)
            if key in expected.aliases and expected.aliases[key] in model_sd:
                model_sd[key] = model_sd[expected.aliases[key]]
                continue
            source = key if key in weights else expected.aliases.get(key, key)
            if source not in weights:
                raise ReshardError(f"{snap}: weight '{key}' is missing from the consolidated files")
            shape = weights.shape(source)
            if shape != expected.shapes[key]:
                raise ReshardError(f"{snap}: weight '{key}' has shape {shape}, config.json says {expected.shapes[key]}")
            model_sd[key] = local(weights.rows(source, *shard_rows(shape[0], world_size, rank)), shape)
        torch.save(model_sd, actor / f"model_world_size_{world_size}_rank_{rank}.pt")
        del model_sd, weights
        if weights_only:
            return
        full = torch.load(snap / "optimizer.pt", map_location="cpu", weights_only=True, mmap=True)
        ids = {name: i for i, name in enumerate(expected.param_names)}  # torch numbers params in parameters() order
        state = {}
        for name, entry in full["state"].items():
            state[ids[name]] = {
                k: local(v[slice(*shard_rows(v.shape[0], world_size, rank))], tuple(v.shape))
                if isinstance(v, torch.Tensor) and v.ndim > 0 else (v.clone() if isinstance(v, torch.Tensor) else v)
                for k, v in entry.items()}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [ids[n] for n in g["params"]]}
                  for g in full["param_groups"]]
        torch.save({"state": dict(sorted(state.items())), "param_groups": groups},
                   actor / f"optim_world_size_{world_size}_rank_{rank}.pt")
    finally:
        dist.barrier()
        dist.destroy_process_group()
