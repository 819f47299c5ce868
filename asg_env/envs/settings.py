"""The env's settings: its own (:class:`EnvSettings`) and the fine-tuning run's
(:class:`~asg_env.training.settings.FineTuningSettings`, and
:class:`~asg_env.training.settings.BatchedSettings` for the vector env), in one table,
:data:`ENV_SETTINGS`, derived from their fields. :func:`check_settings` runs a mapping through
it before anything is rendered or trained, and a bad value ends as one
:class:`~asg_env.errors.UserInputError` line that names the setting and what it allows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from asg_env.envs.control import ACTIONS, OBSERVATIONS, REWARDS
from asg_env.training.settings import (
    BATCHED_CHECKS,
    BATCHED_FIELDS,
    DEFAULTS,
    FIELDS,
    FINE_TUNING_CHECKS,
    FLAG,
    FREE_FORM,
    Setting,
    check_settings,
    number,
    one_of,
    setting,
    settings_table,
    whole,
)

__all__ = ["ENV_SETTINGS", "ENV_FREE_FORM", "EnvSettings", "Setting", "check_settings"]


@dataclass
class EnvSettings:
    """The env's own settings: what a decision sets, what the policy sees and is rewarded for
    (:mod:`asg_env.envs.control`; the defaults are the paper's), and what the env reports."""

    action: str = setting("levels", one_of(*ACTIONS), "what a decision sets: levels (the paper's 11 scales 0 … 1), "
                          "log_levels, continuous or relative")
    action_levels: int = setting(11, whole(2), "log_levels: the number of log-spaced scales")
    action_min: float = setting(0.01, number(0, above=True), "log_levels, continuous, relative: the smallest scale")
    action_max: float = setting(10.0, number(0, above=True), "log_levels, continuous, relative: the largest scale")
    observation: str = setting("paper", one_of(*OBSERVATIONS), "what the policy sees: paper (losses, progress, θ_n's "
                               "mean and std, last action) or per_coordinate (and each coordinate's statistics)")
    reward: str = setting("loss_decrease", one_of(*REWARDS), "loss_decrease (the paper's L_{t-1} − L_t), "
                          "log_loss_decrease or final (−L_T at the end)")
    divergence_penalty: float = setting(-10.0, number(), "the reward when the loss becomes non-finite")
    evaluate_target: bool = setting(True, FLAG, "evaluate on the real target when an evaluation is due (logging only)")
    synthetic_score: bool = setting(False, FLAG, "report the run's synthetic score: initial_score at reset, score "
                                    "at the end (the capped held-out synthetic cross-entropy)")


ENV_FIELDS = dataclasses.fields(EnvSettings)
ENV_OWN = tuple(f.name for f in ENV_FIELDS)  # the env's settings; the others are the trainer's
ENV_SETTINGS: dict[str, Setting] = {**{f.name: f.metadata["check"] for f in ENV_FIELDS}, **FINE_TUNING_CHECKS,
                                    **BATCHED_CHECKS}
# Names and paths, checked where they are resolved (an unknown one is one error there), and the
# env's list of instances, each checked against this table by the env (asg_env.envs.env).
ENV_FREE_FORM = (*FREE_FORM, "instances")


def recorded_settings(kwargs: dict) -> dict:
    """An env's settings as a policy or a run recorded them, in today's names: records written
    before the batched trainer was split off hold ``num_runs=None`` (one run) and ``batching``,
    which one run does not take."""
    return {k: v for k, v in kwargs.items() if k != "batching" and not (k == "num_runs" and v is None)}


def settings_markdown() -> str:
    """The documentation's settings tables (docs/settings.md holds them as this returns them)."""
    parts = [("The env's own settings (`EnvSettings`)", ENV_FIELDS),
             ("The fine-tuning run (`FineTuningSettings`)", FIELDS),
             ("The vector env and the batched trainer (`BatchedSettings`)", BATCHED_FIELDS)]
    text = "\n".join(f"### {title}\n\n{settings_table(fields)}" for title, fields in parts)
    return text + "\n" + registered_table()


def registered_table() -> str:
    """The registered env ids and the settings each sets away from the defaults."""
    import gymnasium as gym

    defaults = {**{f.name: f.default for f in ENV_FIELDS}, **DEFAULTS}
    rows = ["### The registered envs", "", "Each id is `ASGEnv` with these settings changed from the defaults above:", "",
            "| id | settings |", "|---|---|"]
    for spec in gym.registry.values():
        if spec.entry_point == "asg_env.envs.env:ASGEnv":
            changed = {k: v for k, v in spec.kwargs.items() if defaults.get(k, object()) != v}
            rows.append(f"| `{spec.id}` | " + ", ".join(f"`{k}={v!r}`" for k, v in changed.items()) + " |")
    return "\n".join(rows) + "\n"
