"""Command-line face of the uploader: ``python utils/hf_uploader.py upload|backfill|resume|verify ...``.

Exit codes: 0 success, 1 an upload/verification failed (one clear ``error:`` line on stderr), 2 bad arguments.
The token is read from ``HF_TOKEN`` or ``hf auth login`` only (a ``--token`` flag would show in ``ps`` and shell
history).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

import httpx
from huggingface_hub.errors import RepositoryNotFoundError

from utils.checkpoint.tempdirs import make_owned_temp_dir, remove_owned, sweep_stale, terminate_as_interrupt
from utils.hub.errors import HubUnreachableError, HubUploadError, redact

__all__ = ["main", "build_parser"]

logger = logging.getLogger("utils.hf_uploader")


def _steps(text: str) -> list[int]:
    try:
        return [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--steps wants comma-separated integers like 100,200, got {text!r}") from e


def _dtype_arg(text: str) -> str:
    from utils.checkpoint.dtype_names import normalize_dtype

    try:
        return normalize_dtype(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the four sub-commands."""
    p = argparse.ArgumentParser(prog="python utils/hf_uploader.py",
                                description="Consolidate veRL FSDP checkpoints and push them to the Hugging Face Hub.")
    p.add_argument("--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or https://huggingface.co)")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="command", required=True)

    def repo_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--repo-id", required=True, help="user/name, org/name, or name with --organization")
        sp.add_argument("--organization", default=None)
        sp.add_argument("--private", action="store_true", help="create the repo private (recommended)")
        sp.add_argument("--optimizer-save-mode", default=None, help="'full' to also upload optimizer.pt")
        sp.add_argument("--format", dest="weights_format", default="bin", choices=["bin", "safetensors"])
        sp.add_argument("--dtype", default="auto", type=_dtype_arg,
                        help="auto (checkpoint's config dtype), bf16, fp16 or fp32 (bfloat16, float16, float32 too)")
        sp.add_argument("--max-shard-size", default="5GB")
        sp.add_argument("--model-name", default=None, help="base model folder: fallback for config/tokenizer")
        sp.add_argument("--no-model-card", dest="model_card", action="store_false")
        sp.add_argument("--staging-dir", default=None, help="where to consolidate (default: TMPDIR)")
        sp.add_argument("--strategy", default="end", choices=["end", "every_save", "checkpoint"],
                        help="checkpoint: also upload optimizer.pt + trainer state (a resume snapshot)")
        sp.add_argument("--namespace", default="", help="subfolder of the repo for this experiment")
        sp.add_argument("--lora", default="adapter", choices=["adapter", "merged", "both"],
                        help="LoRA checkpoints: the PEFT adapter (default), the merged model, or both")
        sp.add_argument("--lora-base-model", default=None, help="the adapter's base model (a Hub id)")

    up = sub.add_parser("upload", help="consolidate one checkpoint and upload it")
    up.add_argument("checkpoint_dir", help=".../global_step_N (or its actor/ folder)")
    repo_args(up)
    up.add_argument("--step", type=int, default=None, help="default: N of global_step_N")
    up.add_argument("--commit-message", default=None)
    up.add_argument("--dry-run", action="store_true", help="print the plan (files, sizes, revision); write nothing")

    bf = sub.add_parser("backfill", help="upload every global_step_* of a run directory, in order")
    bf.add_argument("run_dir")
    repo_args(bf)
    bf.add_argument("--steps", type=_steps, default=None, help="only these steps, e.g. 100,200")

    rs = sub.add_parser("resume", help="finish uploads that left upload_pending.json behind")
    rs.add_argument("run_dir", nargs="?", default=".", help="searched recursively (default: .)")

    vf = sub.add_parser("verify", help="download a revision and check sha256 and loadability")
    vf.add_argument("--repo-id", required=True)
    vf.add_argument("--revision", default="main")
    vf.add_argument("--against", default=None, help="checkpoint to consolidate locally and compare with")
    vf.add_argument("--format", dest="weights_format", default=None, choices=["bin", "safetensors"])
    vf.add_argument("--dtype", default=None, type=_dtype_arg)
    vf.add_argument("--no-load", dest="load", action="store_false", help="skip the transformers load check")
    vf.add_argument("--namespace", default="", help="the experiment's subfolder of the repo (default: the root)")
    pl = sub.add_parser("pull", help="download the newest complete resume snapshot and write veRL's checkpoint "
                                     "layout for a world size")
    pl.add_argument("--repo-id", required=True)
    pl.add_argument("--namespace", default="", help="the experiment's subfolder (default: the repo root)")
    pl.add_argument("--revision", default=None, help="step-N (or N); default: the newest complete snapshot")
    pl.add_argument("--world-size", type=int, required=True, help="GPUs of the run that will load it")
    pl.add_argument("--out", required=True, help="run directory (veRL's trainer.default_local_dir)")
    pl.add_argument("--weights-only", action="store_true", help="accept a snapshot without optimizer state")
    for sp in (up, bf, rs, vf, pl):  # accepted after the sub-command too
        sp.add_argument("--endpoint", default=argparse.SUPPRESS, help="Hub URL (default: HF_ENDPOINT)")
    return p


