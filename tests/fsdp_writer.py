"""Write real veRL-layout FSDP2 checkpoints from real gloo processes, plus independent ground truth.

    python -m tests.fsdp_writer OUT_ROOT --world-size 3 [--tied] [--hsdp 2x2] [--legacy] [--plain]
                                [--preset tiny|medium] [--config-dtype float32|bfloat16] [--steps 2]
                                [--lora R:ALPHA] [--lora-only] [--no-lora-meta]

Each of W spawned processes joins a gloo group, builds the same randomly initialised ``Qwen2ForCausalLM``
(dimensions chosen so that no sharded dim divides evenly by 2, 3 or 4 everywhere), shards it with FSDP2
(``fully_shard`` per decoder layer and on the root, over ``init_device_mesh("cpu", ...)``), takes a couple of AdamW
steps on rank-dependent data, and then saves exactly what veRL 0.9.1's FSDP checkpoint manager saves:

    OUT_ROOT/latest_checkpointed_iteration.txt
    OUT_ROOT/global_step_N/data.pt
    OUT_ROOT/global_step_N/actor/{model,optim,extra_state}_world_size_{W}_rank_{r}.pt
    OUT_ROOT/global_step_N/actor/fsdp_config.json          (not with --legacy: older veRL did not write it)
    OUT_ROOT/global_step_N/actor/huggingface/              (config, generation_config, tokenizer, chat template)

The ground truth, gathered in the writer processes with torch's own collectives (``get_model_state_dict`` and
``get_optimizer_state_dict`` with ``full_state_dict=True``), goes to ``OUT_ROOT/ground_truth.pt`` - outside the
checkpoint, and computed without any code of the engine under test.

``--lora R:ALPHA`` wraps the model with PEFT first, exactly as veRL 0.9.1's FSDP engine does for ``lora_rank > 0``
(``get_peft_model(LoraConfig(task_type=CAUSAL_LM, r, lora_alpha, target_modules="all-linear", bias="none"))``, then
FSDP2, AdamW over all parameters, frozen ones included), writes veRL's ``lora_train_meta.json`` (unless
``--no-lora-meta``), and the ground truth also holds PEFT's own results on the gathered model: ``merged``
(``merge_and_unload().state_dict()``) and ``adapter`` (``get_peft_model_state_dict``). ``--lora-only`` saves only the
``lora_`` tensors (veRL's ``checkpoint.save_lora_only``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

PRESETS = {
    # Sharded dims 101, 35, 37, 32, 16: uneven for W = 2, 3 and 4 (and some even ones, too).
    "tiny": dict(vocab_size=101, hidden_size=35, head_dim=8, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=37, num_hidden_layers=2),
    # ~26M parameters (~106 MB fp32) over 8 layers, largest tensor 8 MB: a peak-RSS bound far below the
    # checkpoint size is meaningful, and it still takes seconds to write.
    "medium": dict(vocab_size=4001, hidden_size=515, head_dim=64, num_attention_heads=8, num_key_value_heads=2,
                   intermediate_size=1379, num_hidden_layers=8),
}


@dataclass(frozen=True)
class WrittenCheckpoint:
    """Where a written checkpoint lives. ``actor_dir`` is what the engine consumes; the rest is ground truth."""

    root: Path
    step: int
    world_size: int
    tied: bool

    @property
    def step_dir(self) -> Path:
        return self.root / f"global_step_{self.step}"

    @property
    def actor_dir(self) -> Path:
        return self.step_dir / "actor"

    @property
    def ground_truth_path(self) -> Path:
        return self.root / "ground_truth.pt"


def write_checkpoint(
    out_root: Path,
    *,
    world_size: int,
    tied: bool,
    hsdp: tuple[int, int] | None = None,
    legacy: bool = False,
    plain: bool = False,
    preset: str = "tiny",
    config_dtype: str = "float32",
    steps: int = 2,
    lora: tuple[int, float] | None = None,
    lora_only: bool = False,
    lora_meta: bool = True,
) -> WrittenCheckpoint:
    """Run the writer's W ranks (fresh processes: gloo state never leaks into the caller) and return its paths."""
    argv = [str(out_root), "--world-size", str(world_size), "--preset", preset, "--config-dtype", config_dtype,
            "--steps", str(steps)]
    argv += ["--tied"] if tied else []
    argv += ["--hsdp", f"{hsdp[0]}x{hsdp[1]}"] if hsdp else []
    argv += ["--legacy"] if legacy else []
    argv += ["--plain"] if plain else []
    argv += ["--lora", f"{lora[0]}:{lora[1]}"] if lora else []
    argv += ["--lora-only"] if lora_only else []
    argv += [] if lora_meta else ["--no-lora-meta"]
    args = _parse(argv)
    try:
        _start_ranks(_worker, args)
    except Exception as e:  # noqa: BLE001 - retried once, then re-raised
        if "terminated with signal" not in str(e):
            raise
        # Seen once in ~30 runs on a loaded 2-core box: a gloo worker died with SIGSEGV (not reproducible alone).
        # The checkpoint is rewritten from scratch, so a retry cannot hide a wrong result; a second crash fails.
        shutil.rmtree(out_root, ignore_errors=True)
        _start_ranks(_worker, args)
    return WrittenCheckpoint(root=Path(out_root), step=steps, world_size=world_size, tied=tied)


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer with exactly ``vocab_size`` entries and a chat template, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<|im_start|>", "<|im_end|>"]
    words = [f"w{i}" for i in range(vocab_size - len(specials))]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    return fast


