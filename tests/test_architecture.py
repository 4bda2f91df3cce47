"""The layering rule: `utils/` never imports `training/`, verl, ray or reasoning_gym."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN = {"training", "verl", "ray", "reasoning_gym"}


def _imported_roots(path: pathlib.Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_utils_sources_do_not_import_training_verl_or_ray():
    files = sorted((ROOT / "utils").rglob("*.py"))
    assert files, "utils/ has no Python files"
    offenders = {str(f.relative_to(ROOT)): sorted(_imported_roots(f) & FORBIDDEN) for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_every_utils_module_loads_none_of_them():
    modules = [
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in sorted((ROOT / "utils").rglob("*.py"))
    ]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(sorted(r for r in {sorted(FORBIDDEN)!r} if r in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_pre_ray_checks_import_and_run_with_verl_and_ray_blocked():
    """train_grpo.py checks the config and the Hub before importing veRL: none of that may need veRL or Ray.

    (Hydra's composition itself reads veRL's ppo_trainer.yaml from the installed package; the sections checked here
    are the project's own, loaded from cpu_demo.yaml.)
    """
    code = (
        "import sys\n"
        "sys.modules['verl'] = None; sys.modules['ray'] = None\n"  # any `import verl` / `import ray` now fails
        "import train_grpo\n"
        "from omegaconf import OmegaConf\n"
        "from training.config_checks import check_run_config\n"
        "from training.config_schema import apply_schema\n"
        "from training.hub_upload import uploader_settings\n"
        f"cfg = OmegaConf.load({str(ROOT / 'training' / 'configs' / 'cpu_demo.yaml')!r})\n"
        "check_run_config(apply_schema(cfg))\n"
        "print(uploader_settings(cfg)['strategy'], sorted(m for m in sys.modules if m.startswith(('verl', 'ray'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "end ['ray', 'verl']", out.stdout + out.stderr


def test_a_bad_config_fails_in_train_grpo_without_importing_verl(tmp_path):
    """The whole entry point up to the config error - Hydra's composition on veRL's ppo_trainer.yaml included
    (training/verl_config_path.py) - runs with veRL and Ray blocked: a misspelt task costs seconds, not veRL's import.
    """
    code = (
        "import runpy, sys\n"
        "sys.modules['verl'] = None; sys.modules['ray'] = None\n"
        f"sys.argv = ['train_grpo.py', 'hydra.run.dir={tmp_path}', '+reasoning_gym.datasets.no_such_task.weight=1']\n"
        f"runpy.run_path({str(ROOT / 'train_grpo.py')!r}, run_name='__main__')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2, out.stdout + out.stderr
    assert "config error: reasoning_gym.datasets.no_such_task" in out.stderr and "Traceback" not in out.stderr


def test_console_scripts_point_at_the_two_clis():
    import importlib

    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"verl-grpo-upload", "verl-grpo-consolidate"}
    for target in scripts.values():
        module, _, name = target.partition(":")
        main = getattr(importlib.import_module(module), name)
        with pytest.raises(SystemExit) as info:  # argparse's --help exits 0
            main(["--help"])
        assert info.value.code == 0
