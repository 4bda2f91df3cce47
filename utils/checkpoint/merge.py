"""Placement-aware assembly of full tensors from per-rank shards, one tensor at a time.

Every rank file is a ``torch.save``'d state dict whose values are DTensors (FSDP2) or plain tensors (old veRL
at W=1, buffers). We open the files with ``torch.load(mmap=True, weights_only=True)``: only the pickled metadata
is parsed; tensor bytes stay on disk until a tensor is assembled, and the pages are handed back to the kernel right
after (see :class:`MappedFiles`), so resident memory stays near one full tensor whatever the checkpoint size.

Where each local shard goes is computed from its own DTensor metadata - mesh, placements and *its* local shape -
never from an assumption of equal chunks, because FSDP2 shards with ``torch.chunk`` semantics (uneven last chunk,
possibly empty ranks).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import logging
import mmap
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.tensor  # noqa: F401  (registers DTensor for weights_only unpickling)
from torch.distributed.tensor import DTensor, Replicate, Shard

from utils.checkpoint.errors import (
    CorruptShardError,
    InvalidOptionError,
    MissingKeyError,
    ReplicaMismatchError,
    ShapeMismatchError,
    UnsupportedPlacementError,
)
from utils.checkpoint.safe_state import refused_global, unsafe_pickle_error

__all__ = ["TensorSpec", "load_rank_file", "tensor_spec", "assemble", "MappedFiles", "RankShards"]


@dataclass(frozen=True)
class TensorSpec:
    """What a merged tensor will be, known from metadata alone: its key, full shape and stored dtype."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def load_rank_file(path: Path) -> Any:
    """``torch.load`` one rank file memory-mapped and with ``weights_only=True`` (no arbitrary pickle).

    Raises:
        CorruptShardError: the file is truncated, not a torch archive, or cannot be unpickled safely.
    """
    # Unpickling a DeviceMesh outside a process group logs a harmless warning per file; keep the output clean.
    mesh_log = logging.getLogger("torch.distributed.device_mesh")
    level = mesh_log.level
    mesh_log.setLevel(logging.ERROR)
    try:
        return torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError/OSError depending on the damage
        if refused_global(e):  # not damage: a foreign type (code) in the pickle; say so, without torch's hint
            raise unsafe_pickle_error(path, e, "a rank file") from e
        raise CorruptShardError(
            f"{path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}). The file is truncated or "
            "corrupt (an interrupted save or copy?); re-copy it or consolidate another step.") from e
    finally:
        mesh_log.setLevel(level)


def _check_placements(key: str, value: DTensor, path: Path) -> None:
    sharded_dims: set[int] = set()
    for p in value.placements:
        # type(...) is, not isinstance: _StridedShard (FSDP + TP) subclasses Shard but interleaves its chunks.
        if type(p) is Shard:
            d = p.dim % value.ndim
            if d in sharded_dims:
                raise UnsupportedPlacementError(
                    f"{key} in {path}: tensor dim {d} is sharded over two mesh dims {value.placements}; only one "
                    "Shard per tensor dim can be merged exactly.")
            sharded_dims.add(d)
        elif type(p) is not Replicate:
            raise UnsupportedPlacementError(
                f"{key} in {path}: placement {p!r} (of {value.placements}) is not supported. Only Shard(d) and "
                "Replicate can be merged exactly; Partial holds unreduced sums and _StridedShard comes from "
                "FSDP+TP layouts. Save with plain FSDP2/HSDP or reduce the tensor before saving.")


def tensor_spec(key: str, values: Sequence[Any], files: Sequence[Path]) -> TensorSpec:
    """The full shape and dtype of ``key`` from rank 0's metadata, after checking its placements are mergeable.

    Raises:
        UnsupportedPlacementError: ``Partial``, ``_StridedShard`` or nested sharding of one tensor dim.
        CorruptShardError: the value is not a tensor.
    """
    v = values[0]
    if isinstance(v, DTensor):
        _check_placements(key, v, files[0])
        return TensorSpec(key, tuple(v.shape), v.dtype)
    if isinstance(v, torch.Tensor):
        return TensorSpec(key, tuple(v.shape), v.dtype)
    raise CorruptShardError(f"{key} in {files[0]}: expected a tensor, found {type(v).__name__}")


def _rank_coordinates(key: str, mesh: torch.Tensor, world_size: int, path: Path) -> dict[int, tuple[int, ...]]:
    coords = {int(mesh[idx]): idx for idx in itertools.product(*(range(n) for n in mesh.shape))}
    if sorted(coords) != list(range(world_size)):
        raise UnsupportedPlacementError(
            f"{key} in {path}: its device mesh holds ranks {sorted(coords)}, not 0..{world_size - 1}; a mesh that "
            "does not cover exactly the ranks that saved files cannot be merged.")
    return coords


