"""Push one consolidated folder as one step: plan against the remote, commit, tag. Idempotent by construction.

The rules:
- ``main`` holds the newest step at its root; a step older than the newest one already tagged is committed on a
  short-lived branch (from ``main``), tagged, and the branch deleted, so ``main`` never goes back in time; and
  right before every commit attempt on ``main`` its history is re-read (the attempt names that head as its parent):
  if a newer step of the same namespace landed meanwhile (a concurrent upload, maybe not tagged yet), the stale step
  is re-planned onto a temporary branch and only gets its tag;
- every upload is tagged ``step-N`` (``<namespace>-step-N`` with a namespace: one experiment per subfolder);
- weight files of an earlier upload that the new one does not have (e.g. bin -> safetensors, fewer shards) are
  deleted in the same commit; other files someone added by hand are left alone;
- ``README.md`` is (re)generated only when the remote one is absent or is an unedited card of ours;
- nothing is sent twice: an existing tag with the same bytes means "already done"; a branch that already holds
  every file means a lost commit landed, and only the tag is created; inside a commit the client skips unchanged
  files (preupload oids) and the server skips LFS objects it stores.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.hub.card import is_generated_card
from utils.hub.client import HubClient, LocalFile, local_files
from utils.hub.errors import TagConflictError

__all__ = ["PushPlan", "PushOutcome", "plan_push", "execute_push", "tag_for_step", "step_on_main", "MANAGED_PATTERNS",
           "NewerStepOnMainError"]

logger = logging.getLogger(__name__)

# Files an upload owns: stale ones are deleted when a newer upload does not have them. Anything else (a LICENSE, eval
# results added by hand, other namespaces' folders) is never deleted.
MANAGED_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json", "model*.safetensors",
                    "model.safetensors.index.json", "optimizer.pt", "trainer_state.json",
                    "adapter_config.json", "adapter_model.safetensors")  # fmt: skip
README = "README.md"


def tag_for_step(step: int, namespace: str = "") -> str:
    """The tag of one upload: ``step-N``, or ``<namespace>-step-N`` inside a namespace.

    No ``/`` in tags: git allows it, but Hub-compatible servers may not, and a tag that looks like a path is easy to
    mistake for a file in the repo; a nested namespace ``team/exp`` becomes ``team-exp-step-N``.

    Example:
        >>> tag_for_step(300), tag_for_step(300, "exp-a"), tag_for_step(7, "team/exp-b/")
        ('step-300', 'exp-a-step-300', 'team-exp-b-step-7')
    """
    ns = namespace.strip("/").replace("/", "-")
    return f"{ns}-step-{int(step)}" if ns else f"step-{int(step)}"


def _step_of_tag(tag: str, namespace: str) -> int | None:
    prefix = tag_for_step(0, namespace)[:-1]  # "step-" or "ns-step-"
    rest = tag[len(prefix):] if tag.startswith(prefix) else ""
    return int(rest) if rest.isdigit() else None


@dataclass
class PushPlan:
    """What a push would do, computed with reads only (the dry run prints it).

    Attributes:
        tag: ``step-N`` of this upload.
        branch: ``main``, or the temporary branch for a step older than the newest tagged one.
        base_commit: The commit the branch starts from (``None`` for an empty repo).
        files: Every file of the upload with its status: ``new``, ``changed`` or ``unchanged``.
        deletions: Stale managed files to delete.
        readme: ``generated`` (ours, written), ``kept`` (a hand-written README is left alone) or ``none``.
        already_tagged: The tag exists with identical weights: nothing to do.
        landed_commit: The branch already holds everything (a lost commit landed): only the tag is missing.
    """

    repo_id: str
    step: int
    tag: str
    branch: str
    base_commit: str | None
    files: list[tuple[LocalFile, str]] = field(default_factory=list)
    deletions: list[str] = field(default_factory=list)
    readme: str = "none"
    already_tagged: str | None = None
    landed_commit: str | None = None
    namespace: str = ""

    @property
    def to_send(self) -> list[LocalFile]:
        return [f for f, status in self.files if status != "unchanged"]

    @property
    def bytes_to_send(self) -> int:
        return sum(f.size for f in self.to_send)

    def describe(self) -> str:
        """A human-readable table of the plan."""
        head = f"{self.repo_id} @ {self.branch} -> tag {self.tag}"
        if self.already_tagged:
            return f"{head}: already uploaded (tag at {self.already_tagged[:8]}), nothing to do"
        lines = [head + (f" (branch already holds these files at {self.landed_commit[:8]}; tag only)"
                         if self.landed_commit else "")]
        for f, status in self.files:
            lines.append(f"  {status:9s} {f.size / 1e6:12.3f} MB  {f.path_in_repo}")
        lines += [f"  delete    {'':>12s}     {p}" for p in self.deletions]
        lines.append(f"  README.md: {self.readme}; to send: {len(self.to_send)} file(s), "
                     f"{self.bytes_to_send / 1e6:.3f} MB")
        return "\n".join(lines)


@dataclass
class PushOutcome:
    """What a push did."""

    commit: str
    tag: str
    sent_files: list[str]
    sent_bytes: int
    skipped: bool
    on_main: bool


def plan_push(
    client: HubClient,
    repo_id: str,
    folder: Path,
    *,
    step: int,
    namespace: str = "",
    card: Callable[[], str] | None = None,
    known: Mapping[str, tuple[str, Any]] | None = None,
) -> PushPlan:
    """Compare ``folder`` with the remote and decide what a push of ``step`` must do (reads only).

    Args:
        client: The Hub interface.
        repo_id: Target repo (it must exist: preflight creates it).
        folder: The consolidated model folder.
        step: Training step.
        namespace: Subfolder of the repo for this experiment (``""``: the root).
        card: Renders the model card; ``None`` disables it. Skipped when ``folder`` has its own README.md.
        known: Digests (and maybe pre-uploaded operations) of files already hashed while written
            (:class:`utils.hub.pipeline.PreUploader`); those files are not read again.

    Returns:
        A :class:`PushPlan`.

    Raises:
        TagConflictError: ``step-N`` exists and points at different weights.
    """
    tag = tag_for_step(step, namespace)
    branches, tags = client.refs(repo_id)
    files = local_files(folder, prefix=namespace, known=known)
    weights = [f for f in files if Path(f.path_in_repo).name != README]
    if tag in tags:
        remote = client.tree(repo_id, tags[tag], prefix=namespace)
        differing = [f.path_in_repo for f in weights if not f.matches(remote.get(f.path_in_repo))]
        if differing:
            raise TagConflictError(
                f"Tag '{tag}' already exists in {repo_id} with different content ({', '.join(differing[:5])}"
                f"{', ...' if len(differing) > 5 else ''}). Delete the tag on the Hub to replace it, or upload with "
                "another step."
            )
        return PushPlan(repo_id, step, tag, "main", tags[tag], already_tagged=tags[tag])

    newest = max((s for t in tags if (s := _step_of_tag(t, namespace)) is not None), default=None)
    main_head = branches.get("main")
    branch = "main" if newest is None or step >= newest else f"upload-{tag}"
    remote = client.tree(repo_id, main_head, prefix=namespace) if main_head else {}
    plan = PushPlan(repo_id, step, tag, branch, main_head, namespace=namespace)
    readme_path = f"{namespace.strip('/')}/{README}" if namespace.strip("/") else README
    if card is not None and not any(f.path_in_repo == readme_path for f in files):
        remote_card = client.read_text(repo_id, readme_path, main_head) if readme_path in remote else None
        if is_generated_card(remote_card):
            files = files + _card_file(card(), readme_path)
            plan.readme = "generated"
        else:
            plan.readme = "kept"
            logger.info("%s in %s was written by hand (or edited): leaving it as it is", readme_path, repo_id)
    ours = {f.path_in_repo for f in files}
    plan.files = [(f, "unchanged" if f.matches(remote.get(f.path_in_repo)) else
                   "changed" if f.path_in_repo in remote else "new") for f in files]
    plan.deletions = sorted(p for p in remote if p not in ours and _is_managed(p, namespace))
    if main_head and branch == "main" and all(f.matches(remote.get(f.path_in_repo)) for f in weights) \
            and not plan.deletions:
        plan.landed_commit = main_head  # every weight is already at main's head: only the tag is missing
    return plan


def execute_push(client: HubClient, plan: PushPlan, *, message: str, description: str | None = None) -> PushOutcome:
    """Carry out a :class:`PushPlan`: commit (with the client's retries), tag, clean up a temporary branch.

    Returns:
        A :class:`PushOutcome`; ``skipped`` when the tag already held the same bytes.
    """
    if plan.already_tagged:
        logger.info("%s %s already holds these weights; nothing uploaded", plan.repo_id, plan.tag)
        return PushOutcome(plan.already_tagged, plan.tag, [], 0, skipped=True, on_main=False)
    if plan.landed_commit:
        logger.info("%s@main already holds step %d's weights (%s); tagging it", plan.repo_id, plan.step,
                    plan.landed_commit[:8])
        client.tag(plan.repo_id, plan.tag, plan.landed_commit, message=message)
        return PushOutcome(plan.landed_commit, plan.tag, [], 0, skipped=False, on_main=True)
    description = _with_tag_line(description, plan.tag)
    try:
        return _commit_and_tag(client, plan, message=message, description=description)
    except NewerStepOnMainError as e:
        # Another upload of a newer step of this run/namespace landed on main after we planned: main must not go
        # back, so this (now stale) step is committed on a temporary branch from that head and only gets its tag.
        logger.warning("%s: step %d landed on main while step %d was uploading; step %d gets its tag only, main "
                       "stays at step %d", plan.repo_id, e.newer_step, plan.step, plan.step, e.newer_step)
        _replan_on(client, plan, e.head)
        return _commit_and_tag(client, plan, message=message, description=description)


class NewerStepOnMainError(Exception):
    """Raised before a commit to ``main`` when ``main`` already holds a newer step of the same namespace."""

    def __init__(self, newer_step: int, head: str):
        super().__init__(f"main already holds step {newer_step} (at {head[:8]})")
        self.newer_step, self.head = newer_step, head


_TAG_LINE = re.compile(r"^tag: (\S+)$", re.MULTILINE)


def _with_tag_line(description: str | None, tag: str) -> str:
    """The commit description with a ``tag: <tag>`` line: how :func:`step_on_main` reads a commit's step back."""
    description = description or ""
    if tag in _TAG_LINE.findall(description):
        return description
    return f"{description}\ntag: {tag}" if description else f"tag: {tag}"


def step_on_main(client: HubClient, repo_id: str, head: str, namespace: str = "") -> int | None:
    """The step whose upload of ``namespace`` is the newest in the history of ``head`` (``None``: none).

    Tags cannot answer this: a tag is created after its commit, so a concurrent upload may have landed on ``main``
    and not be tagged yet. Every commit of ours names its tag in its description (``tag: step-N``); the newest such
    line for this namespace is what ``main`` holds there.
    """
    commits = client._read(lambda: client.api.list_repo_commits(repo_id, revision=head))
    for c in commits:  # newest first
        for tag in _TAG_LINE.findall(getattr(c, "message", "") or ""):
            step = _step_of_tag(tag, namespace)
            if step is not None and tag == tag_for_step(step, namespace):
                return step
    return None


def _replan_on(client: HubClient, plan: PushPlan, head: str) -> None:
    """Point ``plan`` at a temporary branch from ``head``; file statuses and deletions against ``head``'s tree."""
    remote = client.tree(plan.repo_id, head, prefix=plan.namespace)
    ours = {f.path_in_repo for f, _ in plan.files}
    plan.branch, plan.base_commit, plan.landed_commit = f"upload-{plan.tag}", head, None
    plan.files = [(f, "unchanged" if f.matches(remote.get(f.path_in_repo)) else
                   "changed" if f.path_in_repo in remote else "new") for f, _ in plan.files]
    plan.deletions = sorted(p for p in remote if p not in ours and _is_managed(p, plan.namespace))


def _commit_and_tag(client: HubClient, plan: PushPlan, *, message: str, description: str) -> PushOutcome:
    temporary = plan.branch != "main"
    if temporary:
        logger.info("step %d is older than the newest step on %s: committing it on %s, main stays as it is",
                    plan.step, plan.repo_id, plan.branch)
        client.create_branch(plan.repo_id, plan.branch, plan.base_commit)

    def main_never_goes_back(head: str | None) -> None:
        if temporary or head is None:
            return
        newer = step_on_main(client, plan.repo_id, head, plan.namespace)
        if newer is not None and newer > plan.step:
            raise NewerStepOnMainError(newer, head)

    try:
        files = [f for f, _ in plan.files]
        try:
            commit = client.commit(plan.repo_id, files, deletions=plan.deletions, branch=plan.branch,
                                   message=message, description=description, parent_commit=plan.base_commit,
                                   before_attempt=main_never_goes_back)
        except ValueError as e:  # the client validates README metadata first (nothing is uploaded yet)
            if plan.readme != "generated" or "README" not in str(e):
                raise
            # A rejected card must not cost the weights (transformers #28137): push them without it.
            logger.warning("The Hub rejected the generated model card (%s); uploading without README.md",
                           str(e).splitlines()[0])
            plan.files = [(f, st) for f, st in plan.files if Path(f.path_in_repo).name != README]
            plan.readme = "rejected"
            commit = client.commit(plan.repo_id, [f for f, _ in plan.files], deletions=plan.deletions,
                                   branch=plan.branch, message=message, description=description,
                                   parent_commit=plan.base_commit, before_attempt=main_never_goes_back)
        client.tag(plan.repo_id, plan.tag, commit, message=message)
    finally:
        if temporary:
            client.delete_branch(plan.repo_id, plan.branch)
    sent = plan.to_send
    return PushOutcome(commit, plan.tag, [f.path_in_repo for f in sent], sum(f.size for f in sent), skipped=False,
                       on_main=not temporary)


def _card_file(text: str, path_in_repo: str) -> list[LocalFile]:
    import hashlib

    data = text.encode()
    return [LocalFile(path_in_repo, None, len(data), hashlib.sha256(data).hexdigest(), content=data)]


def _is_managed(path: str, namespace: str) -> bool:
    ns = namespace.strip("/")
    rel = path[len(ns) + 1:] if ns else path
    if ns and not path.startswith(ns + "/"):
        return False
    for sub in ("resume/", "adapter/"):  # a snapshot's trainer state, a LoRA upload's PEFT folder: replaced whole
        if rel.startswith(sub):
            return "/" not in rel[len(sub):]
    return "/" not in rel and any(fnmatch.fnmatch(rel, pattern) for pattern in MANAGED_PATTERNS)

