"""LoRA checkpoints written by veRL 0.9.1 (``actor_rollout_ref.model.lora_rank > 0``): detect them, and consolidate
them into a PEFT adapter folder, a merged Hugging Face model, or both.

What veRL saves for a LoRA run (FSDP2, PEFT's ``get_peft_model`` around the Hugging Face model)::

    actor/model_world_size_W_rank_r.pt   the PeftModel's state dict, DTensor Shard(0) per tensor:
        base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight       frozen base weight  (out, in)
        base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight   A                   (r, in)
        base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight   B                   (out, r)
        base_model.model.model.embed_tokens.weight, ...                          modules without adapters
      (with ``checkpoint.save_lora_only=true`` only the ``lora_`` entries)
    actor/optim_world_size_W_rank_r.pt    AdamW over ``model.parameters()`` (frozen ones included, without state)
    actor/lora_train_meta.json            {"r": 8, "lora_alpha": 16, "task_type": "CAUSAL_LM"}  (rank 0)

The merged weight of an adapted module is PEFT's own formula (``LoraLayer.get_delta_weight``, plain LoRA: no
rsLoRA, no DoRA, ``fan_in_fan_out=False`` as veRL configures it), computed in fp32 before the one final cast::

    W' = W + (B @ A) * (lora_alpha / r)

The adapter folder is what ``peft.PeftModel.from_pretrained(base, folder)`` reads: ``adapter_config.json`` and
``adapter_model.safetensors`` with PEFT's key names (the adapter name dropped: ``...q_proj.lora_A.weight``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from utils.checkpoint.errors import CheckpointError, MissingKeyError, OptimizerMismatchError
from utils.checkpoint.merge import MappedFiles, RankShards, TensorSpec, assemble
from utils.checkpoint.optimizer import load_optimizer_ranks

__all__ = [
    "LORA_MODES",
    "LORA_META_FILE",
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "LoraError",
    "LoraMetadataError",
    "LoraLayout",
    "is_lora_checkpoint",
    "read_lora_layout",
    "merge_lora_weight",
    "MergedLoraShards",
    "write_adapter",
    "consolidate_lora_optimizer",
]

logger = logging.getLogger(__name__)

LORA_MODES = ("adapter", "merged", "both")
LORA_META_FILE = "lora_train_meta.json"  # veRL's FSDPCheckpointManager._save_lora_train_meta
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM -> LoraModel -> the Hugging Face model
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.(?P<adapter>[^.]+)\.weight$")
_UNSUPPORTED = re.compile(r"\.(lora_embedding_[AB]|lora_magnitude_vector|lora_bias)\b")


class LoraError(CheckpointError, ValueError):
    """A LoRA checkpoint that cannot be consolidated as asked (unsupported adapter kind, adapters only, ...)."""


class LoraMetadataError(LoraError):
    """The rank or alpha of a LoRA checkpoint cannot be determined, or sources disagree; never guessed."""


@dataclass(frozen=True)
class LoraLayout:
    """What a LoRA checkpoint holds, from its keys and ``lora_train_meta.json``.

    Attributes:
        r: the LoRA rank. lora_alpha: the scaling numerator (scaling = ``lora_alpha / r``).
        adapter_name: PEFT's adapter name in the keys (veRL: ``default``).
        modules: Hugging Face module name (``model.layers.0.self_attn.q_proj``) -> (A key, B key) in the checkpoint.
        base_keys: Hugging Face weight name -> checkpoint key, for every non-LoRA tensor the checkpoint holds.
        target_modules: what ``adapter_config.json`` lists: leaf names (``q_proj``) where every module of that name
            is adapted, full module names otherwise.
        lora_only: the checkpoint holds adapters only (``checkpoint.save_lora_only``): no base weights.
        task_type: PEFT task type (``CAUSAL_LM``).
    """

    r: int
    lora_alpha: float
    adapter_name: str
    modules: dict[str, tuple[str, str]]
    base_keys: dict[str, str]
    target_modules: list[str]
    lora_only: bool
    task_type: str = "CAUSAL_LM"

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    @property
    def lora_keys(self) -> list[str]:
        """The trainable tensors' checkpoint keys (A then B per module, in checkpoint order of the modules)."""
        return [k for a, b in self.modules.values() for k in (a, b)]

    def summary(self) -> dict[str, Any]:
        """JSON-ready facts for results, model cards and logs."""
        return {"r": self.r, "lora_alpha": _number(self.lora_alpha), "target_modules": list(self.target_modules),
                "num_adapted_modules": len(self.modules), "task_type": self.task_type}


