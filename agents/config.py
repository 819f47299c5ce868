"""Run configuration shared by the command-line tools: YAML files, overrides, env creation."""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import re
import sys
from typing import Callable

import gymnasium as gym
import torch
import yaml

import asg_env  # noqa: F401  (registers the ids)
from agents.es import ES_SETTINGS
from agents.reinforce import REINFORCE_SETTINGS
from asg_env import UserInputError
from asg_env.training.settings import FLAG, Setting, check_settings, number, one_of, settings_table, whole

DEFAULTS: dict = {
    # Policy training: a fixed held-out synthetic batch for the reward, and no target evaluation.
    "env": {"id": "SynDigits-v0", "kwargs": {"reward_batch": "heldout", "evaluate_target": False}},
    "agent": {"name": "reinforce", "reinforce": {}, "es": {}, "recurrent-ppo": {}, "ppo": {}, "a2c": {}},
    "train": {"episodes": 20, "seed": 0, "num_envs": 1, "vector": "auto", "check": 0},
}

# agent.<sb3 agent>: the numeric hyperparameters of SB3's PPO, RecurrentPPO and A2C. Any other
# keyword goes to SB3 as it is, and an error there is one line too.
SB3_SETTINGS: dict[str, Setting] = {
    "n_steps": whole(1),
    "batch_size": whole(1),
    "n_epochs": whole(1),
    "learning_rate": number(0, above=True),
    "gamma": number(0, 1),
    "gae_lambda": number(0, 1),
    "ent_coef": number(0),
    "vf_coef": number(0),
    "clip_range": number(0, above=True),
    "max_grad_norm": number(0, above=True),
    "normalize": FLAG,  # ASG-Gym's, not SB3's: train behind VecNormalize (observations and rewards)
}
TRAIN_SETTINGS: dict[str, Setting] = {
    "episodes": whole(1),
    "seed": whole(0),
    "num_envs": whole(1),
    "vector": one_of("auto", "batched", "processes"),
    "check": whole(0),  # held-out check runs per policy after training (REINFORCE and ES)
}


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as the number it is in YAML 1.2 (YAML 1.1 needs a
    dot, ``1.0e-3``, and PyYAML gives a string otherwise)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))


def parse_yaml(text):
    return yaml.load(text, Loader=_Loader)


def merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | None) -> dict:
    """The file's config on top of ``DEFAULTS`` (just the defaults without a file)."""
    return merge(DEFAULTS, read_config_file(path)) if path else copy.deepcopy(DEFAULTS)


def read_config_file(path: str) -> dict:
    """A YAML config file as written, without the defaults."""
    if not os.path.isfile(path):
        raise UserInputError(f"config file not found: {path}")
    try:
        with open(path) as fh:
            data = parse_yaml(fh) or {}
    except yaml.YAMLError as exc:
        raise UserInputError(f"cannot parse {path}: {str(exc).splitlines()[0]}")
    if not isinstance(data, dict):
        raise UserInputError(f"{path} must hold a mapping at the top level")
    return data


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """``--set env.kwargs.lam=0.05`` style overrides; values are parsed as YAML."""
    config = copy.deepcopy(config)
    for item in overrides:
        if "=" not in item:
            raise UserInputError(f"--set takes KEY.PATH=VALUE, got {item!r}")
        path, raw = item.split("=", 1)
        node = config
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise UserInputError(f"--set {item}: {key} holds {node!r}, not a mapping of settings")
        try:
            node[leaf] = parse_yaml(raw)
        except yaml.YAMLError as exc:
            raise UserInputError(f"--set {item}: cannot parse the value: {str(exc).splitlines()[0]}") from None
    return config


def check_run_config(config: dict, agents: tuple[str, ...]) -> None:
    """The agent and train sections' types and ranges (see :mod:`asg_env.envs.settings`); the env's
    settings are checked by the env itself, before it renders or loads anything."""
    for path in ("env", "env.kwargs", "train", "agent"):
        section = config
        for key in path.split("."):
            section = section.get(key) if isinstance(section, dict) else None
        if not isinstance(section, dict):
            raise UserInputError(f"{path} must be a mapping of settings, not {section!r}")
    check_settings(config["train"], TRAIN_SETTINGS, "train.")
    agent = config["agent"].get("name")
    if agent not in agents:
        raise UserInputError(f"unknown agent {agent!r}; choose one of {', '.join(agents)}")
    section = config["agent"].get(agent) or {}
    if not isinstance(section, dict):
        raise UserInputError(f"agent.{agent} must be a mapping of settings, not {section!r}")
    if agent in ("reinforce", "es"):
        check_settings(section, REINFORCE_SETTINGS if agent == "reinforce" else ES_SETTINGS, f"agent.{agent}.")
        if agent == "es" and config["train"].get("num_envs", 1) > 1:
            raise UserInputError("the ES agent runs one env per worker: set agent.es.workers instead of train.num_envs")
    else:  # SB3 checks the values of the keywords it has beyond these
        from agents.sb3_agents import check_hyperparams

        check_settings(section, SB3_SETTINGS, f"agent.{agent}.", known_only=False)
        check_hyperparams(agent, section, f"agent.{agent}.")


def make_env(config: dict, **extra) -> gym.Env:
    """The configured env; ``extra`` kwargs (device, data_root…) win over the file's."""
    kwargs = {**config["env"].get("kwargs", {}), **{k: v for k, v in extra.items() if v is not None}}
    try:
        return gym.make(config["env"]["id"], **kwargs)
    except gym.error.Error as exc:
        raise UserInputError(str(exc)) from exc
    except TypeError as exc:  # an unknown kwarg in a config file
        raise UserInputError(f"bad env option: {exc}") from exc


def _build_env(config: dict, extra: dict, threads: int) -> gym.Env:
    torch.set_num_threads(threads)
    return make_env(config, **extra)


def env_factories(config: dict, n: int, device: str, **extra) -> list[Callable[[], gym.Env]]:
    """``n`` picklable env builders for the processes of a vector env: the CPU threads are
    shared out among them, and on several GPUs env ``i`` gets GPU ``i mod count``."""
    threads = max(1, (os.cpu_count() or 1) // n)
    gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    return [functools.partial(_build_env, config, {**extra, "device": f"cuda:{i % gpus}" if gpus > 1 else device}, threads)
            for i in range(n)]


def run_cli(run: Callable, parse_args: Callable, argv=None) -> int:
    """Run a command-line tool: bad user input ends as one line on stderr and exit status 2."""
    try:
        return run(parse_args(argv))
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def agent_settings_markdown() -> str:
    """The documentation's tables of the agents' and self-training's settings."""
    from agents.es import ESConfig
    from agents.reinforce import ReinforceConfig
    from asg_env.adaptation.self_training import SelfTrainingConfig

    parts = [("REINFORCE (`agent.reinforce`, `ReinforceConfig`)", ReinforceConfig),
             ("Evolution strategies (`agent.es`, `ESConfig`)", ESConfig),
             ("Self-training (`adapt.py`'s `self_training`, `SelfTrainingConfig`)", SelfTrainingConfig)]
    return "\n".join(f"### {title}\n\n{settings_table(dataclasses.fields(config))}" for title, config in parts)
