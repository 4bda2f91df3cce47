"""What the checkpoint's own ``huggingface/`` folder says the model is: expected keys and shapes (from a meta-device
model built by transformers), tied-weight aliases, parameter order, the dtype to write - and the side files
(config, generation config, tokenizer, chat template) copied into the output.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.checkpoint.dtype_names import normalize_dtype  # noqa: E402 - re-exported, torch-free
from utils.checkpoint.errors import InvalidModelConfigError, InvalidOptionError, MissingModelConfigError

__all__ = ["ExpectedModel", "find_config_dir", "load_expected_model", "normalize_dtype", "resolve_dtype", "DTYPES",
           "copy_side_files"]

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_CONFIG_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                       "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Weight files that veRL may also leave in huggingface/ (save_contents=['hf_model']): never copied as side files.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".gguf")


@dataclass(frozen=True)
class ExpectedModel:
    """The model a checkpoint must hold, according to its config.

    Attributes:
        shapes: every state-dict key of the model (tied aliases included) -> full shape.
        aliases: tied keys -> the key they share storage with (e.g. ``lm_head.weight -> model.embed_tokens.weight``);
            written once, under the target name, as transformers expects for ``tie_word_embeddings``.
        param_names: unique parameter names in ``model.parameters()`` order - the order of the optimizer's ids.
        config_dtype: the dtype ``config.json`` records (``dtype``/``torch_dtype``), if any.
        config_dir: where ``config.json`` was found.
    """

    shapes: dict[str, tuple[int, ...]]
    aliases: dict[str, str]
    param_names: list[str]
    config_dtype: torch.dtype | None
    config_dir: Path
    from_formula: bool = False  # built by utils.checkpoint.known_shapes, not by transformers


def find_config_dir(hf_dir: Path | None, base_model: str | Path | None) -> Path:
    """The checkpoint's ``huggingface/`` folder, or ``base_model`` only as a fallback when that folder is missing.

    Raises:
        MissingModelConfigError: neither has a ``config.json``.
    """
    for d in (hf_dir, base_model):
        if d is not None and (Path(d) / "config.json").is_file():
            return Path(d)
    raise MissingModelConfigError(
        f"no config.json in the checkpoint's huggingface/ folder ({hf_dir}) and no usable base_model ({base_model}). "
        "Pass --base-model PATH: a local folder with the config.json and tokenizer of the model that was trained.")


def load_expected_model(config_dir: Path, *, use_formula: bool = True) -> ExpectedModel:
    """Build the model on the meta device (no memory, no weights) and read its keys, shapes and tied aliases.

    With ``use_formula`` and an architecture :mod:`utils.checkpoint.known_shapes` covers, the same answer comes from
    ``config.json`` alone (no transformers import, no model): ``from_formula`` is then true, and a caller that finds
    the checkpoint disagreeing with it must call again with ``use_formula=False`` before reporting an error.

    Raises:
        InvalidModelConfigError: transformers cannot parse the config or build the architecture.
    """
    if use_formula:
        expected = _expected_from_formula(config_dir)
        if expected is not None:
            return expected
    from transformers import AutoConfig, AutoModelForCausalLM  # heavy import: only when consolidating

    try:
        config = AutoConfig.from_pretrained(config_dir)
        arch = (getattr(config, "architectures", None) or [None])[0]
        import transformers

        cls = getattr(transformers, arch, None) if arch else None
        with torch.device("meta"):
            model = cls._from_config(config) if cls is not None else AutoModelForCausalLM.from_config(config)
    except Exception as e:
        raise InvalidModelConfigError(
            f"{config_dir / 'config.json'}: transformers cannot build the model ({type(e).__name__}: {e}). Check the "
            "file, or pass --base-model with the original model's folder.") from e
    all_params = dict(model.named_parameters(remove_duplicate=False))
    unique = [n for n, _ in model.named_parameters()]
    by_id: dict[int, str] = {}
    aliases = {}
    for name, p in all_params.items():
        if id(p) in by_id:
            aliases[name] = by_id[id(p)]
        else:
            by_id[id(p)] = name
    raw = json.loads((config_dir / "config.json").read_text())
    dtype_name = raw.get("dtype") or raw.get("torch_dtype")
    return ExpectedModel(
        shapes={k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()},
        aliases=aliases,
        param_names=unique,
        config_dtype=_CONFIG_DTYPE_NAMES.get(dtype_name) if isinstance(dtype_name, str) else None,
        config_dir=config_dir,
    )


def _config_dtype(raw: dict) -> torch.dtype | None:
    dtype_name = raw.get("dtype") or raw.get("torch_dtype")
    return _CONFIG_DTYPE_NAMES.get(dtype_name) if isinstance(dtype_name, str) else None


def _expected_from_formula(config_dir: Path) -> ExpectedModel | None:
    from utils.checkpoint.known_shapes import known_model_shapes

    try:
        raw = json.loads((config_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None  # the transformers path reports it properly
    known = known_model_shapes(raw) if isinstance(raw, dict) else None
    if known is None:
        return None
    shapes, aliases, names = known
    return ExpectedModel(shapes=shapes, aliases=aliases, param_names=names, config_dtype=_config_dtype(raw),
                         config_dir=config_dir, from_formula=True)


def resolve_dtype(requested: str, config_dtype: torch.dtype | None, stored_dtype: torch.dtype) -> torch.dtype:
    """The floating-point dtype to write: explicit, or ``auto`` = the config's dtype (else the stored one).

    Raises:
        ValueError: ``requested`` is not one of auto, bf16, fp16, fp32.

    Example:
        >>> resolve_dtype("auto", torch.bfloat16, torch.float32)
        torch.bfloat16
    """
    if requested == "auto":
        return config_dtype or stored_dtype
    if requested not in DTYPES:
        raise InvalidOptionError(f"dtype={requested!r}: expected one of auto, {', '.join(DTYPES)}")
    return DTYPES[requested]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def copy_side_files(src: Path, out_dir: Path, written_dtype: torch.dtype) -> list[str]:
    """Copy config, generation config, tokenizer files and chat template from ``src`` into ``out_dir``.

    Everything is copied byte for byte (``generation_config.json`` keeps its eos list and sampling defaults), except
    ``config.json``, whose dtype entry is set to the dtype actually written. Weight files are skipped.

    Returns:
        The names of the files written, sorted.
    """
    written = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if p.name == "config.json":
            cfg = json.loads(p.read_text())
            cfg["dtype"] = _dtype_name(written_dtype)
            if "torch_dtype" in cfg:  # transformers < 5 reads this name
                cfg["torch_dtype"] = _dtype_name(written_dtype)
            (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(p, out_dir / p.name)
        written.append(p.name)
    return written
