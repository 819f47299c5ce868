"""Saving policies, and loading any policy by name or file, checked against the env."""

from __future__ import annotations

import math
import os

import gymnasium as gym
import torch

from agents.policies import Policy, is_baseline, make_baseline
from agents.reinforce import POLICY_FORMAT, policy_from_state
from asg_env import UserInputError
from asg_env.provenance import ROOT

PRETRAINED_DIR = os.path.join(ROOT, "results", "policies")  # published by the learning gate, one folder each
PRETRAINED = "es-syndigits"  # what --policy pretrained names


def env_metadata(env: gym.Env) -> dict:
    """What a policy must match to drive an env (its observation and its coordinates), and the
    env's whole configuration, so the policy can be applied in the world it was trained in."""
    u = env.unwrapped
    return {
        "obs_names": list(u.obs_names), "coordinate_names": list(u.coordinate_names),
        "backbone": u.backbone_name, "env_id": env.spec.id if env.spec else None, "decisions": u.T,
        "env_kwargs": dict(getattr(u, "config", {})),
    }


def save_policy(state: dict, path: str) -> None:
    """Write atomically, so an interrupted save never leaves a half-written policy."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_file(path: str, what: str, missing: str = "") -> dict:
    """A file saved with ``save_policy``, read with ``weights_only=True``; a missing or corrupt
    file is one line of error (``missing`` is added when it is not there). torch's own message
    is not passed on: it advises ``weights_only=False``, which must never be used on a file
    that may come from someone else."""
    if not os.path.isfile(path):
        raise UserInputError(f"{what} not found: {path}{missing}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise UserInputError(f"{path} is corrupt or is not a {what} that ASG-Gym wrote") from None


def read_policy_file(path: str) -> dict:
    state = read_file(path, "policy file")
    if not isinstance(state, dict) or state.get("format") != POLICY_FORMAT:
        raise UserInputError(f"{path} is not an ASG-Gym policy (expected format {POLICY_FORMAT})")
    return state


def is_coordinate_wise(state: dict) -> bool:
    return state.get("agent") in ("reinforce", "es") and (state.get("config") or {}).get("network") == "coordinate-wise"


def _feature_kinds(obs_names: list[str]) -> list[str]:
    """Observation names without their coordinates: ``last_action/conv_stem`` → ``last_action``."""
    return list(dict.fromkeys(name.split("/")[0] for name in obs_names))


def check_compatible(state: dict, env: gym.Env, path: str) -> None:
    """A policy drives an env whose observation and action mean what they meant in training:
    the same coordinate names (any coordinates for a coordinate-wise policy, if it sees the
    same kinds of features), the same action parametrisation and number of levels."""
    here = env_metadata(env)
    theirs = state.get("coordinate_names", [])
    if is_coordinate_wise(state):
        if _feature_kinds(state.get("obs_names", [])) != _feature_kinds(here["obs_names"]):
            raise UserInputError(f"{path} expects observations of {_feature_kinds(state.get('obs_names', []))} "
                                 f"per coordinate, this env gives {_feature_kinds(here['obs_names'])}")
    elif theirs != here["coordinate_names"]:
        raise UserInputError(
            f"{path} was trained for {len(theirs)} coordinates of {state.get('backbone')} ({', '.join(theirs)}); "
            f"this env has {len(here['coordinate_names'])} of {here['backbone']} ({', '.join(here['coordinate_names'])})"
        )
    elif state.get("obs_names") != here["obs_names"]:
        raise UserInputError(
            f"{path} expects observations {state.get('obs_names')}, this env gives {here['obs_names']}"
        )
    control = getattr(env.unwrapped, "control", None)
    if control is None:
        return
    trained = (state.get("env_kwargs") or {}).get("action", "levels")
    if trained != control.kind:
        raise UserInputError(f"{path} was trained with action={trained!r}; this env has action={control.kind!r}")
    space = control.action_space
    recorded = state.get("env_kwargs") or {}
    if isinstance(space, gym.spaces.MultiDiscrete):
        levels = state.get("n_levels", recorded.get("action_levels") if control.kind == "log_levels" else None)
        if levels is not None and int(levels) != int(space.nvec[0]):
            raise UserInputError(f"{path} picks one of {levels} levels; this env has {int(space.nvec[0])}")
    if control.kind != "levels":  # the range the actions and the observed scales are read on
        here = {"action_min": 10.0 ** control.low, "action_max": 10.0 ** control.high}
        for key, value in here.items():
            if key in recorded and not math.isclose(float(recorded[key]), value, rel_tol=1e-9):
                raise UserInputError(f"{path} was trained with {key}={recorded[key]:g}; this env has {value:g}")


def transfer_note(spec: str, env: gym.Env) -> str | None:
    """What to tell the user when a coordinate-wise policy runs on other coordinates than its own."""
    if is_baseline(spec):
        return None
    state = read_policy_file(spec)
    here = env_metadata(env)
    if not is_coordinate_wise(state) or state.get("coordinate_names") == here["coordinate_names"]:
        return None
    return (f"coordinate-wise policy trained on {len(state.get('coordinate_names', []))} coordinates of "
            f"{state.get('backbone')}, applied to the {len(here['coordinate_names'])} of {here['backbone']}")


def pretrained_names() -> list[str]:
    """The shipped policies: folders of ``results/policies/`` holding a policy.pt."""
    if not os.path.isdir(PRETRAINED_DIR):
        return []
    return sorted(n for n in os.listdir(PRETRAINED_DIR) if os.path.isfile(os.path.join(PRETRAINED_DIR, n, "policy.pt")))


def resolve_policy(spec: str) -> str:
    """``pretrained`` or a shipped policy's name → its policy.pt; anything else as given."""
    name = PRETRAINED if spec == "pretrained" else spec
    if name in pretrained_names():
        return os.path.join(PRETRAINED_DIR, name, "policy.pt")
    if spec == "pretrained":
        raise UserInputError(f"no pretrained policy {PRETRAINED!r} in {PRETRAINED_DIR} (it ships with a checkout "
                             "of the repository; python -m benchmarks.learning_gate --publish writes it)")
    return spec


def load_policy(spec: str, env: gym.Env, deterministic: bool = True, seed: int | None = None) -> Policy:
    """A baseline by name (``random``, ``hand-tuned``, ``constant:…``, ``llrd:…``, ``cosine:…``…) or a saved policy file.
    ``seed`` seeds whatever the policy draws at random (sampled actions, the random baseline)."""
    if is_baseline(spec):
        control = getattr(env.unwrapped, "control", None)
        if control is not None and control.kind != "levels":
            raise UserInputError(f"the baselines act on the paper's 11 levels; this env has action={control.kind!r}")
        return make_baseline(spec, len(env.action_space.nvec), seed, env.unwrapped.T)
    state = read_policy_file(spec)
    check_compatible(state, env, spec)
    if state["agent"] in ("reinforce", "es"):  # ES trains REINFORCE's network
        return policy_from_state(state, deterministic, seed)
    from agents.sb3_agents import sb3_policy_from_state

    return sb3_policy_from_state(state, env, deterministic, seed)
