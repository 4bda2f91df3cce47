"""The output dtype vocabulary shared by every entry point, without importing torch.

The uploader checks ``dtype`` when it is built (before any Hub call) and the training entry point builds an uploader
before Ray starts: importing torch there would cost seconds on every bad config. :mod:`utils.checkpoint.model_config`
maps these names to torch dtypes.
"""

from __future__ import annotations

__all__ = ["DTYPE_NAMES", "normalize_dtype"]

DTYPE_NAMES = ("fp32", "bf16", "fp16")
_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


def normalize_dtype(name: str) -> str:
    """``auto`` or one of :data:`DTYPE_NAMES`, also accepting torch's names (``bfloat16``, ``float16``, ``float32``).

    The one check every entry point (consolidation CLI, uploader, config) runs before any work starts.

    Raises:
        ValueError: anything else, listing the accepted names.

    Example:
        >>> normalize_dtype("bfloat16"), normalize_dtype("BF16"), normalize_dtype("auto")
        ('bf16', 'bf16', 'auto')
    """
    key = str(name).strip().lower().removeprefix("torch.")
    key = _ALIASES.get(key, key)
    if key != "auto" and key not in DTYPE_NAMES:
        raise ValueError(f"dtype={name!r}: expected auto, bf16, fp16 or fp32 (or bfloat16, float16, float32)")
    return key
