"""Start or join Ray (training/ray_cluster.py): the decision table without Ray; with Ray, every shipped config joins
a running cluster (found through `ray start`'s pointer file, and through RAY_ADDRESS), a stale pointer is ignored, and
a real GRPO run joins a cluster started with `ray start` (here only where tests/test_multinode_e2e.py cannot run: its
first run is that proof, on two nodes).

The Ray tests use a private cluster (its own RAY_TMPDIR and ports, stopped by PID), so they pass while another Ray
cluster runs on the machine, and leave no /tmp/ray/ray_current_cluster behind.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.ray_nodes import RayNode, can_make_private_mounts, free_port, ray_test_env, remove_ray_tmpdir
from training.ray_cluster import START_ONLY_KEYS, RayPlan, plan_ray_init, ray_pointer_file

REPO = Path(__file__).resolve().parents[1]
MULTINODE_SKIP = can_make_private_mounts()  # why tests/test_multinode_e2e.py skips here (None when it runs)
CPU_INIT = {"num_cpus": 16, "num_gpus": 2, "include_dashboard": False}


def _pointer(tmp_path: Path, address: str) -> dict[str, str]:
    env = {"RAY_TMPDIR": str(tmp_path)}
    (tmp_path / "ray").mkdir(exist_ok=True)
    (tmp_path / "ray" / "ray_current_cluster").write_text(address + "\n")
    return env


def _refused_address() -> str:
    port = free_port()  # bound then released: nothing listens there
    return f"127.0.0.1:{port}"


def test_no_cluster_around_starts_a_local_one_with_the_configs_resources(tmp_path):
    plan = plan_ray_init(CPU_INIT, environ={"RAY_TMPDIR": str(tmp_path)})
    assert (plan.action, plan.init_address, plan.dropped) == ("start", "local", ())
    assert plan.line() == "ray: starting a local Ray cluster (no cluster to join: RAY_ADDRESS unset, no `ray start` " \
                          "on this node)"


def test_ray_address_joins_without_the_start_only_keys():
    plan = plan_ray_init({**CPU_INIT, "resources": {"x": 1}}, environ={"RAY_ADDRESS": "10.1.2.3:6379"})
    assert plan == RayPlan("join", "10.1.2.3:6379", "RAY_ADDRESS", ("num_cpus", "num_gpus", "resources"), None)
    assert plan.line() == ("ray: joining the Ray cluster at 10.1.2.3:6379 (RAY_ADDRESS); not passing num_cpus, "
                           "num_gpus, resources (the cluster's own resources count)")


@pytest.mark.parametrize("address, action, init_address", [
    ("local", "start", "local"),
    ("auto", "join", "auto"),
    ("10.9.9.9:6379", "join", "10.9.9.9:6379"),
])
def test_an_explicit_address_in_the_config_wins_over_ray_address(address, action, init_address):
    plan = plan_ray_init({**CPU_INIT, "address": address}, environ={"RAY_ADDRESS": "10.1.2.3:6379"})
    assert (plan.action, plan.init_address) == (action, init_address)
    assert plan.dropped == (() if action == "start" else ("num_cpus", "num_gpus"))


def test_joining_an_address_where_nothing_listens_is_a_config_error_at_once(monkeypatch):
    from training.errors import ConfigError
    from training.ray_cluster import check_join_target

    dead = _refused_address()
    monkeypatch.setenv("RAY_ADDRESS", dead)
    with pytest.raises(ConfigError, match=f"RAY_ADDRESS={dead}: no Ray cluster there \\(connection refused\\)"):
        check_join_target({"ray_kwargs": {"ray_init": dict(CPU_INIT)}})
    with pytest.raises(ConfigError, match="ray_kwargs.ray_init.address=.*unset it to start a local cluster"):
        check_join_target({"ray_kwargs": {"ray_init": {**CPU_INIT, "address": dead}}})
    # a local start, "auto" and a Ray client address are not probed
    for address, action in [("local", "start"), ("auto", "join"), (f"ray://{dead}", "join")]:
        assert check_join_target({"ray_kwargs": {"ray_init": {"address": address}}}).action == action
    with socket.socket() as listener:  # something answers: joined as planned
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{listener.getsockname()[1]}")
        assert check_join_target({}).action == "join"


def test_a_live_pointer_from_ray_start_is_joined(tmp_path):
    with socket.socket() as listener:  # something answers at the recorded address
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        plan = plan_ray_init(CPU_INIT, environ=_pointer(tmp_path, address))
    assert (plan.action, plan.address, plan.init_address) == ("join", address, "auto")
    assert str(tmp_path / "ray" / "ray_current_cluster") in plan.reason


def test_a_stale_pointer_is_ignored_and_said_so(tmp_path):
    address = _refused_address()
    plan = plan_ray_init(CPU_INIT, environ=_pointer(tmp_path, address))
    assert (plan.action, plan.init_address) == ("start", "local")
    assert plan.line() == (f"ray: starting a local Ray cluster (ignoring the stale {tmp_path}/ray/ray_current_cluster:"
                           f" no Ray cluster at {address}, connection refused)")


@pytest.mark.parametrize("environ, expected", [
    ({}, "/tmp/ray/ray_current_cluster"),
    ({"TMPDIR": "/scratch"}, "/scratch/ray/ray_current_cluster"),
    ({"TMPDIR": "/scratch", "RAY_TMPDIR": "/r"}, "/r/ray/ray_current_cluster"),
])
def test_the_pointer_file_follows_rays_own_lookup(environ, expected):
    assert str(ray_pointer_file(environ)) == expected


def test_configure_ray_edits_the_config_veRL_passes_to_ray_init(monkeypatch, tmp_path, capsys):
    from tests.test_configs import compose_config
    from training.ray_cluster import configure_ray

    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.internal:8080")
    monkeypatch.setenv("HF_TOKEN", "hf_" + "never_forwarded")
    cfg = compose_config("cpu_demo")
    plan = configure_ray(cfg)
    ray_init = cfg.ray_kwargs.ray_init
    assert plan.action == "join"
    assert (ray_init.address, ray_init.num_cpus, ray_init.num_gpus) == (None, None, None)
    assert ray_init.runtime_env.env_vars.HF_ENDPOINT == "http://hub.internal:8080"
    assert "HF_TOKEN" not in ray_init.runtime_env.env_vars
    assert capsys.readouterr().out.strip() == plan.line()

    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    cfg = compose_config("cpu_demo")
    configure_ray(cfg)
    assert (cfg.ray_kwargs.ray_init.address, cfg.ray_kwargs.ray_init.num_gpus) == ("local", 2)


def test_every_start_only_key_is_dropped_when_joining():
    ray_init = {key: 1 for key in START_ONLY_KEYS}
    assert plan_ray_init(ray_init, environ={"RAY_ADDRESS": "h:1"}).dropped == START_ONLY_KEYS


# ---------------------------------------------------------------------------------------------- real Ray below

# Composes each config, applies configure_ray, then calls ray.init exactly as veRL's run_ppo does; prints the plan
# line and the GCS address it connected to.
PROBE = textwrap.dedent("""
    import sys
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    import ray
    from verl.trainer.constants_ppo import get_ppo_ray_runtime_env
    from training.ray_cluster import configure_ray

    for name in sys.argv[2:]:
        with initialize_config_dir(config_dir=sys.argv[1], version_base=None):
            cfg = compose(config_name=name)
        configure_ray(cfg)
        kwargs = cfg.ray_kwargs.get("ray_init", {})
        runtime_env = OmegaConf.merge(get_ppo_ray_runtime_env(cfg), kwargs.get("runtime_env", {}))
        ray.init(**OmegaConf.to_container(OmegaConf.create({**kwargs, "runtime_env": runtime_env})))
        print(f"{name} connected to {ray.get_runtime_context().gcs_address} "
              f"GPU={ray.cluster_resources().get('GPU', 0)}", flush=True)
        ray.shutdown()