def is_lora_checkpoint(keys: Sequence[str]) -> bool:
    """True when the state-dict keys are a PEFT LoRA model's (some key holds ``.lora_A.<adapter>.weight``).

    Example:
        >>> is_lora_checkpoint(["base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight"])
        True
        >>> is_lora_checkpoint(["model.layers.0.mlp.up_proj.weight"])
        False
    """
    return any(_LORA_KEY.match(k) for k in keys)


def hf_name(key: str) -> str:
    """A PeftModel state-dict key -> the Hugging Face model's name of the same tensor.

    Example:
        >>> hf_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
        'model.layers.0.self_attn.q_proj.weight'
    """
    return key.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def peft_adapter_key(key: str, adapter_name: str = "default") -> str:
    """A PeftModel LoRA key -> PEFT's name in ``adapter_model.safetensors`` (the adapter name is dropped).

    Example:
        >>> peft_adapter_key("base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight")
        'base_model.model.model.layers.0.mlp.up_proj.lora_B.weight'
    """
    return key.replace(f".{adapter_name}.weight", ".weight")


def read_lora_meta(actor_dir: Path) -> dict[str, Any]:
    """``actor_dir/lora_train_meta.json`` parsed (empty when absent, e.g. veRL before it wrote the file).

    Raises:
        LoraMetadataError: the file exists but is not a JSON object.
    """
    path = Path(actor_dir) / LORA_META_FILE
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LoraMetadataError(f"{path}: cannot be read as JSON ({e}); fix or remove it and pass --lora-alpha") from e
    if not isinstance(meta, dict):
        raise LoraMetadataError(f"{path}: expected a JSON object with r and lora_alpha, found {type(meta).__name__}")
    return meta