def _assemble_dtensor(key: str, values: Sequence[Any], files: Sequence[Path], out: torch.Tensor,
                      release: Callable[[torch.Tensor], None] | None) -> None:
    ref: DTensor = values[0]
    coords = _rank_coordinates(key, ref.device_mesh.mesh, len(values), files[0])
    by_coord = {c: r for r, c in coords.items()}
    shard_of = {i: p.dim % ref.ndim for i, p in enumerate(ref.placements) if type(p) is Shard}
    full = tuple(ref.shape)
    for r in range(len(values)):
        v = values[r]
        if not isinstance(v, DTensor) or tuple(v.placements) != tuple(ref.placements) or tuple(v.shape) != full:
            raise ShapeMismatchError(
                f"{key}: rank {r} ({files[r]}) disagrees with rank 0 on type, placements or global shape.")

    def local_size(c: tuple[int, ...], mesh_dim: int, j: int) -> int:
        """Size along the sharded tensor dim of the rank at coordinate c with c[mesh_dim] replaced by j."""
        return values[by_coord[c[:mesh_dim] + (j,) + c[mesh_dim + 1:]]].to_local().shape[shard_of[mesh_dim]]

    # One replica group is enough: the Replicate mesh dims (HSDP's 'ddp') hold identical copies.
    for r, c in sorted(coords.items()):
        if any(c[i] != 0 for i, p in enumerate(ref.placements) if type(p) is Replicate):
            continue
        local = values[r].to_local()
        index = [slice(0, n) for n in full]
        for mesh_dim, d in shard_of.items():
            # Offset = sum of the local sizes of the ranks before this one along that mesh dim (uneven-safe).
            start = sum(local_size(c, mesh_dim, j) for j in range(c[mesh_dim]))
            index[d] = slice(start, start + local.shape[d])
        if tuple(local.shape) != tuple(s.stop - s.start for s in index) or any(
                s.stop > n for s, n in zip(index, full, strict=True)):
            raise ShapeMismatchError(
                f"{key}: local shard of rank {r} ({files[r]}) has shape {tuple(local.shape)}, which does not fit the "
                f"full shape {full} with placements {ref.placements}.")
        out[tuple(index)].copy_(local)
        if release is not None:  # this rank's slice is copied: its source pages can go now, not after the tensor
            release(local)
    origin = (0,) * ref.device_mesh.mesh.ndim
    for mesh_dim, d in shard_of.items():
        total = sum(local_size(origin, mesh_dim, j) for j in range(ref.device_mesh.mesh.shape[mesh_dim]))
        if total != full[d]:
            raise ShapeMismatchError(
                f"{key}: the shards cover {total} of {full[d]} entries along dim {d}; the rank files do not belong "
                "to one save.")