def _uploader(args: argparse.Namespace):
    from utils.hub.uploader import HuggingFaceUploader

    return HuggingFaceUploader(args.repo_id, args.organization, args.private, args.optimizer_save_mode,
                               endpoint=args.endpoint, weights_format=args.weights_format, dtype=args.dtype,
                               max_shard_size=args.max_shard_size, model_card=args.model_card,
                               staging_dir=args.staging_dir, strategy=args.strategy, namespace=args.namespace,
                               lora=args.lora, lora_base_model=args.lora_base_model)


def _cmd_upload(args: argparse.Namespace) -> int:
    up = _uploader(args)
    if args.dry_run:
        return _dry_run(up, args)
    res = up.upload_from_checkpoint_dir(args.checkpoint_dir, args.model_name, args.step,
                                        commit_message=args.commit_message)
    print(res.summary())
    return 0


def _dry_run(up, args: argparse.Namespace) -> int:
    """Consolidate into a temporary folder, compare with the remote using reads only, print the plan, delete."""
    step = up.check_local(Path(args.checkpoint_dir), args.step)
    # A plan is a few reads: fail at once when the Hub does not answer (no 20 s of retries), naming where we asked.
    up.client.max_attempts = 1
    notes = []
    exists = True
    if up.client.has_token:
        report = up.preflight(create=False)  # reads only: whoami, repo_info
        notes.append(f"user {report.user}; repo {'private' if report.private else 'PUBLIC'}")
    else:
        notes.append("no token found (HF_TOKEN): a real upload would fail at preflight")
    parent = up.staging_dir or Path(tempfile.gettempdir())
    sweep_stale(parent, "hf_dry_run_")
    staging = make_owned_temp_dir(parent, "hf_dry_run_")
    try:
        res = up._consolidate(Path(args.checkpoint_dir), staging / "model", step, args.model_name)
        try:
            plan = up.plan(staging / "model", step)
            print(plan.describe())
        except RepositoryNotFoundError:
            exists = False
        except (httpx.TransportError, OSError) as e:
            raise HubUnreachableError(
                f"dry run: cannot reach the Hub at {up.client.endpoint} ({type(e).__name__}: {_first_line(e)}); the "
                f"plan compares with the repo there. The endpoint comes from --endpoint or HF_ENDPOINT "
                f"({'HF_ENDPOINT=' + os.environ['HF_ENDPOINT'] if os.environ.get('HF_ENDPOINT') else 'HF_ENDPOINT is unset'}"
                "); check the network or point it at a reachable Hub.") from None
        if not exists or not up.client.has_token:
            files = sorted(p for p in (staging / "model").rglob("*") if p.is_file())
            print(f"{up.repo_id} (to be created, {'private' if up.private else 'PUBLIC'}) @ main -> tag step-{step}")
            for f in files:
                print(f"  new       {f.stat().st_size / 1e6:12.3f} MB  {f.relative_to(staging / 'model')}")
            print(f"  README.md: {'generated' if up.model_card else 'none'}")
        print(f"dry run: {'; '.join(notes)}; consolidation {res.dtype}, world size {res.world_size}; nothing written "
              "to the Hub")
    finally:
        remove_owned(staging)
    return 0