def read_lora_layout(
    shards: RankShards,
    actor_dir: Path,
    *,
    lora_alpha: float | None = None,
    lora_rank: int | None = None,
    base_module_names: Sequence[str] | None = None,
) -> LoraLayout:
    """Describe the LoRA checkpoint in ``shards`` (see :class:`LoraLayout`).

    The rank comes from the A matrices' shapes (cross-checked with ``lora_train_meta.json`` and ``lora_rank``);
    alpha from ``lora_alpha`` (the user's flag wins) or ``lora_train_meta.json``. Neither is ever guessed.

    Args:
        shards: the model rank files.
        actor_dir: the folder holding them (for ``lora_train_meta.json`` and error messages).
        lora_alpha, lora_rank: values the user supplied (CLI ``--lora-alpha`` / ``--lora-rank``).
        base_module_names: every module name of the base model that has a ``.weight`` (to write compact leaf names
            in ``target_modules`` where that is exact); ``None``: full names.

    Raises:
        LoraMetadataError: alpha unknown, rank inconsistent, or a module with only one of A/B.
        LoraError: DoRA, embedding LoRA or LoRA biases (not supported), or several adapters in one checkpoint.
    """
    odd = sorted(k for k in shards.keys if _UNSUPPORTED.search(k))
    if odd:
        raise LoraError(f"{shards.files[0]}: holds {odd[0]} - DoRA, embedding LoRA and LoRA biases are not supported "
                        "by this consolidator (plain LoRA on linear layers only).")
    pairs: dict[str, dict[str, str]] = {}
    adapters = set()
    for k in shards.keys:
        m = _LORA_KEY.match(k)
        if m:
            adapters.add(m.group("adapter"))
            pairs.setdefault(hf_name(m.group("module")), {})[m.group("which")] = k
    if len(adapters) != 1:
        raise LoraError(f"{shards.files[0]}: holds {len(adapters)} LoRA adapters {sorted(adapters)}; expected one")
    adapter = adapters.pop()
    modules: dict[str, tuple[str, str]] = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise LoraMetadataError(f"{shards.files[0]}: {module} has lora_{''.join(ab)} but not both A and B")
        modules[module] = (ab["A"], ab["B"])
    ranks = {shards.spec(a).shape[0] for a, _ in modules.values()} | {shards.spec(b).shape[1] for _, b in
                                                                      modules.values()}
    meta = read_lora_meta(actor_dir)
    meta_file = Path(actor_dir) / LORA_META_FILE
    if len(ranks) != 1:
        raise LoraMetadataError(f"{shards.files[0]}: LoRA matrices of several ranks {sorted(ranks)}; per-module ranks "
                                "(rank_pattern) are not supported.")
    r = ranks.pop()
    for source, value in (("--lora-rank", lora_rank), (str(meta_file), meta.get("r"))):
        if value is not None and int(value) != r:
            raise LoraMetadataError(f"r: {source} says {value}, but the LoRA matrices in {shards.files[0]} have rank "
                                    f"{r}; the metadata does not belong to these shards.")
    alpha = lora_alpha if lora_alpha is not None else meta.get("lora_alpha")
    if alpha is None or float(alpha) <= 0:
        raise LoraMetadataError(
            f"lora_alpha: unknown for {actor_dir} ({meta_file.name} is {'missing' if not meta else 'without it'}); "
            "the merge scale alpha/r needs it. Pass --lora-alpha (API: lora_alpha=) with the run's "
            "actor_rollout_ref.model.lora_alpha.")
    if lora_alpha is not None and meta.get("lora_alpha") is not None and float(meta["lora_alpha"]) != float(lora_alpha):
        logger.warning("lora_alpha: using %s from the caller, %s says %s", lora_alpha, meta_file, meta["lora_alpha"])
    lora_keys = {k for ab in modules.values() for k in ab}
    base_keys = {hf_name(k): k for k in shards.keys if k not in lora_keys}
    return LoraLayout(r=r, lora_alpha=float(alpha), adapter_name=adapter, modules=modules, base_keys=base_keys,
                      target_modules=_target_modules(list(modules), base_module_names),
                      lora_only=not any(f"{m}.weight" in base_keys for m in modules),
                      task_type=str(meta.get("task_type") or "CAUSAL_LM"))


def _target_modules(adapted: list[str], base_module_names: Sequence[str] | None) -> list[str]:
    """Leaf names (``q_proj``) where every base module of that leaf name is adapted, full names elsewhere.

    PEFT matches ``target_modules`` entries as a full name or a ``.``-suffix, so both forms select exactly the
    adapted modules; leaf names keep the config short and readable (28 layers x 7 names otherwise).
    """
    if base_module_names is None:
        return sorted(adapted)
    by_leaf: dict[str, set[str]] = {}
    for name in base_module_names:
        by_leaf.setdefault(name.rsplit(".", 1)[-1], set()).add(name)
    chosen: dict[str, set[str]] = {}
    for name in adapted:
        chosen.setdefault(name.rsplit(".", 1)[-1], set()).add(name)
    out: list[str] = []
    for leaf, names in sorted(chosen.items()):
        out += [leaf] if names == by_leaf.get(leaf) else sorted(names)
    return out


