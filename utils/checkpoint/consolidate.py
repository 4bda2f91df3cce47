"""The consolidation engine: veRL FSDP rank files -> one Hugging Face model folder, streaming in bounded memory.

The pipeline: detect the layout (world size, rank files) -> read every rank file memory-mapped -> for each tensor,
assemble it from its DTensor shards by placement, cast, write it, release it -> write the index last -> copy config,
generation config and tokenizer -> optionally merge the optimizer -> re-open and check every file -> rename the
temporary folder into place. Peak memory is about the largest tensor (safetensors) or one output shard (bin).

The public face is :mod:`utils.load_fsdp_to_hf` (same names, and the CLI in :mod:`utils.checkpoint.cli`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from utils.checkpoint.errors import (
    InvalidOptionError,
    MissingKeyError,
    MissingRankFileError,
    OutputExistsError,
    OutputNotWritableError,
    OutputVerificationError,
    ShapeMismatchError,
    TiedWeightMismatchError,
)
from utils.checkpoint.layout import CheckpointLayout, detect_layout
from utils.checkpoint.lora import LORA_MODES, lora_view
from utils.checkpoint.merge import RankShards
from utils.checkpoint.model_config import (
    ExpectedModel,
    copy_side_files,
    find_config_dir,
    load_expected_model,
    normalize_dtype,
    resolve_dtype,
)
from utils.checkpoint.optimizer import consolidate_optimizer
from utils.checkpoint.space import check_free_space, explain_write_failure
from utils.checkpoint.tempdirs import make_owned_temp_dir, release_owner, remove_owned, sweep_stale
from utils.checkpoint.writer import (
    WEIGHT_FORMATS,
    FileReporter,
    SafetensorsStreamWriter,
    ShardPlan,
    parse_size,
    plan_shards,
    save_bin_shard,
    verify_output,
    write_index,
)

__all__ = ["ConsolidationResult", "consolidate_checkpoint", "human_bytes"]

logger = logging.getLogger("utils.load_fsdp_to_hf")  # the public face's name: what users filter on


@dataclass(frozen=True)
class ConsolidationResult:
    """What :func:`consolidate_checkpoint` wrote.

    Attributes:
        out_dir: the finished folder.
        files: every file in it, sorted.
        weight_files: the weight shards (and index), in write order.
        bytes_written: weight bytes written (plus ``optimizer.pt`` if any).
        seconds: wall time of the whole consolidation.
        dtype: the floating-point dtype written (``"bfloat16"``, ...); ``source_dtype``: the dtype stored in the shards.
        world_size, step: of the checkpoint consolidated.
        num_tensors: weight tensors written (tied aliases counted once).
        optimizer_file: ``"optimizer.pt"`` if the optimizer was consolidated.
        lora: for a LoRA checkpoint, what was written (``mode``, ``r``, ``lora_alpha``, ``target_modules``,
            ``base_model_name_or_path``, ``adapter_dir``: the PEFT folder relative to ``out_dir``); else ``None``.
    """

    out_dir: Path
    files: list[str]
    weight_files: list[str]
    bytes_written: int
    seconds: float
    dtype: str
    source_dtype: str
    world_size: int
    step: int | None
    num_tensors: int
    optimizer_file: str | None = None
    side_files: list[str] = field(default_factory=list)
    lora: dict | None = None

    verified: bool = False

    def summary(self) -> str:
        step = f"step {self.step}" if self.step is not None else "checkpoint"
        rate = self.bytes_written / max(self.seconds, 1e-9)
        text = (f"consolidated {step} (W={self.world_size}, {self.source_dtype}) -> {self.out_dir}: {self.num_tensors} "
                f"tensors, {sum(not f.endswith('.json') for f in self.weight_files)} weight file(s), {self.dtype}, "
                f"{human_bytes(self.bytes_written)}{' + optimizer.pt' if self.optimizer_file else ''}{_lora_summary(self.lora)} in "
                f"{self.seconds:.1f} s ({human_bytes(rate)}/s)")
        if self.verified:
            text += "\nverify: passed - the folder loads with transformers and every tensor equals the merged shards"
        return text


def human_bytes(n: float) -> str:
    """``1234`` -> ``'1.23 kB'``, ``3.09e9`` -> ``'3.09 GB'`` (decimal units, 3 significant digits).

    Example:
        >>> human_bytes(512), human_bytes(618_420), human_bytes(3.09e9)
        ('512 B', '618 kB', '3.09 GB')
    """
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def _lora_summary(lora: dict | None) -> str:
    if not lora:
        return ""
    return f" [LoRA r={lora['r']} alpha={lora['lora_alpha']}: {lora['mode']}]"


def _check_against_config(shards: RankShards, expected: ExpectedModel) -> list[str]:
    """Return the keys to write (checkpoint order, tied aliases dropped) after checking keys and shapes."""
    ckpt = set(shards.keys)
    missing = [k for k in expected.shapes if k not in ckpt and k not in expected.aliases]
    unexpected = [k for k in shards.keys if k not in expected.shapes]
    if missing or unexpected:
        raise MissingKeyError(
            f"{shards.files[0]}: keys differ from the model built from {expected.config_dir / 'config.json'}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}. The "
            "huggingface/ folder (or --base-model) does not describe the model that was trained.")
    stored_once = shards.aliases()
    for alias, target in expected.aliases.items():
        # Saved as two storages (not one, as FSDP2 saves tied params)? Then they must still be equal (verl #6334).
        if alias in ckpt and target in ckpt and stored_once.get(alias) != target:
            if not torch.equal(shards.assemble(alias), shards.assemble(target)):
                raise TiedWeightMismatchError(
                    f"{alias} and {target} are tied in {expected.config_dir / 'config.json'} "
                    f"(tie_word_embeddings) but differ in {shards.files[0]}; the tie was broken during training. "
                    "Set tie_word_embeddings=false in the config to keep both, or fix the checkpoint.")
    keys = []
    for k in shards.keys:
        spec = shards.spec(k)
        if spec.shape != expected.shapes[k]:
            raise ShapeMismatchError(
                f"{k}: the checkpoint holds shape {spec.shape}, {expected.config_dir / 'config.json'} implies "
                f"{expected.shapes[k]}. The config does not match the trained model; pass the right --base-model "
                "or fix the huggingface/ folder.")
        if k not in expected.aliases:
            keys.append(k)
    return keys


def _make_temp_dir(out_dir: Path) -> Path:
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        # A kill -9 of an earlier run left its temporary folder here: remove it if provably ours and stale.
        sweep_stale(out_dir.parent, f".{out_dir.name}.tmp-")
        tmp = make_owned_temp_dir(out_dir.parent, f".{out_dir.name}.tmp-")
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private (0700); the result should read like any folder
        return tmp
    except OSError as e:
        raise OutputNotWritableError(
            f"{out_dir}: cannot create a folder beside it ({e.strerror or e}); choose a writable output path.") from e


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"{out_dir} exists and is not a directory; remove it or pick another OUT_DIR")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out_dir} exists and is not empty; pass --overwrite (overwrite=True) to replace it")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():  # empty, or overwrite=True: swap, so a failure never leaves a half-replaced folder
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rename(out_dir, old / "x")
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


class _Buffers:
    """Two byte buffers the size of the largest output tensor, reused for every tensor (safetensors path).

    A fresh ``torch.empty`` per tensor is returned to the OS when freed and page-faulted in again for the next one;
    measured on Qwen2.5-1.5B shards, that made assembly ~3x slower than copying into a reused buffer.
    """

    def __init__(self, nbytes: int):
        self._nbytes = nbytes
        self._bufs: list[torch.Tensor] = []

    def view(self, i: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        while len(self._bufs) <= i:  # allocated on first use: the bin path never pays for them
            self._bufs.append(torch.empty(self._nbytes, dtype=torch.uint8))
        return self._bufs[i][: _nbytes(shape, dtype)].view(dtype).view(shape)


def _write_weights(shards: RankShards, plan: ShardPlan, tmp: Path, weights_format: str,
                   dtypes: dict[str, torch.dtype], progress: bool, reporter: FileReporter | None = None) -> None:
    from tqdm.auto import tqdm

    buffers = _Buffers(max((_nbytes(shards.spec(k).shape, dtypes[k]) for k in dtypes), default=0))
    prefetch = getattr(shards, "prefetch", None)
    with tqdm(total=plan.total_size, unit="B", unit_scale=True, desc="consolidating", file=sys.stderr,
              disable=not progress, dynamic_ncols=True) as bar:
        for name, keys in plan.files.items():
            if weights_format == "safetensors":
                entries = [(k, shards.spec(k).shape, dtypes[k]) for k in keys]
                # Writing tensor i (a syscall that releases the GIL) overlaps assembling tensor i+1 into the other
                # of two reused buffers; the file still receives the tensors strictly in header order.
                with SafetensorsStreamWriter(tmp / name, entries, sha256=reporter is not None) as writer, \
                        ThreadPoolExecutor(1) as pool:
                    pending: Future[int] | None = None
                    for i, (k, shape, dtype) in enumerate(entries):
                        if i + 1 < len(entries) and prefetch:  # read ahead: the next tensor loads while this one
                            prefetch(entries[i + 1][0])     # is copied (a LoRA view has no files to read ahead)
                        tensor = shards.assemble(k, dtype, out=buffers.view(i % 2, shape, dtype))
                        if pending is not None:
                            bar.update(pending.result())
                        pending = pool.submit(writer.write, k, tensor)
                        del tensor
                    if pending is not None:
                        bar.update(pending.result())
                if reporter is not None:
                    reporter.done(tmp / name, writer.sha256)
            else:
                # torch.save needs the whole shard's dict at once: peak = one output shard (+ the tensor in flight).
                buf = {}
                for i, k in enumerate(keys):
                    if i + 1 < len(keys) and prefetch:
                        prefetch(keys[i + 1])
                    buf[k] = shards.assemble(k, dtypes[k])
                    bar.update(buf[k].numel() * buf[k].element_size())
                save_bin_shard(tmp / name, buf)
                del buf
                if reporter is not None:
                    reporter.done(tmp / name)  # hashed from the page cache while the next shard is assembled


def _verify_with_transformers(tmp: Path, shards: RankShards, keys: list[str], expected: ExpectedModel,
                              dtypes: dict[str, torch.dtype]) -> None:
    """Load the written folder with transformers and compare every tensor bitwise with a fresh merge."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp, dtype="auto")
    loaded = model.state_dict()
    for k in keys:
        if not torch.equal(loaded[k], shards.assemble(k, dtypes[k])):
            raise OutputVerificationError(f"{k}: the model loaded from {tmp} differs from the merged shards")
    for alias, target in expected.aliases.items():
        if not torch.equal(loaded[alias], loaded[target]):
            raise OutputVerificationError(f"{alias}: not tied to {target} after loading")


