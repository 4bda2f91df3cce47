"""Read veRL's pickled trainer state without running code, and write a clean copy that veRL may load.

veRL 0.9.1 loads ``extra_state_world_size_W_rank_r.pt`` (lr scheduler, RNG states) and ``data.pt`` (the
``StatefulDataLoader`` position) with ``torch.load(weights_only=False)``: a full unpickler, so a file planted in a
Hub repo or a checkpoint folder would run code on every machine that resumes from it. This project therefore never
hands veRL bytes it got from elsewhere. Every such file is

1. loaded with ``weights_only=True`` plus an allow-list of exactly the extra types veRL's state holds (numpy's
   ``ndarray``/``dtype``/``_reconstruct`` for ``np.random.get_state()``; tensors, dicts, lists, tuples, numbers,
   strings are torch's own safe set), so a foreign global (``posix.system``, ``builtins.eval``, ...) is refused
   before anything is called;
2. checked (numpy arrays must be numeric: an object array would be a second pickle inside);
3. written again with ``torch.save`` from the validated objects: the new file's pickle holds only those types.

Example:
    >>> state = rewrite_trainer_state(src / "data.pt", dst / "data.pt")  # doctest: +SKIP
    >>> load_trainer_state(src / "extra_state_world_size_2_rank_0.pt")["lr_scheduler"]["last_epoch"]  # doctest: +SKIP
    3
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from utils.checkpoint.errors import CorruptShardError, UnsafePickleError

__all__ = ["load_trainer_state", "rewrite_trainer_state", "check_weights_pickle", "unsafe_pickle_error",
           "refused_global"]

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_NUMERIC_DTYPE_CLASSES = ("BoolDType", "Int8DType", "Int16DType", "Int32DType", "Int64DType", "UInt8DType",
                          "UInt16DType", "UInt32DType", "UInt64DType", "Float16DType", "Float32DType", "Float64DType",
                          "ByteDType", "UByteDType", "ShortDType", "UShortDType", "IntDType", "UIntDType", "LongDType",
                          "ULongDType", "LongLongDType", "ULongLongDType")


def _numpy_globals() -> list[Any]:
    """numpy's types in ``np.random.get_state()`` (the one non-torch type in veRL's RNG state)."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    # numpy >= 1.25 pickles a dtype through its class (np.dtypes.UInt32DType for the MT19937 key): numeric only.
    numeric = [getattr(np.dtypes, n, None) for n in _NUMERIC_DTYPE_CLASSES] if hasattr(np, "dtypes") else []
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, *[c for c in numeric if c is not None]]


def refused_global(exc: BaseException) -> str | None:
    """The global a ``weights_only`` load refused (``"posix.system"``), read from torch's message, else ``None``.

    Example:
        >>> refused_global(ValueError("Trying to load unsupported GLOBAL posix.system whose module posix is blocked"))
        'posix.system'
    """
    match = _GLOBAL.search(str(exc))
    return match.group(1) if match else None


def unsafe_pickle_error(path: Path, exc: BaseException, what: str) -> UnsafePickleError:
    """The one-line error for a refused file; never repeats torch's hint to retry with ``weights_only=False``."""
    name = refused_global(exc)
    found = f"the pickled global {name}" if name else "a pickled object outside the allow-list"
    return UnsafePickleError(
        f"{path}: refused to load {what}: it holds {found}, which a genuine veRL file never contains (unpickling it "
        "could run code). Nothing from it was executed. Do not use this file; take it from a source you trust.")


def _check_values(obj: Any, path: Path, where: str = "") -> None:
    import numpy as np

    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_values(v, path, f"{where}[{k!r}]")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _check_values(v, path, f"{where}[{i}]")
    elif isinstance(obj, np.ndarray) and obj.dtype.kind not in "biuf":
        raise UnsafePickleError(f"{path}: refused: {where or 'the value'} is a numpy array of dtype {obj.dtype}; veRL's "
                                "state holds numeric arrays only (an object array carries a nested pickle).")


def load_trainer_state(path: str | Path, *, what: str = "veRL trainer state") -> Any:
    """Load ``extra_state_*.pt`` / ``data.pt`` with ``weights_only=True`` and the allow-list; never runs code.

    Raises:
        UnsafePickleError: the file holds a type outside the allow-list (nothing was executed).
        CorruptShardError: the file is missing, truncated or not a torch archive.
    """
    import torch

    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise unsafe_pickle_error(path, e, what) from e
    except Exception as e:  # truncated zip, not a torch file, I/O error
        raise CorruptShardError(f"{path}: cannot be read as {what} ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200] if str(e) else ''}); the file is truncated or "
                                "corrupt.") from e
    _check_values(obj, path)
    return obj


def rewrite_trainer_state(src: str | Path, dst: str | Path, *, what: str = "veRL trainer state") -> Any:
    """Validate ``src`` (see :func:`load_trainer_state`) and write it to ``dst`` with a fresh ``torch.save``.

    The new file is built from the validated objects only, so veRL's ``weights_only=False`` load of it cannot run
    anything. Written to a temporary name beside ``dst`` and renamed: a crash never leaves half a file.

    Returns:
        The validated object.
    """
    import torch

    obj = load_trainer_state(src, what=what)
    dst = Path(dst)
    # Saved under its final file name (torch names the archive after it, as veRL's own torch.save(path) does, so
    # an unchanged state round-trips byte for byte), in a private folder beside dst, then renamed into place.
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        torch.save(obj, tmp / dst.name)
        os.replace(tmp / dst.name, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return obj


def check_weights_pickle(path: str | Path, *, what: str = "weights") -> None:
    """Open a pickled weights file (``pytorch_model*.bin``, ``optimizer.pt``) with ``weights_only=True`` and drop it.

    Memory-mapped: only the pickle is parsed. Lets a caller fail with the file's name *before* it starts worker
    processes (whose own failure would surface as a bare ``ProcessRaisedException``).

    Raises:
        UnsafePickleError, CorruptShardError: as :func:`load_trainer_state`.
    """
    import torch

    path = Path(path)
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise unsafe_pickle_error(path, e, what) from e
    except Exception as e:  # noqa: BLE001 - truncated, not a torch archive
        raise CorruptShardError(f"{path}: cannot be read as {what} ({type(e).__name__}); the file is truncated or "
                                "corrupt.") from e