def merge_lora_weight(base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                      dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``base + (lora_b @ lora_a) * scaling``, computed in fp32, cast once to ``dtype`` (default: ``base``'s).

    Args:
        base: W, shape (out, in). lora_a: A, shape (r, in). lora_b: B, shape (out, r).
        scaling: ``lora_alpha / r``.
        dtype: the result's dtype. out: a tensor of W's shape and ``dtype`` to write into.

    Example:
        >>> merge_lora_weight(torch.zeros(2, 3), torch.ones(1, 3), torch.ones(2, 1), 2.0)
        tensor([[2., 2., 2.],
                [2., 2., 2.]])
    """
    merged = _add_delta_(base.to(torch.float32, copy=True), lora_a, lora_b, scaling)
    dtype = dtype or base.dtype
    if out is None:
        return merged if dtype == torch.float32 else merged.to(dtype)
    return out.copy_(merged)


def _add_delta_(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``weight += (B @ A) * scaling`` in place on an fp32 ``weight``: PEFT's order of operations (delta first, then
    one add), so fp32 results match ``merge_and_unload`` bit for bit; one temporary of W's size (the delta)."""
    delta = lora_b.to(torch.float32) @ lora_a.to(torch.float32)
    delta.mul_(scaling)
    return weight.add_(delta)


class MergedLoraShards:
    """The :class:`RankShards` interface over a LoRA checkpoint, as the plain Hugging Face model with the adapters
    folded in: Hugging Face key names, no ``lora_`` tensors, adapted weights merged on assembly.

    The rest of the engine (key/shape checks against ``config.json``, the shard plan, the streaming writers, the
    transformers verification) runs on it unchanged. Assembling an adapted weight holds W, W' in fp32 and the
    small A and B: about three copies of the largest tensor, still independent of the model size.

    Raises:
        LoraError: the checkpoint holds adapters only (no base weights to merge into).
    """

    def __init__(self, shards: RankShards, layout: LoraLayout):
        if layout.lora_only:
            raise LoraError(
                f"{shards.files[0]}: holds LoRA adapters only (veRL's checkpoint.save_lora_only=true), no base weights "
                "to merge them into. Consolidate with --lora adapter (API: lora='adapter'), then merge with PEFT "
                "against the base model.")
        self._shards, self._layout = shards, layout
        self.files = shards.files
        self.keys = list(layout.base_keys)
        self._merge_of = {f"{m}.weight": ab for m, ab in layout.modules.items()}

    def values(self, key: str) -> list[Any]:
        return self._shards.values(self._layout.base_keys[key])

    def spec(self, key: str) -> TensorSpec:
        s = self._shards.spec(self._layout.base_keys[key])
        return TensorSpec(key, s.shape, s.dtype)

    def aliases(self) -> dict[str, str]:
        """Tied weights, in Hugging Face names (FSDP2 saves tied parameters once: same storage)."""
        back = {v: k for k, v in self._layout.base_keys.items()}
        return {back[a]: back[t] for a, t in self._shards.aliases().items() if a in back and t in back}

    def assemble(self, key: str, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        ckpt_key = self._layout.base_keys[key]
        if key not in self._merge_of:
            return self._shards.assemble(ckpt_key, dtype, out=out)
        a_key, b_key = self._merge_of[key]
        dtype = dtype or self.spec(key).dtype
        # fp32 output: assemble W straight into the caller's buffer and add the delta there (peak: W + delta).
        fp32_out = out if out is not None and out.dtype == torch.float32 else None
        weight = self._shards.assemble(ckpt_key, torch.float32, out=fp32_out)
        _add_delta_(weight, self._shards.assemble(a_key), self._shards.assemble(b_key), self._layout.scaling)
        if fp32_out is not None:
            return fp32_out
        return out.copy_(weight) if out is not None else weight.to(dtype)


def adapter_config(layout: LoraLayout, base_model_name_or_path: str | None) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT reads for this adapter (plain LoRA, as veRL trains it).

    Example:
        >>> lay = LoraLayout(8, 16.0, "default", {}, {}, ["q_proj"], False)
        >>> cfg = adapter_config(lay, "Qwen/Qwen2.5-0.5B")
        >>> cfg["r"], cfg["lora_alpha"], cfg["target_modules"], cfg["peft_type"]
        (8, 16, ['q_proj'], 'LORA')
    """
    return {
        "peft_type": "LORA",
        "task_type": layout.task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": layout.r,
        "lora_alpha": _number(layout.lora_alpha),
        "target_modules": list(layout.target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def write_adapter(shards: RankShards, layout: LoraLayout, out_dir: Path, *,
                  base_model_name_or_path: str | None, dtype: torch.dtype | None = None) -> list[str]:
    """Write ``adapter_model.safetensors`` (PEFT key names) and ``adapter_config.json`` into ``out_dir``.

    The adapter is small (``r * (in + out)`` per module), so it is assembled in memory and saved in one call.

    Args:
        shards, layout: the checkpoint and its :class:`LoraLayout`.
        out_dir: an existing folder.
        base_model_name_or_path: recorded in ``adapter_config.json`` (what ``AutoModelForCausalLM`` /
            ``AutoPeftModelForCausalLM`` load the base from).
        dtype: the adapter's dtype (default: as stored; veRL trains adapters in the base dtype).

    Returns:
        The names of the files written.
    """
    from safetensors.torch import save_file

    tensors = {peft_adapter_key(k, layout.adapter_name): shards.assemble(k, dtype) for k in layout.lora_keys}
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = adapter_config(layout, base_model_name_or_path)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return [ADAPTER_CONFIG, ADAPTER_WEIGHTS]


def consolidate_lora_optimizer(files: Sequence[Path], shards: RankShards, layout: LoraLayout, out_path: Path) -> int:
    """Merge the per-rank optimizer files into a name-keyed ``optimizer.pt`` for the LoRA parameters only.

    veRL builds AdamW over ``model.parameters()``, frozen base weights included (they never get state). Ids map to
    names in ``parameters()`` order, which is the state dict's order without tied aliases; with adapters-only
    shards (``save_lora_only``), the ids that have state are the trainable LoRA tensors, in the same order.
    The result is torch's full optimizer state dict layout over the PeftModel's parameter names
    (``base_model.model....lora_A.default.weight``): ``set_optimizer_state_dict`` takes it at any world size.

    Returns:
        The size of the written file in bytes.

    Raises:
        OptimizerMismatchError: ids or shapes do not line up with the checkpoint's parameters.
    """
    mapped = MappedFiles()
    ranks = load_optimizer_ranks(files, mapped)
    groups = ranks[0]["param_groups"]
    ids = [i for g in groups for i in g["params"]]
    with_state = sorted(ranks[0]["state"])
    lora = layout.lora_keys
    if layout.lora_only:
        if len(with_state) != len(lora):
            raise OptimizerMismatchError(
                f"{files[0]}: {len(with_state)} parameters have optimizer state, the checkpoint holds {len(lora)} LoRA "
                "tensors; the optimizer does not belong to these adapters.")
        name_of = dict(zip(with_state, lora, strict=True))
    else:
        aliases = shards.aliases()
        names = [k for k in shards.keys if k not in aliases]
        if sorted(ids) != list(range(len(names))):
            raise OptimizerMismatchError(
                f"{files[0]}: param_groups hold {len(ids)} parameter ids, the checkpoint has {len(names)} parameters; "
                "the optimizer does not belong to this model.")
        name_of = {i: names[i] for i in range(len(names))}
    wanted = set(lora)
    stray = [name_of.get(i, i) for i in with_state if name_of.get(i) not in wanted]
    if stray:
        raise OptimizerMismatchError(f"{files[0]}: optimizer state for non-LoRA parameters {stray[:3]}; the base "
                                     "weights were trained too (modules_to_save?), which this consolidator rejects.")
    state: dict[str, dict[str, Any]] = {}
    for pid in with_state:
        name = name_of[pid]
        entry = {}
        for k, v in ranks[0]["state"][pid].items():
            if not isinstance(v, torch.Tensor):
                entry[k] = v
                continue
            label = f"optimizer state[{pid}] ({name}).{k}"
            try:
                values = [r["state"][pid][k] for r in ranks]
            except KeyError as e:
                raise OptimizerMismatchError(f"{label}: missing on some ranks; the files are not one save") from e
            t = assemble(label, values, files, release=mapped.release)
            if t.ndim > 0 and tuple(t.shape) != shards.spec(name).shape:
                raise OptimizerMismatchError(f"{label}: merged shape {tuple(t.shape)} differs from the parameter's "
                                             f"{shards.spec(name).shape}")
            entry[k] = t
        state[name] = entry
    full_groups = [{**{k: v for k, v in g.items() if k != "params"},
                    "params": [name_of[i] for i in g["params"] if name_of.get(i) in wanted]} for g in groups]
    torch.save({"state": state, "param_groups": full_groups}, out_path)
    return out_path.stat().st_size


def check_lora_keys(shards: RankShards, layout: LoraLayout, expected_shapes: dict[str, tuple[int, ...]]) -> None:
    """Every adapted module exists in the base model and its A/B shapes fit its weight.

    Raises:
        MissingKeyError: an adapted module the base config does not have.
        LoraMetadataError: A is not (r, in) or B is not (out, r) for the module's (out, in) weight.
    """
    for module, (a, b) in layout.modules.items():
        shape = expected_shapes.get(f"{module}.weight")
        if shape is None:
            raise MissingKeyError(f"{a}: adapts {module}, which the model's config.json does not have")
        if shards.spec(a).shape != (layout.r, shape[1]) or shards.spec(b).shape != (shape[0], layout.r):
            raise LoraMetadataError(f"{module}: A {shards.spec(a).shape} / B {shards.spec(b).shape} do not fit its "
                                    f"weight {shape} at rank {layout.r}")


def _number(x: float) -> int | float:
    """``16.0 -> 16``: alpha is an int in almost every config; PEFT and readers expect that form."""
    return int(x) if float(x).is_integer() else float(x)


def lora_view(shards: RankShards, actor_dir: Path, expected: Any, mode: str | None, *,
              lora_alpha: float | None = None, lora_rank: int | None = None
              ) -> tuple[LoraLayout | None, MergedLoraShards | None]:
    """The consolidation engine's hook: ``(None, None)`` for a full checkpoint; for a LoRA one its layout, and the
    merged view to write as the model (``None`` when ``mode`` is ``"adapter"``: no model is written).

    Args:
        shards: the model rank files. actor_dir: their folder. expected: the
            :class:`utils.checkpoint.model_config.ExpectedModel` of the base config.
        mode: ``adapter``, ``merged``, ``both`` or ``None`` (merged).
        lora_alpha, lora_rank: see :func:`read_lora_layout`.

    Raises:
        LoraMetadataError, LoraError, MissingKeyError: see :func:`read_lora_layout`, :func:`check_lora_keys`.
    """
    if not is_lora_checkpoint(shards.keys):
        return None, None
    base_modules = [k.removesuffix(".weight") for k in expected.shapes if k.endswith(".weight")]
    layout = read_lora_layout(shards, actor_dir, lora_alpha=lora_alpha, lora_rank=lora_rank,
                              base_module_names=base_modules)
    check_lora_keys(shards, layout, expected.shapes)
    mode = mode or "merged"
    logger.info("LoRA checkpoint: r=%d, alpha=%s, %d adapted modules (%s); writing %s", layout.r,
                _number(layout.lora_alpha), len(layout.modules), ", ".join(layout.target_modules[:8]), mode)
    return layout, (None if mode == "adapter" else MergedLoraShards(shards, layout))