""")


def _probe(env: dict[str, str], configs: list[str]) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE, str(REPO / "training" / "configs"), *configs], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    return out.stdout


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A running single-node cluster started with `ray start --head` (2 logical GPUs), private to this module."""
    pointer_before = Path("/tmp/ray/ray_current_cluster").exists()
    env = ray_test_env({**os.environ, "PYTHONPATH": str(REPO)})
    node = RayNode.start_head(tmp_path_factory.mktemp("ray-head"), env=env, num_cpus=16, num_gpus=2)
    try:
        yield node
    finally:
        node.stop()
        remove_ray_tmpdir(env)
        if not pointer_before:
            assert not Path("/tmp/ray/ray_current_cluster").exists()


@pytest.mark.slow
def test_every_shipped_config_joins_a_running_cluster(head):
    configs = sorted(p.stem for p in (REPO / "training" / "configs").glob("*.yaml") if not p.name.startswith("_"))
    stdout = _probe(head.env, configs)
    for name in configs:
        assert f"{name} connected to {head.address} GPU=2.0" in stdout, stdout
    assert stdout.count(f"ray: joining the Ray cluster at {head.address} (`ray start` on this node") == len(configs)
    assert "not passing num_cpus, num_gpus" in stdout  # the CPU config's keys, which made ray.init refuse to join

    by_env = _probe({**head.env, "RAY_ADDRESS": head.address}, ["cpu_demo"])
    assert f"ray: joining the Ray cluster at {head.address} (RAY_ADDRESS)" in by_env
    assert f"cpu_demo connected to {head.address}" in by_env


READERS = textwrap.dedent("""
    import ray
    from training.cluster_gather import ShardReader, answering_readers

    ray.init(address="auto")  # the module's `ray start` cluster, found through RAY_TMPDIR's pointer
    node = ray.get_runtime_context().get_node_id()
    readers = {"kept": ShardReader.remote("/tmp"), "lost": ShardReader.remote("/tmp")}
    ray.get(readers["lost"].where.remote())  # up, then gone as when its node dies
    ray.kill(readers["lost"])
    where, kept = answering_readers(readers)
    print("answering", sorted(where), sorted(kept), where["kept"][0] == node, flush=True)
    ray.shutdown()
""")


