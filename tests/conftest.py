"""Shared fixtures. Importing this module prepares the environment for `huggingface_hub` BEFORE anything imports it.

`huggingface_hub` freezes `constants.ENDPOINT` (and reads HF_HOME, Xet and telemetry switches) at import, so the
local Hub server's address is decided here, at conftest import: a free port is reserved and `HF_ENDPOINT` points at
it; the session-scoped `hub_server` fixture then serves on exactly that port. Test modules and the code under test
can therefore call `HfApi()`, `hf_hub_download(...)`, `from_pretrained(...)` without an `endpoint=` argument and
still reach the local server (subprocesses and Ray workers inherit the variables too).

Uploader tests: use the `hub` fixture (the session server with fault knobs cleared and counters reset), give each
test its own repo name (e.g. `f"alice/{request.node.name}"`), and get tokens with `hub.token_for("alice")`.
"""

from __future__ import annotations

import os
import socket
import tempfile

import pytest


def _reserve_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HUB_PORT = _reserve_port()
HUB_URL = f"http://127.0.0.1:{HUB_PORT}"
HUB_USERS = {"hf_alice_local_token": "alice", "hf_bob_local_token": "bob", "hf_carol_read_only": "carol"}
HUB_ORGS = {"acme": ["alice"]}

os.environ["HF_ENDPOINT"] = HUB_URL
os.environ["HF_HUB_DISABLE_XET"] = "1"  # plain LFS: a local server cannot serve Xet
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hf-home-tests-")  # no cached token, no shared cache
os.environ.pop("HF_TOKEN", None)  # anonymous means anonymous
os.environ.pop("HUGGING_FACE_HUB_TOKEN", None)


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory):
    """The session's local Hub server at `HF_ENDPOINT`: users alice, bob (write) and carol (read-only); org acme
    with alice as its member."""
    from tests.hub_server import HubServer

    root = tmp_path_factory.mktemp("hub")
    server = HubServer(root, HUB_USERS, HUB_ORGS, read_only_tokens=["hf_carol_read_only"], port=HUB_PORT)
    try:
        server.start()
    except OSError:  # the reserved port was taken meanwhile: take any port and repoint everything below
        server.port = 0
        server.start()
    os.environ["HF_ENDPOINT"] = server.url
    from huggingface_hub import constants

    if constants.ENDPOINT != server.url:  # imported too early or port changed: repoint the frozen constants
        constants.ENDPOINT = server.url
        constants.HUGGINGFACE_CO_URL_TEMPLATE = server.url + "/{repo_id}/resolve/{revision}/{filename}"
    yield server
    server.stop()


@pytest.fixture
def hub(hub_server):
    """The session server, up, with no pending faults and zeroed counters."""
    hub_server.come_up()
    hub_server.clear_faults()
    hub_server.reset_counters()
    yield hub_server
    hub_server.clear_faults()
    hub_server.come_up()


# ----- engine: real FSDP2 checkpoints, written once per session -----

@pytest.fixture(scope="session")
def fsdp_checkpoints(tmp_path_factory):
    """``fsdp_checkpoints["w3_tied"]`` -> a WrittenCheckpoint; each case is written on first use only."""
    from tests.consolidation_checks import CheckpointCache  # imports torch: only for sessions that use it

    return CheckpointCache(tmp_path_factory.mktemp("fsdp_ckpts"))


# ----- training: the offline tiny demo model -----

@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """The offline tiny Qwen2 demo model, built once per test session in a private cache dir."""
    from training.tiny_model import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("tiny-model-cache"))


# ----- end to end: real Ray training runs, each started once per session (tests/shared_runs.py) -----

# `scripts/test.sh` runs two pytest workers (pytest-xdist). A session fixture runs once in EACH worker that needs it
# and a module fixture once in each worker that runs one of the module's tests, so the tests are handed out in
# groups: every module that reads a shared run (the fixtures below) in one group, every other module whole. The
# heaviest groups go first so that they overlap the many short tests instead of running last.
SHARED_RUN_FIXTURES = {"e2e_dir", "trained_run", "resumed_run", "no_sync_run"}
SHARED_RUN_MODULES = {"tests/test_hub_resume_e2e.py", "tests/test_train_grpo_e2e.py",
                      "tests/test_train_upload_e2e.py", "tests/test_train_grpo_vllm_e2e.py"}
HEAVY_FIRST = ["shared_runs", "tests/test_multinode_e2e.py", "tests/test_lora_e2e.py", "tests/test_warm_model.py"]


def pytest_collection_modifyitems(config, items):
    """A test that reads a shared run outside SHARED_RUN_MODULES would make that run twice under two workers."""
    strays = sorted({item.nodeid.split("::")[0] for item in items
                     if SHARED_RUN_FIXTURES & set(getattr(item, "fixturenames", ()))} - SHARED_RUN_MODULES)
    if strays:
        raise pytest.UsageError(f"{', '.join(strays)} read(s) a shared run ({', '.join(sorted(SHARED_RUN_FIXTURES))})"
                                " but is not in SHARED_RUN_MODULES of tests/conftest.py: add it there")


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: only called when xdist runs the tests
def pytest_xdist_make_scheduler(config, log):
    # Written here because xdist's own `--dist loadgroup` does not group under pytest 9 (it renames `item._nodeid`,
    # which pytest 9 no longer reads); `_split_scope` is the override point xdist's own schedulers use.
    from xdist.scheduler import LoadScopeScheduling

    class RunGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "shared_runs" if module in SHARED_RUN_MODULES else module

        def _assign_work_unit(self, node) -> None:
            for scope in reversed(HEAVY_FIRST):
                if scope in self.workqueue:
                    self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

    return RunGroups(config, log)


@pytest.fixture(scope="session")
def e2e_dir(tmp_path_factory):
    """The folder the shared training runs write to (their logs are `NAME.log` there)."""
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def trained_run(hub_server, e2e_dir):
    """W=2, 2 GRPO steps, curriculum, a save + resume-snapshot upload at each step, `step-0` pushed before training
    (`shared_runs.train_with_snapshots`).

    `.extra["ckpt"]`: its `default_local_dir`; `.extra["listing"]`: that folder right after the run;
    `.extra["tags"]`: the repo's tags right after the run.
    """
    from tests.shared_runs import train_with_snapshots

    return train_with_snapshots(e2e_dir, hub_server)


@pytest.fixture(scope="session")
def resumed_run(hub_server, e2e_dir, trained_run):
    """`trained_run` resumed from the Hub in a fresh directory at W=3 and trained to step 3, with the Hub down once
    the snapshot is pulled; then `resume` finishes the pending upload (`shared_runs.resume_from_the_hub`).
    veRL also saved its own gathered `huggingface/` model at step 3."""
    from tests.shared_runs import resume_from_the_hub

    return resume_from_the_hub(e2e_dir, hub_server)


@pytest.fixture(scope="session")
def no_sync_run(e2e_dir):
    """W=2, 2 steps without weight sync (a negative control: runs only with VERL_GRPO_E2E_FULL=1)."""
    from tests.shared_runs import train_without_weight_sync

    return train_without_weight_sync(e2e_dir)
