"""Write Hugging Face weight files - safetensors streamed tensor by tensor, or ``pytorch_model.bin`` - plus the
shard index, and re-check what was written.

The shard plan (which key goes to which file) comes from ``huggingface_hub.split_torch_state_dict_into_shards``
run on meta tensors, so it is known before a single byte is read and matches what the Hub tooling would do.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from utils.checkpoint.errors import InvalidOptionError, OutputVerificationError

__all__ = [
    "WEIGHT_FORMATS",
    "ShardPlan",
    "parse_size",
    "plan_shards",
    "SafetensorsStreamWriter",
    "save_bin_shard",
    "sha256_of_file",
    "FileReporter",
    "write_index",
    "verify_output",
]

WEIGHT_FORMATS = {
    # format: (single-file name, shard filename pattern, index name)
    "bin": ("pytorch_model.bin", "pytorch_model{suffix}.bin", "pytorch_model.bin.index.json"),
    "safetensors": ("model.safetensors", "model{suffix}.safetensors", "model.safetensors.index.json"),
}

# safetensors' dtype names (the format spec); only what a model checkpoint can hold.
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units like the Hub; ``GiB`` is binary); an int is bytes.

    Raises:
        ValueError: not a positive size.

    Example:
        >>> parse_size("5GB"), parse_size("100MiB"), parse_size(1024)
        (5000000000, 104857600, 1024)
    """
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = _SIZE.match(str(size))
        if not m:
            raise InvalidOptionError(f"max_shard_size={size!r}: expected bytes or a size like '5GB', '500MB', '2GiB'")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
    if n <= 0:
        raise InvalidOptionError(f"max_shard_size={size!r}: must be positive")
    return n


@dataclass(frozen=True)
class ShardPlan:
    """Which keys go to which file. ``files`` keeps the model's key order inside each file."""

    files: dict[str, list[str]]
    index_name: str | None  # None: a single file, no index
    total_size: int

    @property
    def weight_map(self) -> dict[str, str]:
        return {k: f for f, keys in self.files.items() for k in keys}


def plan_shards(
    specs: Sequence[tuple[str, tuple[int, ...], torch.dtype]], weights_format: str, max_shard_size: int | str
) -> ShardPlan:
    """Split ``(key, shape, dtype)`` entries into output files of at most ``max_shard_size`` bytes each.

    Example:
        >>> plan_shards([("w", (4, 4), torch.float32)], "bin", "5GB").files
        {'pytorch_model.bin': ['w']}
    """
    from huggingface_hub import split_torch_state_dict_into_shards  # imported when used: CLI start-up stays short

    single, pattern, index = WEIGHT_FORMATS[weights_format]
    meta = {k: torch.empty(shape, dtype=dtype, device="meta") for k, shape, dtype in specs}
    split = split_torch_state_dict_into_shards(meta, filename_pattern=pattern, max_shard_size=max_shard_size)
    total = sum(t.numel() * t.element_size() for t in meta.values())
    if not split.is_sharded:
        return ShardPlan({single: list(meta)}, None, total)
    return ShardPlan({f: list(ks) for f, ks in split.filename_to_tensors.items()}, index, total)


class SafetensorsStreamWriter:
    """Writes one ``.safetensors`` file whose header is computed up front, then each tensor's bytes as they come.

    The safetensors library only saves a complete dict of tensors (all in memory at once); streaming needs the
    header first, and the format makes that easy: 8-byte little-endian header length, a JSON header padded with
    spaces to a multiple of 8, then the raw little-endian bytes at the offsets the header states.

    Args:
        path: the file to create.
        entries: ``(key, shape, dtype)`` in the order the tensors will be written.
        metadata: string metadata; ``{"format": "pt"}`` is what transformers and other loaders expect.
        sha256: also hash every byte as it is written (:attr:`sha256` after :meth:`close`), so an upload never has
            to read the file again.

    Example:
        >>> with SafetensorsStreamWriter(p, [("w", (2,), torch.float32)]) as w:  # doctest: +SKIP
        ...     w.write("w", torch.ones(2))
    """

    def __init__(self, path: Path, entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None, *, sha256: bool = False):
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self._expected: list[tuple[str, tuple[int, ...], torch.dtype, int]] = []
        for key, shape, dtype in entries:
            nbytes = _numel(shape) * dtype.itemsize
            header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._expected.append((key, tuple(shape), dtype, nbytes))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.path = Path(path)
        self.size = 8 + len(blob) + offset
        self._f: BinaryIO = open(self.path, "wb")  # noqa: SIM115  (closed in close())
        self._hash = hashlib.sha256() if sha256 else None
        self._put(struct.pack("<Q", len(blob)) + blob)
        self._next = 0
        self.sha256: str | None = None

    def _put(self, data) -> None:
        self._f.write(data)
        if self._hash is not None:  # hashlib releases the GIL on large buffers: overlaps the next assembly too
            self._hash.update(data)

    def write(self, key: str, tensor: torch.Tensor) -> int:
        """Append ``tensor``'s bytes; it must be the next planned entry (same key, shape, dtype). Returns bytes."""
        k, shape, dtype, nbytes = self._expected[self._next]
        if key != k or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise OutputVerificationError(
                f"{self.path.name}: expected {k} {shape} {dtype} next, got {key} {tuple(tensor.shape)} {tensor.dtype}")
        # A byte view of the (contiguous) tensor: no copy; numpy has no bf16, uint8 sidesteps that.
        self._put(tensor.contiguous().view(-1).view(torch.uint8).numpy().data if nbytes else b"")
        self._next += 1
        return nbytes

    def close(self) -> None:
        self._f.close()
        if self._next != len(self._expected):
            raise OutputVerificationError(
                f"{self.path.name}: {len(self._expected) - self._next} planned tensors were never written")
        if self._hash is not None:
            self.sha256 = self._hash.hexdigest()

    def abort(self) -> None:
        self._f.close()

    def __enter__(self) -> SafetensorsStreamWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort() if exc_type else self.close()


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def save_bin_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """``torch.save`` one ``pytorch_model*.bin`` shard (transformers v5 reads these but can no longer write them).

    (Saved by path, not through a hashing file object: torch names the archive after the file only when given a
    path, and the bytes must not depend on who wrote the shard.)
    """
    torch.save(tensors, path)