def _model_config(preset: str, tied: bool, config_dtype: str):
    from transformers import Qwen2Config

    config = Qwen2Config(**PRESETS[preset], tie_word_embeddings=tied, max_position_embeddings=64,
                         bos_token_id=2, eos_token_id=1, pad_token_id=0)
    config.architectures = ["Qwen2ForCausalLM"]
    config.dtype = config_dtype
    return config


def _save_huggingface_dir(hf_dir: Path, config) -> None:
    from transformers import GenerationConfig

    hf_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(hf_dir)
    # An eos *list* and sampling defaults: the details merged models lose elsewhere (verl #1246, #7198).
    GenerationConfig(bos_token_id=2, eos_token_id=[1, 5], pad_token_id=0, do_sample=True, temperature=0.7,
                     top_p=0.8, top_k=20, repetition_penalty=1.05).save_pretrained(hf_dir)
    build_tokenizer(config.vocab_size).save_pretrained(hf_dir)


def _worker(rank: int, args: argparse.Namespace, init_file: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import Qwen2ForCausalLM

    world = args.world_size
    _rank_setup()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(1234)  # same initial weights on every rank, as veRL does by loading one HF model
    config = _model_config(args.preset, args.tied, args.config_dtype)
    model = Qwen2ForCausalLM(config).float()
    if args.lora:
        model = _peft_wrap(model, args.lora)
    if args.hsdp:
        mesh = init_device_mesh("cpu", args.hsdp, mesh_dim_names=("ddp", "fsdp"))
    else:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    layers = model.base_model.model.model.layers if args.lora else model.model.layers
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    optim = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0 / (1 + s))
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(args.steps):
        ids = torch.randint(0, config.vocab_size, (2, 9), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        optim.step()
        sched.step()
        optim.zero_grad()

    step_dir = Path(args.out_root) / f"global_step_{args.steps}"
    actor = step_dir / "actor"
    actor.mkdir(parents=True, exist_ok=True)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full_model = get_model_state_dict(model, options=opts)  # collectives: every rank calls them
    full_optim = get_optimizer_state_dict(model, optim, options=opts)

    model_sd, optim_sd = model.state_dict(), optim.state_dict()
    if args.lora_only:  # veRL's save_lora_only filter
        model_sd = {k: v for k, v in model_sd.items() if "lora_" in k}
    if args.plain:  # what old veRL wrote at W=1 (verl #903): plain tensors, no DTensor
        assert world == 1, "--plain is the W=1 legacy layout"
        model_sd = {k: v.full_tensor().clone() for k, v in model_sd.items()}
        for st in optim_sd["state"].values():
            for k, v in st.items():
                if hasattr(v, "to_local"):
                    st[k] = v.to_local().clone()
    torch.save(model_sd, actor / f"model_world_size_{world}_rank_{rank}.pt")
    torch.save(optim_sd, actor / f"optim_world_size_{world}_rank_{rank}.pt")
    rng = {"cpu": torch.get_rng_state(), "numpy": None, "random": None}
    torch.save({"lr_scheduler": sched.state_dict(), "rng": rng},
               actor / f"extra_state_world_size_{world}_rank_{rank}.pt")
    if rank == 0:
        if not args.legacy:
            (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": world}, indent=4))
        _save_huggingface_dir(actor / "huggingface", config)
        torch.save({"dataloader": {}}, step_dir / "data.pt")
        (Path(args.out_root) / "latest_checkpointed_iteration.txt").write_text(str(args.steps))
        truth = {"model": full_model, "optim": full_optim, "config": config.to_dict()}
        if args.lora:
            r, alpha = args.lora
            if not args.no_lora_meta:  # what FSDPCheckpointManager._save_lora_train_meta writes (alpha as int)
                (actor / "lora_train_meta.json").write_text(json.dumps(
                    {"r": r, "lora_alpha": int(alpha), "task_type": "CAUSAL_LM"}, indent=4))
            truth["lora"] = _peft_truth(config, args.lora, full_model)
        torch.save(truth, Path(args.out_root) / "ground_truth.pt")
    dist.barrier()
    dist.destroy_process_group()


def _peft_wrap(model, lora: tuple[int, float]):
    """veRL 0.9.1's ``FSDPEngine._build_lora_module`` (no pre-trained adapter path)."""
    from peft import LoraConfig, TaskType, get_peft_model

    r, alpha = lora
    return get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=r, lora_alpha=alpha,
                                            target_modules="all-linear", bias="none"))