def consolidate_checkpoint(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    step: int | None = None,
    weights_format: str = "bin",
    dtype: str = "auto",
    max_shard_size: int | str = "5GB",
    include_optimizer: bool = False,
    base_model: str | Path | None = None,
    overwrite: bool = False,
    verify: bool = False,
    progress: bool = True,
    lora: str | None = None,
    lora_alpha: float | None = None,
    lora_rank: int | None = None,
    lora_base_model: str | None = None,
    on_file_written: Callable[[Path, str], None] | None = None,
) -> ConsolidationResult:
    """Merge a veRL FSDP checkpoint's rank files into a Hugging Face model folder.

    Args:
        ckpt_dir: ``global_step_N/actor``, ``global_step_N``, or the run directory (latest step by default).
        out_dir: the folder to create; built beside it in a temporary folder, renamed into place when verified.
        step: with a run directory, the step to consolidate.
        weights_format: ``"bin"`` (``pytorch_model*.bin``) or ``"safetensors"`` (``model*.safetensors``).
        dtype: ``"auto"`` (the checkpoint's ``huggingface/config.json`` dtype), ``"bf16"``, ``"fp16"`` or ``"fp32"``.
        max_shard_size: split the weights into files of at most this size (``"5GB"``, bytes as int).
        include_optimizer: also write a name-keyed ``optimizer.pt`` (torch's full optimizer state dict layout).
        base_model: a local model folder for config/tokenizer, used only if the checkpoint has no ``huggingface/``.
        overwrite: replace a non-empty ``out_dir``.
        verify: also load the result with transformers and compare every tensor bitwise with the shards.
        progress: show a progress bar over bytes on stderr.
        lora: for a LoRA checkpoint (see :mod:`utils.checkpoint.lora`): ``"adapter"`` (a PEFT folder),
            ``"merged"`` (a plain model with ``W + B@A*alpha/r`` folded in, fp32 before the final cast) or
            ``"both"`` (the merged model, and the adapter in ``out_dir/adapter``); default ``None``: merged, so the
            output loads with ``from_pretrained`` as for any checkpoint. Ignored for a full checkpoint. With
            ``include_optimizer``, ``optimizer.pt`` holds the LoRA parameters' state only.
        lora_alpha, lora_rank: override / cross-check veRL's ``lora_train_meta.json``; a checkpoint without it
            needs ``lora_alpha``.
        lora_base_model: ``base_model_name_or_path`` written into ``adapter_config.json`` (default:
            ``base_model``, else the ``_name_or_path`` of the checkpoint's ``config.json``).
        on_file_written: called as ``on_file_written(path, sha256_hex)`` for every output file as soon as it is
            complete (weight shards first, while later ones are still being written), from a background thread;
            ``path`` is inside the temporary build folder and exists only until this function returns. The Hub
            pipeline (:mod:`utils.hub.pipeline`) uploads from it. An exception from it fails the consolidation.
            (Not used for a LoRA adapter-only output.)

    Returns:
        A :class:`ConsolidationResult` (files, bytes, seconds, dtype, world size, step).

    Raises:
        NotACheckpointError, MissingRankFileError, MixedWorldSizeError, WorldSizeMismatchError: layout problems.
        CorruptShardError: a rank file cannot be read.
        MissingKeyError, ShapeMismatchError, UnsupportedPlacementError, ReplicaMismatchError: content problems.
        MissingModelConfigError, InvalidModelConfigError: no usable ``config.json``.
        OutputExistsError, OutputNotWritableError, OutputVerificationError: output problems.
        FSDP1OptimizerError, OptimizerMismatchError: with ``include_optimizer``.
        LoraMetadataError, LoraError: a LoRA checkpoint without a known alpha, or one that cannot be written as asked.
        ValueError: a bad argument (format, dtype, shard size, lora mode).
        In every case nothing is left in (or beside) ``out_dir``.

    Example:
        >>> res = consolidate_checkpoint("ckpts/run/global_step_100/actor", "out/model",  # doctest: +SKIP
        ...                              weights_format="safetensors", dtype="bf16")
        >>> print(res.summary())  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    if weights_format not in WEIGHT_FORMATS:
        raise InvalidOptionError(f"weights_format={weights_format!r}: expected one of {sorted(WEIGHT_FORMATS)}")
    dtype = normalize_dtype(dtype)
    parse_size(max_shard_size)
    if lora is not None and lora not in LORA_MODES:
        raise ValueError(f"lora={lora!r}: expected one of {', '.join(LORA_MODES)}")
    out_dir = Path(out_dir).absolute()
    _check_out_dir(out_dir, overwrite)

    layout: CheckpointLayout = detect_layout(ckpt_dir, step)
    if include_optimizer and not layout.optim_files:
        raise MissingRankFileError(
            f"{layout.actor_dir}: no complete set of optim_world_size_{layout.world_size}_rank_*.pt files; the run "
            "saved no optimizer (checkpoint.save_contents) or some ranks' files are missing. Drop --optimizer.")
    config_dir = find_config_dir(layout.hf_dir, base_model)
    expected = load_expected_model(config_dir)
    shards = RankShards(layout.model_files)
    # A LoRA checkpoint: `view` is the merged model (same interface as `shards`), or None for an adapter-only output.
    lora_layout, view = lora_view(shards, layout.actor_dir, expected, lora, lora_alpha=lora_alpha, lora_rank=lora_rank)
    if lora_layout is not None:  # the LoRA outputs' writers (they use this module's temp-folder helpers)
        from utils.checkpoint.lora_output import consolidate_adapter, lora_base_name, write_lora_extras
    if lora_layout is not None and view is None:
        return consolidate_adapter(t0, layout, shards, lora_layout, expected, out_dir, dtype=dtype,
                                    include_optimizer=include_optimizer, base_name=lora_base_name(
                                        lora_base_model, base_model, config_dir), overwrite=overwrite)
    raw, shards = shards, (view if view is not None else shards)
    try:
        keys = _check_against_config(shards, expected)
    except (MissingKeyError, ShapeMismatchError, TiedWeightMismatchError):
        if not expected.from_formula:
            raise
        # The config-only formula and the checkpoint disagree: let transformers decide (and word the error).
        expected = load_expected_model(config_dir, use_formula=False)
        keys = _check_against_config(shards, expected)

    floats = [shards.spec(k).dtype for k in keys if shards.spec(k).dtype.is_floating_point]
    source_dtype = floats[0] if floats else torch.float32
    out_dtype = resolve_dtype(dtype, expected.config_dtype, source_dtype)
    if out_dtype != source_dtype:
        why = f"config.json says {expected.config_dtype}" if dtype == "auto" else f"dtype={dtype}"
        logger.info("casting weights %s -> %s (%s)", source_dtype, out_dtype, why)
    dtypes = {k: out_dtype if shards.spec(k).dtype.is_floating_point else shards.spec(k).dtype for k in keys}
    plan = plan_shards([(k, shards.spec(k).shape, dtypes[k]) for k in keys], weights_format, max_shard_size)
    logger.info("%s: W=%d, %d tensors -> %d %s file(s), %s %s", layout.actor_dir, layout.world_size, len(keys),
                len(plan.files), weights_format, human_bytes(plan.total_size), out_dtype)

    check_free_space(out_dir, plan.total_size + (sum(f.stat().st_size for f in layout.optim_files)
                                                 if include_optimizer else 0))
    new_parents = [p for p in (out_dir.parent, *out_dir.parent.parents) if not p.exists()]
    tmp = _make_temp_dir(out_dir)
    # One intra-op thread: the copy/cast is memory-bound, and the overlap comes from the writer thread. Measured on
    # 2 shared cores (Qwen2.5-1.5B, W=8): OpenMP workers spinning beside the writer made the merge 1.3-2x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    reporter = FileReporter(on_file_written) if on_file_written is not None else None
    try:
        _write_weights(shards, plan, tmp, weights_format, dtypes, progress, reporter)
        write_index(tmp, plan)
        side_files = copy_side_files(config_dir, tmp, out_dtype)
        opt_bytes, opt_file, lora_info = 0, None, None
        if lora_layout is not None:
            lora_info = write_lora_extras(tmp, layout, raw, lora_layout, lora or "merged", out_dtype,
                                          include_optimizer, lora_base_name(lora_base_model, base_model, config_dir))
            opt_file, opt_bytes = lora_info.pop("optimizer_file"), lora_info.pop("optimizer_bytes")
        elif include_optimizer:
            opt_file = "optimizer.pt"
            opt_bytes = consolidate_optimizer(layout.optim_files, expected.param_names, expected.shapes,
                                              tmp / opt_file, fsdp_version=layout.fsdp_version)
        if reporter is not None:
            for name in [*([plan.index_name] if plan.index_name else []), *side_files, *([opt_file] if opt_file else [])]:
                reporter.done(tmp / name)
        verify_output(tmp, plan, weights_format, {k: (shards.spec(k).shape, dtypes[k]) for k in keys})
        if verify:
            _verify_with_transformers(tmp, shards, keys, expected, dtypes)
        if reporter is not None:
            reporter.wait()
            reporter = None
        _check_out_dir(out_dir, overwrite)  # again: someone may have written there meanwhile
        _move_into_place(tmp, out_dir)
        release_owner(tmp)
    except BaseException as e:  # Ctrl-C and SIGTERM (the CLI turns it into an interrupt) included: leave nothing
        if reporter is not None:
            try:
                reporter.wait()  # no report thread may still read the folder removed below
            except Exception:  # noqa: BLE001 - the original error is the one to raise
                pass
        explained = explain_write_failure(e, layout.actor_dir, layout.model_files, out_dir)  # before space is freed
        remove_owned(tmp)
        for parent in new_parents:  # folders this call created on the way to OUT_DIR, deepest first, if empty
            with contextlib.suppress(OSError):
                parent.rmdir()
        if explained is not None:
            raise explained from e
        raise
    finally:
        torch.set_num_threads(threads)
    weight_files = list(plan.files) + ([plan.index_name] if plan.index_name else [])
    return ConsolidationResult(
        out_dir=out_dir,
        files=sorted(p.name for p in out_dir.iterdir()),
        weight_files=weight_files,
        bytes_written=plan.total_size + opt_bytes,
        seconds=time.perf_counter() - t0,
        dtype=str(out_dtype).removeprefix("torch."),
        source_dtype=str(source_dtype).removeprefix("torch."),
        world_size=layout.world_size,
        step=layout.step,
        num_tensors=len(keys),
        optimizer_file=opt_file,
        side_files=side_files,
        verified=verify,
        lora=lora_info,
    )
