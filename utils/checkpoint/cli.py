"""Command-line face of the engine: ``python utils/load_fsdp_to_hf.py CKPT_DIR OUT_DIR [options]``.

Exit codes: 0 success, 1 a checkpoint or argument error (one ``error:`` line on stderr naming a log file with the
full traceback), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM); nothing is left behind in any of these cases.
"""

from __future__ import annotations

import argparse
import logging
import sys

from utils.checkpoint.consolidate import consolidate_checkpoint
from utils.checkpoint.dtype_names import normalize_dtype
from utils.checkpoint.lora import LORA_MODES
from utils.checkpoint.tempdirs import terminate_as_interrupt
from utils.checkpoint.writer import WEIGHT_FORMATS
from utils.errlog import log_traceback

__all__ = ["main", "build_parser"]


def _dtype_arg(text: str) -> str:
    try:
        return normalize_dtype(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``load_fsdp_to_hf``."""
    p = argparse.ArgumentParser(
        prog="load_fsdp_to_hf", description="Consolidate a veRL FSDP checkpoint into a Hugging Face model folder.")
    p.add_argument("ckpt_dir", help="global_step_N/actor, global_step_N, or the run directory (latest step)")
    p.add_argument("out_dir", help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--format", dest="weights_format", choices=sorted(WEIGHT_FORMATS), default="bin")
    p.add_argument("--dtype", type=_dtype_arg, default="auto",
                   help="auto (the dtype in the checkpoint's huggingface/config.json), bf16, fp16 or fp32 "
                        "(bfloat16, float16, float32 also accepted)")
    p.add_argument("--max-shard-size", default="5GB", help="largest weight file, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--optimizer", action="store_true", help="also write a name-keyed optimizer.pt")
    p.add_argument("--base-model", default=None, help="config/tokenizer folder if the checkpoint has no huggingface/")
    p.add_argument("--step", type=int, default=None, help="with a run directory: the step (default: latest)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--verify", action="store_true", help="load the result with transformers and compare bitwise")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no log lines; errors still go to stderr")
    p.add_argument("--lora", choices=LORA_MODES, default=None,
                   help="LoRA checkpoints: adapter (PEFT folder), merged (plain model, the default) or both "
                        "(merged model + PEFT folder in OUT_DIR/adapter)")
    p.add_argument("--lora-alpha", type=float, default=None,
                   help="LoRA alpha, if the checkpoint has no lora_train_meta.json (the run's model.lora_alpha)")
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA rank, checked against the shards")
    p.add_argument("--lora-base-model", default=None,
                   help="base_model_name_or_path for adapter_config.json (a Hub id, e.g. Qwen/Qwen2.5-1.5B)")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 1 checkpoint/argument error, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    try:
        with terminate_as_interrupt():  # SIGTERM/SIGHUP unwind like Ctrl-C: the temporary folder is removed
            result = consolidate_checkpoint(
                args.ckpt_dir, args.out_dir, step=args.step, weights_format=args.weights_format, dtype=args.dtype,
                max_shard_size=args.max_shard_size, include_optimizer=args.optimizer, base_model=args.base_model,
                overwrite=args.overwrite, verify=args.verify, progress=not args.quiet, lora=args.lora,
                lora_alpha=args.lora_alpha, lora_rank=args.lora_rank, lora_base_model=args.lora_base_model)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", None)
        print(f"{f'terminated (signal {signum})' if signum else 'interrupted'}: nothing was written",
              file=sys.stderr)
        return 128 + (signum or 2)
    except Exception as e:  # noqa: BLE001 - checkpoint errors and anything unexpected: one line + a log file
        log = log_traceback(e, name="load_fsdp_to_hf")
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: {type(e).__name__}: {text}{f' (details: {log})' if log else ''}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0
