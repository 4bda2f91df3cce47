"""Check an uploaded revision: download it, compare sha256 with the Hub's record and with a local consolidation of
the checkpoint, and load it with transformers.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub.utils.sha import sha_fileobj

from utils.checkpoint.tempdirs import make_owned_temp_dir, remove_owned, sweep_stale
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
    namespace: str = "",
) -> VerifyReport:
    """Download ``repo_id@revision`` (only ``namespace``'s subfolder when given) and check it.

    A resume snapshot (``strategy=checkpoint``: ``optimizer.pt``, ``resume/``, ``trainer_state.json``) is checked
    against its own ``trainer_state.json`` (sha256 of every file) and, with ``against``, the trainer state files are
    compared with a fresh re-serialization of the local step's state.

    Args:
        repo_id: The repo.
        revision: ``main``, ``step-N`` or a commit.
        against: A checkpoint (``global_step_N``) to consolidate locally and compare file by file (sha256).
        token, endpoint: As for the uploader.
        weights_format, dtype: For the local consolidation; inferred from the remote files and ``config.json``.
        load: Load the model with transformers and run one forward pass.
        raise_on_problem: Raise :class:`VerificationError` when a problem is found (else only report it).
        namespace: The experiment's subfolder of the repo (``""``: the repo root).

    Returns:
        A :class:`VerifyReport`.

    Raises:
        VerificationError: with ``raise_on_problem`` and any mismatch, missing file or load failure.
    """
    from utils.hub.push import tag_for_step
    from utils.hub.resume_state import TRAINER_STATE_FILE, read_trainer_state, snapshot_problems

    t0 = time.perf_counter()
    client = HubClient(token=token, endpoint=endpoint)
    sweep_stale(tempfile.gettempdir(), "hf_verify_")  # left by a killed verify: provably ours and stale
    work = make_owned_temp_dir(tempfile.gettempdir(), "hf_verify_")
    try:
        ns = namespace.strip("/")
        prefix = f"{ns}/" if ns else ""
        if ns and (revision.isdigit() or (revision.startswith("step-") and revision[5:].isdigit())):
            revision = tag_for_step(int(revision.removeprefix("step-")), ns)  # step-2 -> exp-step-2
        commit = client.check_readable(repo_id, revision)  # says which: no token, bad token, no repo, no revision
        remote = client.tree(repo_id, commit, prefix=ns)
        if ns:  # only this experiment's own files (not a nested namespace's)
            remote = {p: e for p, e in remote.items() if p.startswith(prefix)}
        local_dir = Path(client.api.snapshot_download(repo_id, revision=commit, local_dir=work / "hub",
                                                      allow_patterns=[f"{prefix}*"] if ns else None))
        model_dir = local_dir / ns if ns else local_dir
        report = VerifyReport(repo_id, revision + (f" (namespace {ns})" if ns else ""), commit)
        if not remote:
            report.problems.append(f"no files under {prefix or 'the repo root'} at {revision}")
        for path, entry in sorted(remote.items()):
            got = sha256_of(local_dir / path)
            report.files[path[len(prefix):]] = got
            if entry.sha256 is not None and got != entry.sha256:
                report.problems.append(f"{path}: downloaded sha256 {got[:12]} != Hub record {entry.sha256[:12]}")
        state = read_trainer_state(model_dir) if TRAINER_STATE_FILE in report.files else None
        if state is not None:  # a resume snapshot: every file it lists must be there with its sha256
            report.problems += [f"{prefix}{p}" for p in snapshot_problems(model_dir, state)]
        if against is not None:
            _compare_with_local(report, model_dir, Path(against), work / "local", weights_format, dtype, state)
        if load:
            report.loaded = _loads(model_dir, report)
        report.seconds = time.perf_counter() - t0
    finally:
        remove_owned(work)
    if raise_on_problem and not report.ok:
        raise VerificationError(f"{repo_id}@{revision} failed verification: " + "; ".join(report.problems[:5]))
    return report


def _compare_with_local(report: VerifyReport, hub_dir: Path, ckpt: Path, out: Path, weights_format: str | None,
                        dtype: str | None, state: dict | None = None) -> None:
    import json

    from utils.checkpoint.consolidate import consolidate_checkpoint
    from utils.hub.resume_state import TRAINER_STATE_FILE, stage_resume_files

    names = set(report.files)
    fmt = weights_format or ("safetensors" if any(n.endswith(".safetensors") for n in names) else "bin")
    if dtype is None:
        cfg = json.loads((hub_dir / "config.json").read_text()) if (hub_dir / "config.json").exists() else {}
        stored = cfg.get("dtype") or cfg.get("torch_dtype") or "auto"
        dtype = _DTYPE_ALIASES.get(str(stored), str(stored))
    res = consolidate_checkpoint(ckpt, out, weights_format=fmt, dtype=dtype,
                                 include_optimizer="optimizer.pt" in names, progress=False)
    if state is not None:  # the snapshot's trainer state, re-serialized from the local step as the upload did
        step_dir = ckpt.resolve().parent if ckpt.resolve().name == "actor" else ckpt.resolve()
        stage_resume_files(step_dir, out, step=int(state.get("global_step", res.step or 0)),
                           world_size=res.world_size)
    local = {p.relative_to(out).as_posix(): sha256_of(p) for p in sorted(out.rglob("*")) if p.is_file()
             and p.relative_to(out).as_posix() != TRAINER_STATE_FILE}  # checked through its own sha256 list
    for path, digest in local.items():
        if path not in report.files:
            report.problems.append(f"{path}: in the local consolidation but not on the Hub")
        elif report.files[path] != digest:
            report.problems.append(f"{path}: sha256 on the Hub {report.files[path][:12]} != local {digest[:12]}")
        else:
            report.compared += 1
    extra = sorted(names - set(local) - _IGNORED - {TRAINER_STATE_FILE})
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
