"""Check an uploaded revision: download it, compare sha256 with the Hub's record and with a local consolidation of
the checkpoint, and load it with transformers.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub.utils.sha import sha_fileobj

from utils.hub.client import HubClient
from utils.hub.errors import VerificationError

__all__ = ["VerifyReport", "verify_upload", "sha256_of"]

logger = logging.getLogger(__name__)
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
_IGNORED = {"README.md", ".gitattributes"}


@dataclass
class VerifyReport:
    """The outcome of :func:`verify_upload`. ``ok`` is true when no problem was found."""

    repo_id: str
    revision: str
    commit: str | None
    files: dict[str, str] = field(default_factory=dict)  # path -> sha256 of the downloaded bytes
    problems: list[str] = field(default_factory=list)
    compared: int = 0
    loaded: bool | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        lines = [f"{self.repo_id}@{self.revision}: {len(self.files)} file(s) downloaded, {self.compared} compared "
                 f"with the local consolidation, loadable: {self.loaded}, {self.seconds:.1f}s"]
        lines += [f"  PROBLEM {p}" for p in self.problems]
        lines.append("OK" if self.ok else f"FAILED ({len(self.problems)} problem(s))")
        return "\n".join(lines)


def sha256_of(path: Path, chunk: int = 8 << 20) -> str:
    """Streamed sha256 of one file (hex), as the Hub records it for LFS files."""
    with open(path, "rb") as f:
        return sha_fileobj(f, chunk).hex()


def verify_upload(
    repo_id: str,
    revision: str = "main",
    against: str | Path | None = None,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    weights_format: str | None = None,
    dtype: str | None = None,
    load: bool = True,
    raise_on_problem: bool = True,
) -> VerifyReport:
    """Download ``repo_id@revision`` and check it.

    Args:
        repo_id: The repo.
        revision: ``main``, ``step-N`` or a commit.
        against: A checkpoint (``global_step_N``) to consolidate locally and compare file by file (sha256).
        token, endpoint: As for the uploader.
        weights_format, dtype: For the local consolidation; inferred from the remote files and ``config.json``.
        load: Load the model with transformers and run one forward pass.
        raise_on_problem: Raise :class:`VerificationError` when a problem is found (else only report it).

    Returns:
        A :class:`VerifyReport`.

    Raises:
        VerificationError: with ``raise_on_problem`` and any mismatch, missing file or load failure.
    """
    t0 = time.perf_counter()
    client = HubClient(token=token, endpoint=endpoint)
    work = Path(tempfile.mkdtemp(prefix="hf_verify_"))
    try:
        commit = client.check_readable(repo_id, revision)  # says which: no token, bad token, no repo, no revision
        remote = client.tree(repo_id, commit)
        local_dir = Path(client.api.snapshot_download(repo_id, revision=commit, local_dir=work / "hub"))
        report = VerifyReport(repo_id, revision, commit)
        for path, entry in sorted(remote.items()):
            got = sha256_of(local_dir / path)
            report.files[path] = got
            if entry.sha256 is not None and got != entry.sha256:
                report.problems.append(f"{path}: downloaded sha256 {got[:12]} != Hub record {entry.sha256[:12]}")
        if against is not None:
            _compare_with_local(report, local_dir, Path(against), work / "local", weights_format, dtype)
        if load:
            report.loaded = _loads(local_dir, report)
        report.seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if raise_on_problem and not report.ok:
        raise VerificationError(f"{repo_id}@{revision} failed verification: " + "; ".join(report.problems[:5]))
    return report


def _compare_with_local(report: VerifyReport, hub_dir: Path, ckpt: Path, out: Path, weights_format: str | None,
                        dtype: str | None) -> None:
    import json

    from utils.checkpoint.consolidate import consolidate_checkpoint

    names = set(report.files)
    fmt = weights_format or ("safetensors" if any(n.endswith(".safetensors") for n in names) else "bin")
    if dtype is None:
        cfg = json.loads((hub_dir / "config.json").read_text()) if (hub_dir / "config.json").exists() else {}
        stored = cfg.get("dtype") or cfg.get("torch_dtype") or "auto"
        dtype = _DTYPE_ALIASES.get(str(stored), str(stored))
    consolidate_checkpoint(ckpt, out, weights_format=fmt, dtype=dtype, include_optimizer="optimizer.pt" in names,
                           progress=False)
    local = {p.relative_to(out).as_posix(): sha256_of(p) for p in sorted(out.rglob("*")) if p.is_file()}
    for path, digest in local.items():
        if path not in report.files:
            report.problems.append(f"{path}: in the local consolidation but not on the Hub")
        elif report.files[path] != digest:
            report.problems.append(f"{path}: sha256 on the Hub {report.files[path][:12]} != local {digest[:12]}")
        else:
            report.compared += 1
    extra = sorted(names - set(local) - _IGNORED)
    report.problems += [f"{p}: on the Hub but not in the local consolidation" for p in extra]


def _loads(model_dir: Path, report: VerifyReport) -> bool:
    try:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
        if not torch.isfinite(logits).all():
            report.problems.append("model loads but produces non-finite logits")
            return False
        return True
    except Exception as e:  # noqa: BLE001 - any load failure is a verification finding
        report.problems.append(f"transformers cannot load the model: {type(e).__name__}: {str(e).splitlines()[0]}")
        return False