def sha256_of_file(path: Path, chunk: int = 8 << 20) -> str:
    """sha256 (hex) of a file just written (read back from the page cache, in chunks; releases the GIL)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def write_index(out_dir: Path, plan: ShardPlan) -> None:
    """Write the shard index (``*.index.json``) - call it last: its presence means every shard is complete."""
    if plan.index_name is None:
        return
    index = {"metadata": {"total_size": plan.total_size}, "weight_map": dict(sorted(plan.weight_map.items()))}
    (out_dir / plan.index_name).write_text(json.dumps(index, indent=2) + "\n")


def _read_headers(path: Path, weights_format: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    if weights_format == "safetensors":
        from safetensors import safe_open

        out = {}
        with safe_open(path, framework="pt") as f:
            if (f.metadata() or {}).get("format") != "pt":
                raise OutputVerificationError(f"{path}: safetensors metadata lacks {{'format': 'pt'}}")
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (tuple(sl.get_shape()), _dtype_from_st(sl.get_dtype()))
        return out
    sd = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    return {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}


def _dtype_from_st(name: str) -> torch.dtype:
    return {v: k for k, v in _ST_DTYPES.items()}[name]


def verify_output(out_dir: Path, plan: ShardPlan, weights_format: str,
                  expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """Re-open the index and every shard's header and check keys, shapes, dtypes and ``total_size``.

    Raises:
        OutputVerificationError: anything differs from the plan; the message names file and key.
    """
    if plan.index_name is not None:
        index_path = out_dir / plan.index_name
        index = json.loads(index_path.read_text())
        if index["weight_map"] != plan.weight_map or index["metadata"]["total_size"] != plan.total_size:
            raise OutputVerificationError(f"{index_path}: weight_map or total_size differs from the plan")
    seen: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, keys in plan.files.items():
        path = out_dir / name
        if not path.is_file() or path.stat().st_size == 0:
            raise OutputVerificationError(f"{path}: missing or empty")
        try:
            headers = _read_headers(path, weights_format)
        except OutputVerificationError:
            raise
        except Exception as e:
            raise OutputVerificationError(f"{path}: cannot be re-opened ({e})") from e
        if sorted(headers) != sorted(keys):
            raise OutputVerificationError(f"{path}: holds keys {sorted(set(headers) ^ set(keys))[:5]} unexpectedly")
        seen.update(headers)
    total = 0
    for k, (shape, dtype) in expected.items():
        if seen.get(k) != (shape, dtype):
            raise OutputVerificationError(f"{k}: written as {seen.get(k)}, expected {(shape, dtype)}")
        total += _numel(shape) * dtype.itemsize
    if set(seen) != set(expected) or total != plan.total_size:
        raise OutputVerificationError(f"{out_dir}: written keys or total size ({total}) differ from the plan")


class FileReporter:
    """Reports each finished output file with its sha256 to a callback, from one background thread, in order.

    The Hub pipeline uses it to start uploading a shard while the next one is being written. Digests computed while
    writing (safetensors) are passed through; others (``torch.save``'d ``.bin`` shards, side files) are hashed
    here, from the page cache, overlapping the next file's assembly.

    Args:
        callback: ``callback(path, sha256_hex)``; ``path`` lies in the consolidation's temporary folder and is only
            guaranteed to exist until the consolidation returns (hard-link it to keep it longer).
    """

    def __init__(self, callback):
        from concurrent.futures import ThreadPoolExecutor

        self._callback = callback
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="file-digest")
        self._futures: list = []

    def done(self, path: Path, sha256: str | None = None) -> None:
        """``path`` is complete (its digest, if known)."""
        self._futures.append(self._pool.submit(self._report, Path(path), sha256))

    def _report(self, path: Path, sha256: str | None) -> None:
        self._callback(path, sha256 or sha256_of_file(path))

    def wait(self) -> None:
        """Block until every report went out; re-raise the first error (of hashing or of the callback)."""
        try:
            for f in self._futures:
                f.result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