def _peft_truth(config, lora: tuple[int, float], full_model: dict) -> dict:
    """PEFT's own adapter state dict and merge of the gathered model (no engine code involved)."""
    import torch
    from peft.utils import get_peft_model_state_dict
    from transformers import Qwen2ForCausalLM

    peft_model = _peft_wrap(Qwen2ForCausalLM(config).float(), lora)
    missing, unexpected = peft_model.load_state_dict(full_model, strict=False)
    assert not unexpected and not [k for k in missing if "lm_head" not in k], (missing, unexpected)
    adapter = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    base = {k: v.clone() for k, v in peft_model.get_base_model().state_dict().items() if "lora_" not in k}
    with torch.no_grad():
        merged = peft_model.merge_and_unload().state_dict()
    return {"r": lora[0], "lora_alpha": lora[1], "adapter": adapter, "merged": dict(merged),
            "base_names": sorted(base)}


def _load_optimizer_worker(rank: int, args: argparse.Namespace, init_file: str) -> None:
    """Resume-at-another-world-size check: load the consolidated model and optimizer.pt into FSDP2 at W'."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    world = args.world_size
    _rank_setup()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = AutoModelForCausalLM.from_pretrained(args.load_optimizer, dtype=torch.float32)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    # As in veRL's resume: the scheduler exists before the state is loaded (it adds 'initial_lr' to param_groups,
    # which the saved groups carry too; torch's loader matches group keys exactly).
    torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0 / (1 + s))
    full = torch.load(Path(args.load_optimizer) / "optimizer.pt", weights_only=True)
    set_optimizer_state_dict(model, optim, optim_state_dict=full, options=StateDictOptions(full_state_dict=True))
    back = get_optimizer_state_dict(model, optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    local = {k: v.to_local().shape for k, v in optim.state_dict()["state"][0].items() if hasattr(v, "to_local")}
    if rank == 0:
        torch.save({"roundtrip": back, "local_shapes_rank0": local}, args.out_root)
    dist.barrier()
    dist.destroy_process_group()


def load_optimizer_at_world_size(consolidated_dir: Path, world_size: int, result_path: Path) -> dict:
    """In W' fresh gloo processes: ``set_optimizer_state_dict(full_state_dict=True)`` from ``optimizer.pt``, then
    gather it back with ``get_optimizer_state_dict``. Returns ``{"roundtrip": full state, "local_shapes_rank0"}``."""
    _start_ranks(_load_optimizer_worker, _parse([str(result_path), "--world-size", str(world_size),
                                                 "--load-optimizer", str(consolidated_dir)]))
    import torch

    return torch.load(result_path, weights_only=True)


# The ranks are forked from one forkserver per calling process that has imported torch, transformers' Qwen2 and peft
# once (~10 s of CPU per process on 2 cores): with spawn every rank of every case paid it again. The server is a fresh
# interpreter (not a fork of pytest), so the ranks inherit no state of the caller.
_PRELOAD = ["torch.distributed.fsdp", "torch.distributed.checkpoint.state_dict", "torch.distributed.tensor",
            "transformers.models.qwen2.modeling_qwen2", "peft", "tests.fsdp_writer"]


def _rank_setup() -> None:
    """One intra-op thread per rank (W ranks share 2 cores), and a traceback if a rank crashes in C code."""
    import faulthandler

    import torch

    torch.set_num_threads(1)
    faulthandler.enable()


def _start_ranks(worker, args: argparse.Namespace) -> None:
    """Run ``worker(rank, args, init_file)`` in W processes; raises if any rank fails (torch's ProcessRaisedException
    / ProcessExitedException name the rank and carry its traceback)."""
    import multiprocessing

    import torch.multiprocessing as mp

    if not args.load_optimizer:
        Path(args.out_root).mkdir(parents=True, exist_ok=True)
    # (run as `python -m tests.fsdp_writer`, this module is __main__: the server must not import it a second time)
    multiprocessing.set_forkserver_preload(_PRELOAD if __name__ != "__main__" else _PRELOAD[:-1])
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(args, os.path.join(tmp, "init")), nprocs=args.world_size,
                           start_method="forkserver")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_root")
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--tied", action="store_true")
    p.add_argument("--hsdp", type=lambda s: tuple(int(x) for x in s.split("x")), default=None)
    p.add_argument("--legacy", action="store_true", help="omit fsdp_config.json (veRL before mid-2025)")
    p.add_argument("--plain", action="store_true", help="W=1 only: plain tensors instead of DTensors")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--config-dtype", default="float32")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--lora", type=lambda s: (int(s.split(":")[0]), float(s.split(":")[1])), default=None,
                   metavar="R:ALPHA", help="train PEFT LoRA adapters (veRL's lora_rank/lora_alpha)")
    p.add_argument("--lora-only", action="store_true", help="save only the lora_ tensors (save_lora_only)")
    p.add_argument("--no-lora-meta", action="store_true", help="do not write lora_train_meta.json")
    p.add_argument("--load-optimizer", default=None, metavar="CONSOLIDATED_DIR",
                   help="instead of writing: load CONSOLIDATED_DIR/optimizer.pt at --world-size, save to OUT_ROOT")
    args = p.parse_args(argv)
    if args.hsdp and args.hsdp[0] * args.hsdp[1] != args.world_size:
        p.error("--hsdp RxS needs R*S == --world-size")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    _start_ranks(_load_optimizer_worker if args.load_optimizer else _worker, args)


if __name__ == "__main__":
    main()
