"""Every specific exception the checkpoint tools raise, in one place.

Each class subclasses :class:`CheckpointError` *and* the closest builtin, so callers can catch either our family
(``except CheckpointError``) or the builtin they already expect (``except FileNotFoundError``, ``except ValueError``).
Messages name the file or key at fault and say what to do about it.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "NotACheckpointError",
    "MissingRankFileError",
    "CorruptShardError",
    "WorldSizeMismatchError",
    "MixedWorldSizeError",
    "ShapeMismatchError",
    "MissingKeyError",
    "ReplicaMismatchError",
    "UnsupportedPlacementError",
    "OutputExistsError",
    "OutputNotWritableError",
    "OutputVerificationError",
    "FSDP1OptimizerError",
    "OptimizerMismatchError",
    "MissingModelConfigError",
    "InvalidModelConfigError",
    "TiedWeightMismatchError",
    "UnsafePickleError",
    "OutputSpaceError",
    "CheckpointVanishedError",
    "InvalidOptionError",
    "ReshardError",
    "RankSourceError",
    "RankFileUnavailableError",
]


class CheckpointError(Exception):
    """Base class of every error raised while reading a veRL checkpoint or writing its consolidated form."""


class NotACheckpointError(CheckpointError, FileNotFoundError):
    """The directory holds no veRL FSDP checkpoint (no ``model_world_size_*_rank_*.pt``, no ``global_step_*``)."""


class MissingRankFileError(CheckpointError, FileNotFoundError):
    """One or more of the rank files ``model_world_size_{W}_rank_{r}.pt`` for ranks ``0..W-1`` is absent."""


class CorruptShardError(CheckpointError, ValueError):
    """A rank file cannot be read: truncated, not a torch zip archive, or not a state dict."""


class WorldSizeMismatchError(CheckpointError, ValueError):
    """``fsdp_config.json`` states a world size that the rank files on disk disagree with."""


class MixedWorldSizeError(CheckpointError, ValueError):
    """Rank files of two or more world sizes sit in the same directory (a resumed run at a new size)."""


class ShapeMismatchError(CheckpointError, ValueError):
    """A merged tensor's shape differs from the shape the model config implies, or shards do not add up."""


class MissingKeyError(CheckpointError, KeyError):
    """A key the model config requires is absent from the checkpoint, or the checkpoint has a key it does not."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


class ReplicaMismatchError(CheckpointError, ValueError):
    """A plain (non-DTensor) tensor, which must be replicated, differs between ranks."""


class UnsupportedPlacementError(CheckpointError, ValueError):
    """A DTensor placement the merge cannot assemble exactly: ``Partial``, ``_StridedShard`` (FSDP + TP), ..."""


class OutputExistsError(CheckpointError, FileExistsError):
    """The output directory exists and is not empty; pass ``overwrite=True`` (CLI ``--overwrite``) to replace it."""


class OutputNotWritableError(CheckpointError, PermissionError):
    """The output directory (or the temporary folder beside it) cannot be created or written."""


class OutputVerificationError(CheckpointError, ValueError):
    """The files just written do not match what was planned (keys, shapes, dtypes, sizes or values)."""


class FSDP1OptimizerError(CheckpointError, ValueError):
    """FSDP1 optimizer files hold flat-parameter shards, which cannot be mapped back to parameter names."""


class OptimizerMismatchError(CheckpointError, ValueError):
    """The optimizer files do not line up with the model's parameters (count, order or shapes)."""


class MissingModelConfigError(CheckpointError, FileNotFoundError):
    """Neither the checkpoint's ``huggingface/`` folder nor ``base_model`` provides a ``config.json``."""


class InvalidModelConfigError(CheckpointError, ValueError):
    """``config.json`` cannot be parsed, or transformers cannot build a model from it."""


class TiedWeightMismatchError(CheckpointError, ValueError):
    """The config ties two weights (``tie_word_embeddings``) but the checkpoint holds them with different values."""


class UnsafePickleError(CheckpointError, ValueError):
    """A pickled file holds objects outside the allow-list (e.g. a callable that would run code when unpickled).

    Raised instead of loading it: nothing in the file was executed. The message names the file and the refused
    global (``posix.system``, ...).
    """


class OutputSpaceError(CheckpointError, OSError):
    """The output filesystem has (or had, mid-write) less free space than the consolidated model needs."""


class CheckpointVanishedError(CheckpointError, FileNotFoundError):
    """The checkpoint's files disappeared while they were being read (deleted or moved, e.g. by rotation)."""


class InvalidOptionError(CheckpointError, ValueError):
    """An argument of the engine is not one it supports (weights format, dtype, shard size, output buffer)."""


class ReshardError(CheckpointError, ValueError):
    """The snapshot cannot be turned into veRL shards (missing files, a run directory that already has the step)."""


class RankSourceError(CheckpointError, ConnectionError):
    """A holder of rank files (another node's disk, reached through :mod:`utils.checkpoint.sources`) cannot be read."""


class RankFileUnavailableError(CheckpointError, FileNotFoundError):
    """A rank file the consolidation needs is on no reachable node; the message names the rank and the node."""