@pytest.mark.slow
def test_a_resume_leaves_out_a_reader_that_died_with_its_node(head):
    """What made a multi-node resume fail once: a node that just died was still listed alive, the reader placed on it
    died with it, and the RayActorError ended the resume. Real Ray: one of two readers is killed after it answered."""
    out = subprocess.run([sys.executable, "-c", READERS], env=head.env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    assert "answering ['kept'] ['kept'] True" in out.stdout, out.stdout


@pytest.mark.slow
def test_a_stale_pointer_from_a_killed_cluster_starts_a_fresh_cluster(head, tmp_path):
    env = ray_test_env({**os.environ, "PYTHONPATH": str(REPO)})  # another RAY_TMPDIR, beside the running `head`
    stale = _refused_address()
    pointer = _pointer(Path(env["RAY_TMPDIR"]), stale)["RAY_TMPDIR"] + "/ray/ray_current_cluster"
    try:
        stdout = _probe(env, ["cpu_demo"])
    finally:
        remove_ray_tmpdir(env)
    assert (f"ray: starting a local Ray cluster (ignoring the stale {pointer}: no Ray cluster at {stale}, "
            "connection refused)") in stdout
    connected = stdout.split("cpu_demo connected to ")[1].split()[0]
    assert connected not in (stale, head.address)
    assert "GPU=2.0" in stdout  # the config's num_gpus reached the cluster it started


@pytest.mark.slow
@pytest.mark.skipif(not MULTINODE_SKIP, reason="a whole GRPO run joining a `ray start` cluster is the first run of "
                    "tests/test_multinode_e2e.py (a run of ~55 s saved); this one runs where that one cannot")
def test_a_grpo_run_joins_a_cluster_started_with_ray_start(head, tmp_path):
    from tests.test_train_grpo_e2e import SMALL

    cmd = [sys.executable, str(REPO / "train_grpo.py"), f"hydra.run.dir={tmp_path / 'hydra'}", *SMALL,
           "trainer.total_training_steps=1", "trainer.save_freq=-1", f"trainer.default_local_dir={tmp_path / 'ck'}"]
    env = {**head.env, "VERL_GRPO_HUB_CACHE": str(tmp_path / "model-cache")}
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    assert f"ray: joining the Ray cluster at {head.address} (`ray start` on this node" in log
    assert "must not be provided" not in log
    assert "step:1 -" in log


@pytest.mark.slow
def test_a_test_node_that_does_not_start_is_tried_again_then_reported_and_leaves_nothing(tmp_path, capfd):
    """The scaffolding above (tests/ray_nodes.py): a `ray start` that does not come up in time (here 1 s, about
    what `ray start` needs to import Ray; how far it got by then depends on the machine's load) is tried once more,
    then raised, and none of its processes outlive it. What the error carries of Ray's logs is checked without
    timing in the test below."""
    import psutil

    from tests.ray_nodes import RayStartError

    env = ray_test_env({**os.environ, "PYTHONPATH": str(REPO)})
    try:
        with pytest.raises(RayStartError, match=r"ray start failed"):
            RayNode.start_head(tmp_path, env=env, num_cpus=1, timeout=1)
        assert capfd.readouterr().err.count("ray start failed once, trying again on fresh ports") == 1
        assert len(list(tmp_path.glob("ray_start.*.log"))) == 2  # two `ray start`, each with its own log
        left = [p.pid for p in psutil.process_iter(["cmdline"]) if env["RAY_TMPDIR"] in " ".join(p.info["cmdline"] or [])]
        assert not left, left
    finally:
        remove_ray_tmpdir(env)


def test_a_failed_starts_report_carries_the_tails_of_its_own_gcs_and_raylet_logs_once(tmp_path):
    from tests.ray_nodes import _session_log_tails

    def log(session: str, name: str, lines: list[str], mtime: float) -> None:
        path = tmp_path / "ray" / session / "logs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        os.utime(path, (mtime, mtime))

    log("session_2026-01-01_old", "gcs_server.out", ["an earlier start"], mtime=1000)
    log("session_2026-01-02_new", "gcs_server.out", [f"gcs {i}" for i in range(50)], mtime=2000)
    log("session_2026-01-02_new", "raylet.err", ["raylet died"], mtime=2001)
    log("session_2026-01-02_new", "dashboard.log", ["not asked for"], mtime=2002)
    (tmp_path / "ray" / "session_latest").symlink_to(tmp_path / "ray" / "session_2026-01-02_new")

    report = _session_log_tails(tmp_path, since=1500, lines=30)
    assert report.count("gcs_server.out (last 30 lines)") == 1 and report.count("raylet.err") == 1  # not via the link
    assert "gcs 49" in report and "gcs 20" in report and "gcs 19" not in report  # the last 30 of 50 lines
    assert "raylet died" in report
    assert "an earlier start" not in report and "not asked for" not in report
    assert report.index("gcs_server.out") < report.index("raylet.err")  # in the order they were written
