"""The layout's stages import one way down: the tasks know nothing of the trainer, the training
core nothing of the envs, asg_env nothing of the agents, and no library module of the scripts."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# each stage and the stages it must not import (lazy imports inside functions included)
ABOVE = {
    "asg_env/tasks": ("asg_env.training", "asg_env.envs", "asg_env.adaptation", "agents"),
    "asg_env/training": ("asg_env.envs", "asg_env.adaptation", "agents"),
    "asg_env/adaptation": ("asg_env.envs", "agents"),
    "asg_env/envs": ("asg_env.adaptation", "agents"),
    "agents": ("benchmarks",),
}
SCRIPTS = ("train_policy", "apply_policy", "adapt", "benchmarks")


def _imports(path: str) -> list[str]:
    with open(path) as fh:
        tree = ast.parse(fh.read())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return names


@pytest.mark.parametrize("stage", sorted(ABOVE))
def test_each_stage_imports_only_below_itself(stage):
    folder = os.path.join(ROOT, stage)
    files = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".py")]
    assert files
    for path in files:
        for name in _imports(path):
            banned = [b for b in (*ABOVE[stage], *SCRIPTS) if name == b or name.startswith(b + ".")]
            assert not banned, f"{os.path.relpath(path, ROOT)} imports {name}, a stage above it"


def test_the_check_sees_an_upward_import(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from asg_env.envs.env import ASGEnv\n")
    assert "asg_env.envs.env" in _imports(str(path))