def _cmd_backfill(args: argparse.Namespace) -> int:
    rows = _uploader(args).backfill(args.run_dir, args.steps)
    print(f"{'step':>8}  {'status':8}  {'tag':16}  {'commit':8}  {'seconds':>8}  message")
    for r in rows:
        print(f"{r.step:>8}  {r.status:8}  {r.tag:16}  {r.commit_sha[:8]:8}  {r.seconds:8.1f}  {r.message}")
    failed = [r for r in rows if r.status == "failed"]
    print(f"backfill: {sum(r.status == 'uploaded' for r in rows)} uploaded, "
          f"{sum(r.status == 'skipped' for r in rows)} skipped, {len(failed)} failed")
    return 1 if failed else 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from utils.hub.uploader import resume_pending

    outcomes = resume_pending(args.run_dir, endpoint=args.endpoint)
    if not outcomes:
        print(f"no upload_pending.json under {args.run_dir}: nothing to resume")
        return 0
    failed = 0
    for step_dir, out in outcomes:
        if isinstance(out, Exception):
            failed += 1
            print(f"{step_dir}: FAILED {str(out).splitlines()[0]}")
        else:
            print(f"{step_dir}: {out.summary()}")
    return 1 if failed else 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from utils.hub.verify import verify_upload

    report = verify_upload(args.repo_id, args.revision, args.against, endpoint=args.endpoint,
                           weights_format=args.weights_format, dtype=args.dtype, load=args.load,
                           raise_on_problem=False, namespace=args.namespace)
    print(report.describe())
    return 0 if report.ok else 1


def _cmd_pull(args: argparse.Namespace) -> int:
    from utils.hub.snapshots import pull_snapshot

    snap, step_dir = pull_snapshot(args.repo_id, args.out, args.world_size, args.namespace, revision=args.revision,
                                   endpoint=args.endpoint, allow_weights_only=args.weights_only)
    what = "model + optimizer + trainer state" if snap.resumable else "model weights only"
    print(f"{args.repo_id}@{snap.tag} ({snap.commit[:8]}): {what} -> {step_dir} (world size {args.world_size}); "
          f"start veRL with trainer.default_local_dir={Path(args.out).resolve()} trainer.resume_mode=auto")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = {"upload": _cmd_upload, "backfill": _cmd_backfill, "resume": _cmd_resume, "verify": _cmd_verify,
               "pull": _cmd_pull}
    try:
        with terminate_as_interrupt():  # SIGTERM unwinds like Ctrl-C: staging folders are removed on the way out
            return handler[args.command](args)
    except HubUploadError as e:
        print(f"error: {redact(_first_line(e), os.environ.get('HF_TOKEN'))}{_details(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", None)
        print(f"{f'terminated (signal {signum})' if signum else 'interrupted'}: temporary files removed; run the "
              "same command again (uploads are idempotent; a failed one left upload_pending.json for `resume`)",
              file=sys.stderr)
        return 128 + (signum or 2)
    except Exception as e:  # noqa: BLE001 - the engine's errors and anything unexpected: one line, non-zero exit
        print(f"error: {type(e).__name__}: {redact(_first_line(e), os.environ.get('HF_TOKEN'))}{_details(e)}",
              file=sys.stderr)
        return 1


def _details(e: BaseException) -> str:
    """`` (details: LOG)``: the full traceback, token removed, goes to a log file (utils/errlog.py)."""
    from utils.errlog import log_traceback

    path = log_traceback(e, name="hf_uploader")
    return f" (details: {path})" if path else ""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