def assemble(
    key: str,
    values: Sequence[Any],
    files: Sequence[Path],
    dtype: torch.dtype | None = None,
    release: Callable[[torch.Tensor], None] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Assemble the full tensor of ``key`` from every rank's value.

    Args:
        key: the state-dict key, used in error messages.
        values: rank r's value at index r (a DTensor, or a plain tensor that must be replicated).
        files: rank r's file at index r, used in error messages.
        dtype: the dtype of the result (the conversion happens while copying, no second copy); default: stored.
        release: called with each local shard once it is copied (e.g. :meth:`MappedFiles.release`).
        out: a tensor of the full shape and ``dtype`` to fill (reusing a buffer avoids faulting in fresh pages for
            every tensor, which costs more than the copy itself); default: a new one.

    Returns:
        A new contiguous CPU tensor of the full shape.

    Raises:
        UnsupportedPlacementError, ShapeMismatchError: see :func:`tensor_spec`; shards that do not tile the tensor.
        ReplicaMismatchError: a plain tensor differs between ranks (plain tensors are never concatenated).

    Example:
        >>> full = assemble("lm_head.weight", [sd["lm_head.weight"] for sd in rank_dicts], files)  # doctest: +SKIP
    """
    spec = tensor_spec(key, values, files)
    if out is None:
        out = torch.empty(spec.shape, dtype=dtype or spec.dtype)
    elif tuple(out.shape) != spec.shape or out.dtype != (dtype or spec.dtype):
        raise InvalidOptionError(f"{key}: out has {tuple(out.shape)} {out.dtype}, expected {spec.shape} {dtype or spec.dtype}")
    if isinstance(values[0], DTensor):
        _assemble_dtensor(key, values, files, out, release)
        return out
    first = values[0]
    for r, v in enumerate(values[1:], start=1):
        if isinstance(v, DTensor) or not isinstance(v, torch.Tensor) or not torch.equal(v, first):
            raise ReplicaMismatchError(
                f"{key}: a plain (non-DTensor) tensor must be identical on every rank, but rank {r} ({files[r]}) "
                "differs from rank 0. It may be a per-rank value that cannot be merged; drop it or save it as DTensor.")
    out.copy_(first)
    if release is not None:
        for v in values:
            release(v)
    return out


# --- page release -------------------------------------------------------------------------------------------------
# torch keeps a rank file mapped for as long as any tensor loaded from it lives, and every page we touch stays resident
# (and counted in RSS) until unmapped. madvise(MADV_DONTNEED) on a clean, file-backed mapping drops those pages; a
# later access simply re-reads them from the page cache. Hand-written because neither torch nor Python expose it for
# torch's own mappings. On anonymous memory MADV_DONTNEED would *zero* the data, so pages are only released inside
# address ranges that /proc/self/maps shows as mappings of the rank files themselves.
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform.startswith("linux") else None
_MADV_DONTNEED = 4
_MADV_WILLNEED = 3
_PAGE = mmap.PAGESIZE


class MappedFiles:
    """The address ranges at which rank files are memory-mapped; releases resident pages inside them only."""

    def __init__(self) -> None:
        self._ranges: list[tuple[int, int]] = []

    def register(self, path: Path) -> None:
        """Record where ``path`` is mapped (call after ``torch.load(path, mmap=True)``). No-op off Linux."""
        if _LIBC is None:
            return
        target = os.path.realpath(path)
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n") == target:
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    self._ranges.append((lo, hi))

    def _pages(self, t: torch.Tensor) -> tuple[int, int] | None:
        """The whole pages inside ``t``'s storage, if it lies in a registered file mapping."""
        if _LIBC is None:
            return None
        local = t.to_local() if isinstance(t, DTensor) else t
        storage = local.untyped_storage()
        start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        if not any(lo <= start and end <= hi for lo, hi in self._ranges):
            return None
        lo, hi = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE
        return (lo, hi) if hi > lo else None

    def release(self, t: torch.Tensor) -> None:
        """Give back the resident pages of ``t``'s storage if it lies in a registered file mapping."""
        pages = self._pages(t)
        if pages is not None:
            _LIBC.madvise(ctypes.c_void_p(pages[0]), ctypes.c_size_t(pages[1] - pages[0]), _MADV_DONTNEED)

    def prefetch(self, t: torch.Tensor) -> None:
        """Ask the kernel to start reading ``t``'s pages from disk now (asynchronous readahead; no-op when they are
        cached already), so the next tensor's bytes arrive while the current one is assembled and written."""
        pages = self._pages(t)
        if pages is not None:
            _LIBC.madvise(ctypes.c_void_p(pages[0]), ctypes.c_size_t(pages[1] - pages[0]), _MADV_WILLNEED)


class RankShards:
    """The model state dicts of every rank, memory-mapped; hands out one assembled tensor at a time.

    Args:
        files: rank r's file at index r.
        open_rank: where rank r's bytes come from: ``open_rank(path) -> state dict`` (default: the local file,
            memory-mapped, :func:`load_rank_file`). The one seam for shards that live elsewhere (other nodes).

    Raises:
        CorruptShardError: a file cannot be read or is not a state dict.
        MissingKeyError: the ranks do not hold the same keys.
    """

    def __init__(self, files: Sequence[Path], *, open_rank: Callable[[Path], Any] = load_rank_file):
        self.files = list(files)
        self.state_dicts: list[dict[str, Any]] = []
        self.mapped = MappedFiles()
        for f in self.files:
            sd = open_rank(f)
            self.mapped.register(f)
            if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
                raise CorruptShardError(f"{f}: expected a model state dict (str -> tensor), found {type(sd).__name__}")
            self.state_dicts.append(sd)
        self.keys: list[str] = list(self.state_dicts[0])
        for f, sd in zip(self.files[1:], self.state_dicts[1:], strict=True):
            if list(sd) != self.keys:
                diff = sorted(set(self.keys) ^ set(sd))[:5]
                raise MissingKeyError(f"{f}: holds different keys than {self.files[0]} (e.g. {diff}); the rank files "
                                      "do not belong to one save.")

    def values(self, key: str) -> list[Any]:
        return [sd[key] for sd in self.state_dicts]

    def spec(self, key: str) -> TensorSpec:
        return tensor_spec(key, self.values(key), self.files)

    def aliases(self) -> dict[str, str]:
        """Keys whose rank-0 value shares storage with an earlier key (tied weights saved once by torch.save)."""
        seen: dict[tuple[int, int], str] = {}
        out = {}
        for k in self.keys:
            v = self.state_dicts[0][k]
            local = v.to_local() if isinstance(v, DTensor) else v
            ident = (int(local.untyped_storage().data_ptr()), int(local.storage_offset()))
            if ident in seen:
                out[k] = seen[ident]
            else:
                seen[ident] = k
        return out

    def assemble(self, key: str, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        return assemble(key, self.values(key), self.files, dtype, release=self.mapped.release, out=out)

    def prefetch(self, key: str) -> None:
        """Start reading every rank's bytes of ``key`` in the background (see :meth:`MappedFiles.prefetch`)."""
        for v in self.values(key):
            if isinstance(v, torch.Tensor):
                self.mapped.prefetch(v)
