import dataclasses
import inspect
import math
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from agents.config import SB3_SETTINGS, TRAIN_SETTINGS
from agents.es import ES_SETTINGS, ESConfig
from agents.reinforce import REINFORCE_SETTINGS, ReinforceConfig
from asg_env import UserInputError
from asg_env.adaptation.self_training import SELF_TRAINING_SETTINGS, SelfTrainingConfig
from asg_env.envs.env import ASGEnv
from asg_env.envs.settings import ENV_FREE_FORM, ENV_SETTINGS, Setting, check_settings
from asg_env.training.backbones import MIN_IMAGE_SIZE, build_backbone, check_image_size
from asg_env.training.proxy import StudentNet
from asg_env.training.trainer import BatchedTrainer, Trainer

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _parameters(fn) -> set[str]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {name for name, p in inspect.signature(fn).parameters.items() if p.kind in kinds} - {"self"}


def test_every_env_and_agent_setting_has_an_entry():
    assert (_parameters(Trainer.__init__) | _parameters(BatchedTrainer.__init__) | _parameters(ASGEnv.__init__)
            == set(ENV_SETTINGS) | set(ENV_FREE_FORM))
    assert {f.name for f in dataclasses.fields(ReinforceConfig)} == set(REINFORCE_SETTINGS)
    assert {f.name for f in dataclasses.fields(ESConfig)} == set(ES_SETTINGS)
    assert {f.name for f in dataclasses.fields(SelfTrainingConfig)} == set(SELF_TRAINING_SETTINGS)
    from agents.config import DEFAULTS

    assert set(TRAIN_SETTINGS) == set(DEFAULTS["train"])  # every train setting has its default


def test_every_default_is_allowed():
    """The shipped defaults pass their own checks (and so do the registered envs')."""
    import gymnasium as gym

    for fn in (Trainer.__init__, BatchedTrainer.__init__, ASGEnv.__init__):
        for name, p in inspect.signature(fn).parameters.items():
            if name in ENV_SETTINGS and p.default is not p.empty:
                assert ENV_SETTINGS[name].allows(p.default), name
    ours = [spec for spec in gym.registry.values() if spec.entry_point == "asg_env.envs.env:ASGEnv"]
    assert len(ours) >= 6
    for spec in ours:
        check_settings(spec.kwargs, ENV_SETTINGS, ignore=ENV_FREE_FORM)
    check_settings(dataclasses.asdict(ReinforceConfig()), REINFORCE_SETTINGS)
    check_settings(dataclasses.asdict(ESConfig()), ES_SETTINGS)
    check_settings(dataclasses.asdict(SelfTrainingConfig()), SELF_TRAINING_SETTINGS)


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(CONFIGS) if f.endswith(".yaml")))
def test_every_shipped_config_passes_the_checks(name):
    from agents.config import check_run_config, load_config, read_config_file
    from train_policy import AGENTS

    raw = read_config_file(os.path.join(CONFIGS, name))
    if "self_training" in raw:  # adapt.py's
        assert set(raw) == {"self_training"}
        check_settings(raw["self_training"], SELF_TRAINING_SETTINGS)
        return
    config = load_config(os.path.join(CONFIGS, name))
    check_run_config(config, AGENTS)
    check_settings(config["env"]["kwargs"], ENV_SETTINGS, ignore=ENV_FREE_FORM)


NUMERIC = [(name, s) for table in (ENV_SETTINGS, REINFORCE_SETTINGS, ES_SETTINGS, SB3_SETTINGS, TRAIN_SETTINGS, SELF_TRAINING_SETTINGS)
           for name, s in table.items() if s.kind in (int, float)]


@pytest.mark.parametrize("name, setting", NUMERIC, ids=[n for n, _ in NUMERIC])
@given(value=st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True)))
def test_a_number_is_allowed_exactly_when_it_lies_in_the_range(name, setting, value):
    inside = (math.isfinite(value) and (setting.kind is float or isinstance(value, int))
              and (setting.low is None or value > setting.low or (value == setting.low and not setting.above))
              and (setting.high is None or value < setting.high or (value == setting.high and not setting.below)))
    assert setting.allows(value) == inside
    if not inside:
        with pytest.raises(UserInputError) as err:
            check_settings({name: value}, {name: setting}, "x.")
        message = str(err.value)
        assert message.startswith(f"x.{name} must be ") and "\n" not in message


