"""The type and range of every setting of the env, the agents and policy training, in one place.

Each table maps a setting's name to a :class:`Setting`. :func:`check_settings` runs a mapping
through a table before anything is rendered or trained, and a bad value ends as one
:class:`~asg_env.errors.UserInputError` line that names the setting and what it allows. A test
checks that every parameter of the trainer, the env and the REINFORCE agent has an entry here,
so a new setting cannot be forgotten.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from asg_env.envs.control import ACTIONS, OBSERVATIONS, REWARDS
from asg_env.errors import UserInputError
from asg_env.training.guidance import GUIDANCES
from asg_env.training.optim import SGD_FORMS, WINDOWS
from asg_env.training.proxy import HEADS
from asg_env.training.segmentation import UPSAMPLING

LR_SCHEDULES = ("constant", "poly")


@dataclass(frozen=True)
class Setting:
    """``kind`` (int, float, bool or str) with inclusive bounds ``low``/``high`` (exclusive with
    ``above``/``below``); ``choices`` are a string setting's values, or the words a number may
    be instead (``eval_every="epoch"``); ``optional`` admits None."""

    kind: type
    low: float | None = None
    high: float | None = None
    above: bool = False
    below: bool = False
    choices: tuple = ()
    optional: bool = False

    def allows(self, value) -> bool:
        if value is None:
            return self.optional
        if self.kind is str or value in self.choices:
            return value in self.choices
        if isinstance(value, bool) or self.kind is bool:
            return isinstance(value, bool) and self.kind is bool
        if not isinstance(value, int if self.kind is int else (int, float)) or not math.isfinite(value):
            return False
        return ((self.low is None or (value > self.low if self.above else value >= self.low))
                and (self.high is None or (value < self.high if self.below else value <= self.high)))

    def describe(self) -> str:
        if self.kind is str:
            text = "one of " + ", ".join(map(repr, self.choices))
        elif self.kind is bool:
            text = "true or false"
        else:
            text = "a whole number" if self.kind is int else "a finite number"
            if self.low is not None and self.high is not None:
                text += f" in {'(' if self.above else '['}{self.low:g}, {self.high:g}{')' if self.below else ']'}"
            elif self.low is not None:
                text += f" {'>' if self.above else '≥'} {self.low:g}"
            elif self.high is not None:
                text += f" {'<' if self.below else '≤'} {self.high:g}"
            text += "".join(f" or {c!r}" for c in self.choices)
        return text + (" or null" if self.optional else "")


def _whole(low: int, high: int | None = None, **kw) -> Setting:
    return Setting(int, low, high, **kw)


def _number(low: float | None = None, high: float | None = None, **kw) -> Setting:
    return Setting(float, low, high, **kw)


def _one_of(*choices: str) -> Setting:
    return Setting(str, choices=choices)


FLAG = Setting(bool)

# The env: ASGEnv's own two settings and every Trainer keyword (see asg_env.training.trainer.Trainer).
ENV_SETTINGS: dict[str, Setting] = {
    "evaluate_target": FLAG,
    "divergence_penalty": _number(),
    "action": _one_of(*ACTIONS),
    "action_levels": _whole(2),
    "action_min": _number(0, above=True),
    "action_max": _number(0, above=True),
    "observation": _one_of(*OBSERVATIONS),
    "reward": _one_of(*REWARDS),
    "synthetic_score": FLAG,
    "episode_steps": _whole(1, optional=True),
    "sgd_steps_per_action": _whole(1),
    "sgd_steps": _whole(1, optional=True),
    "epochs": _number(0, above=True, optional=True),
    "window": _one_of(*WINDOWS),
    "lam": _number(0),
    "guidance": _one_of(*GUIDANCES),
    "compile": Setting(str, choices=("inductor", "aot_eager", "eager"), optional=True),
    "lr_base": _number(0),  # 0 freezes the run (benchmarks measure speed with it)
    "momentum": _number(0, 1, below=True),
    "weight_decay": _number(0),
    "sgd": _one_of(*SGD_FORMS),
    "lr_schedule": _one_of(*LR_SCHEDULES),
    "warmup_steps": _whole(0),
    "batch_size": _whole(1),
    "image_size": _whole(1),  # and at least the backbone's minimum (check_image_size)
    "head": _one_of(*HEADS),
    "reward_batch": _one_of("train", "heldout"),
    "eval_every": _whole(0, choices=("epoch",)),
    "target_eval_size": _whole(0),
    "tta_flip": FLAG,
    "source_size": _whole(1),
    "render_seed": _whole(0),
    "synthetic_eval_size": _whole(0),
    "imagenet_photos": _whole(0, 20),
    "channels_last": FLAG,
    "amp": FLAG,
    "cache_teacher": FLAG,
    "num_workers": _whole(0),
    "bn_stats": _one_of("frozen", "train"),
    "patch_grid": _whole(1),
    "upsample": _one_of(*UPSAMPLING),
    "label_dilation": _whole(0),
    "coordinate_stats": FLAG,
    "num_envs": _whole(1),
    "batching": _one_of("auto", "vmap", "loop"),
}
# Names and paths, checked where they are resolved (an unknown one is one error there), and the
# env's list of instances, each checked against this table by the env (asg_env.envs.env).
ENV_FREE_FORM = ("task", "backbone", "weights", "data_root", "device", "source_root", "target_root", "instances")

# agent.reinforce: agents.reinforce.ReinforceConfig.
REINFORCE_SETTINGS: dict[str, Setting] = {
    "hidden_size": _whole(1),
    "unroll": _whole(1),
    "optimizer": _one_of("adam", "sgd"),
    "lr": _number(0, above=True),
    "entropy_coef": _number(0),
    "baseline": _one_of("per-step", "none"),
    "baseline_decay": _number(0, 1, below=True),
    "max_grad_norm": _number(0, above=True),
    "network": _one_of("paper", "coordinate-wise"),
    "returns": _one_of("discounted", "immediate"),
    "gamma": _number(0, 1),
    "reward_scale": _one_of("initial_loss", "none"),
}
# agent.es: agents.es.ESConfig.
ES_SETTINGS: dict[str, Setting] = {
    "network": _one_of("paper", "coordinate-wise"),
    "hidden_size": _whole(1),
    "pairs": _whole(1),
    "sigma": _number(0, above=True),
    "lr": _number(0, above=True),
    "workers": _whole(1),
}
# agent.<sb3 agent>: the numeric hyperparameters of SB3's PPO, RecurrentPPO and A2C. Any other
# keyword goes to SB3 as it is, and an error there is one line too.
SB3_SETTINGS: dict[str, Setting] = {
    "n_steps": _whole(1),
    "batch_size": _whole(1),
    "n_epochs": _whole(1),
    "learning_rate": _number(0, above=True),
    "gamma": _number(0, 1),
    "gae_lambda": _number(0, 1),
    "ent_coef": _number(0),
    "vf_coef": _number(0),
    "clip_range": _number(0, above=True),
    "max_grad_norm": _number(0, above=True),
    "normalize": FLAG,  # ASG-Gym's, not SB3's: train behind VecNormalize (observations and rewards)
}
# adapt.py's self_training section: asg_env.adaptation.self_training.SelfTrainingConfig.
SELF_TRAINING_SETTINGS: dict[str, Setting] = {
    "method": _one_of("cbst", "crst-mrkld", "crst-lrent", "crst-mrkld-lrent"),
    "rounds": _whole(1),
    "epochs_per_round": _whole(1),
    "init_tgt_port": _number(0, 1, above=True),
    "tgt_port_step": _number(0, 1),
    "max_tgt_port": _number(0, 1, above=True),
    "init_src_port": _number(0, 1),
    "src_port_step": _number(0, 1),
    "max_src_port": _number(0, 1),
    "lr": _number(0, above=True, optional=True),
    "lr_ratio": _number(0, above=True),
    "head_lr_mult": _number(0),
    "momentum": _number(0, 1, below=True),
    "weight_decay": _number(0),
    "batch_size": _whole(1, optional=True),
    "ds_rate": _whole(1),
    "mr_weight_kld": _number(0, optional=True),
    "lr_weight_ent": _number(0, above=True, optional=True),
    "kld_weight_squared": FLAG,
    "test_flipping": FLAG,
    "seed": _whole(0),
}
TRAIN_SETTINGS: dict[str, Setting] = {
    "episodes": _whole(1),
    "seed": _whole(0),
    "num_envs": _whole(1),
    "vector": _one_of("auto", "batched", "processes"),
    "check": _whole(0),  # held-out check runs per policy after training (REINFORCE and ES)
}


def check_settings(values: dict, table: dict[str, Setting], prefix: str = "", *, known_only: bool = True,
                   ignore: tuple[str, ...] = ()) -> None:
    """Raise one :class:`UserInputError` line for the first value outside its setting's range;
    with ``known_only``, a key that is neither in ``table`` nor in ``ignore`` is an error too."""
    for name, value in values.items():
        setting = table.get(name)
        if setting is None:
            if known_only and name not in ignore:
                raise UserInputError(f"unknown setting {prefix}{name}; known: {', '.join(sorted((*table, *ignore)))}")
            continue
        if not setting.allows(value):
            raise UserInputError(f"{prefix}{name} must be {setting.describe()}, not {value!r}")