@given(value=st.one_of(st.text(max_size=5), st.booleans(), st.none(), st.lists(st.integers(), max_size=2)))
def test_words_flags_and_lists_are_not_numbers(value):
    assert not Setting(int, 0).allows(value)
    assert not Setting(float).allows(value)
    assert Setting(bool).allows(value) == isinstance(value, bool)
    assert Setting(int, 0, optional=True).allows(value) == (value is None)


def test_messages_say_what_is_allowed():
    cases = {"batch_size": (0, "a whole number ≥ 1"), "lr_base": (-1, "a finite number ≥ 0"),
             "momentum": (1.0, "a finite number in [0, 1)"), "eval_every": ("often", "a whole number ≥ 0 or 'epoch'"),
             "episode_steps": (2.5, "a whole number ≥ 1 or null"), "bn_stats": ("batch", "one of 'frozen', 'train'"),
             "amp": ("yes", "true or false")}
    for name, (value, allowed) in cases.items():
        with pytest.raises(UserInputError, match="^" + f"{name} must be {allowed}, not {value!r}".replace("(", r"\(")
                           .replace(")", r"\)").replace("[", r"\[")):
            check_settings({name: value}, ENV_SETTINGS)
    with pytest.raises(UserInputError, match="unknown setting agent.reinforce.hiden_size; known: baseline"):
        check_settings({"hiden_size": 3}, REINFORCE_SETTINGS, "agent.reinforce.")


def test_the_trainer_checks_before_it_renders_anything(tmp_path, monkeypatch):
    import asg_env.tasks.registry

    def no_render(*args, **kwargs):
        raise AssertionError("rendered before checking the settings")

    monkeypatch.setattr(asg_env.tasks.registry, "load_syndigits", no_render)
    for bad in ({"batch_size": 0}, {"lr_base": -1.0}, {"image_size": 4}, {"target_eval_size": -1}, {"lam": math.nan}):
        with pytest.raises(UserInputError):
            Trainer(data_root=str(tmp_path), **bad)
    with pytest.raises(UserInputError, match="divergence_penalty must be a finite number"):
        ASGEnv(divergence_penalty=math.inf, data_root=str(tmp_path))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", sorted(MIN_IMAGE_SIZE))
def test_the_smallest_image_size_runs_and_one_pixel_less_is_refused(name):
    smallest = MIN_IMAGE_SIZE[name]
    with pytest.raises(UserInputError, match=f"image_size must be at least {smallest} for {name}"):
        check_image_size(name, smallest - 1)
    check_image_size(name, smallest)
    student = StudentNet(build_backbone(name, weights=None), 10).eval()
    with torch.no_grad():
        new, old = student(torch.randn(2, 3, smallest, smallest))
    assert new.shape == (2, 10) and old.shape == (2, 1000)
    if name == "vgg16":  # below its output stride VGG-16's last pooling has nothing left to pool
        with pytest.raises(RuntimeError), torch.no_grad():
            student(torch.randn(2, 3, smallest - 1, smallest - 1))


def test_the_documented_settings_tables_are_the_dataclasses():
    from agents.config import agent_settings_markdown
    from asg_env.envs.settings import settings_markdown

    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "settings.md")) as fh:
        page = fh.read()
    for tables in (settings_markdown(), agent_settings_markdown()):
        assert tables in page
    assert "| `lr_base` | `0.02` | a finite number ≥ 0 |" in page  # the table says what the field holds


def test_the_settings_hash_names_what_was_run_not_where():
    from asg_env.provenance import settings_hash

    here = {"env_kwargs": {"lr_base": 0.003, "data_root": "/data/a", "device": "cpu"}, "setting": "x"}
    there = {"env_kwargs": {"lr_base": 0.003, "data_root": "/mnt/b", "device": "cuda"}, "setting": "x"}
    other = {"env_kwargs": {"lr_base": 0.005, "data_root": "/data/a", "device": "cpu"}, "setting": "x"}
    assert settings_hash(here) == settings_hash(there) != settings_hash(other)
