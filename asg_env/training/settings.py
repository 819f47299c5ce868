"""The settings of a fine-tuning run, each stated once: its default, its type and range, and one
line of help.

:class:`FineTuningSettings` is the single source. The trainers' signatures
(:class:`~asg_env.training.trainer.FineTuning`), the env's table of checked settings
(:data:`asg_env.envs.settings.ENV_SETTINGS`), the one-line messages for a bad value and the
settings table of the documentation (:func:`settings_table`) are all derived from its fields.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Any

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


def whole(low: int, high: int | None = None, **kw) -> Setting:
    return Setting(int, low, high, **kw)


def number(low: float | None = None, high: float | None = None, **kw) -> Setting:
    return Setting(float, low, high, **kw)


def one_of(*choices: str) -> Setting:
    return Setting(str, choices=choices)


FLAG = Setting(bool)


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


def setting(default: Any, check: Setting | None, help: str) -> Any:
    """A settings field: its default, its check (None: a name or a path, checked where it is
    resolved) and its one line of help."""
    return field(default=default, metadata={"check": check, "help": help})


@dataclass
class FineTuningSettings:
    """One fine-tuning run: the task, the model, the decisions and SGD, proxy guidance, the
    evaluation, and speed. ``FineTuning(**settings)`` takes these names as keywords."""

    # the task and the model
    task: Any = setting("syndigits", None, "a name in asg_env.tasks.registry.TASKS (syndigits, digitscenes, visda, "
                        "gta5, imagefolder, segfolder) or a Task built in code")
    backbone: str = setting("efficientnet_lite0", None, "efficientnet_lite0/1/2, resnet50, resnet101, vgg16, or "
                            "timm:<name> / torchvision:<name>; inputs normalised as its weights expect")
    weights: str | None = setting("imagenet", None, "imagenet (torchvision: IMAGENET1K_V1), a torchvision weight "
                                  "name, a file path, or null for a random backbone")
    data_root: str | None = setting(None, None, "dataset root (VisDA-17, GTA5/Cityscapes; falls back to $ASG_DATA) "
                                    "or the embedded tasks' render cache (default ~/.cache/asg-gym, or $ASG_CACHE)")
    source_root: str | None = setting(None, None, "imagefolder / segfolder: the synthetic training images")
    target_root: str | None = setting(None, None, "imagefolder / segfolder: the real images, only evaluated on")
    head: str = setting("linear", one_of(*HEADS), "θ_n: linear (the paper's) or mlp (the official 2048→512→classes)")
    image_size: int = setting(32, whole(1), "square input size (at least the backbone's minimum)")
    batch_size: int = setting(32, whole(1), "the global training batch (split over the ranks under torchrun)")
    source_size: int = setting(10_000, whole(1), "rendered SynDigits / SynDigitScenes training images")
    render_seed: int = setting(0, whole(0), "the seed the embedded tasks render their synthetic images from")
    label_dilation: int = setting(3, whole(0), "SynDigitScenes: a digit's label also covers the background within "
                                  "this many pixels of its strokes")
    patch_grid: int = setting(1, whole(1), "segmentation: dense proxy guidance on g × g pooled patches of the last "
                              "feature map (Eq. 5); 1 pools the whole map, as the official train_seg.py")
    upsample: str = setting("deconv", one_of(*UPSAMPLING), "segmentation: FCN-8s upsampling as learned transposed "
                            "convolutions initialised bilinear (deconv, the official) or fixed bilinear")
    bn_stats: str = setting("frozen", one_of("frozen", "train"), "frozen: eval mode, ImageNet statistics, affine "
                            "parameters train (the official protocol); train: batch statistics")
    # the decisions
    episode_steps: int | None = setting(100, whole(1, optional=True), "T, the number of decisions (window=fixed); "
                                        "null: one decision per SGD step")
    sgd_steps_per_action: int = setting(1, whole(1), "SGD steps a decision holds its action for; with "
                                        "window=growing, the shortest window (the official _min_iter, 10)")
    sgd_steps: int | None = setting(None, whole(1, optional=True), "the run's SGD steps, split evenly over the "
                                    "decisions (default T × sgd_steps_per_action)")
    epochs: float | None = setting(None, number(0, above=True, optional=True), "the run's length in passes over the "
                                   "source instead of sgd_steps")
    window: str = setting("fixed", one_of(*WINDOWS), "fixed, or growing: the official release's windows, which "
                          "roughly double within each epoch (T then follows from sgd_steps)")
    reward_batch: str = setting("train", one_of("train", "heldout"), "the losses a decision reads: train (the "
                                "window's training losses, the paper's) or heldout (one fixed held-out batch)")
    coordinate_stats: bool = setting(False, FLAG, "also measure each coordinate's gradient norm, update ratio and "
                                     "distance from the start at the end of every window")
    # proxy guidance
    lam: float = setting(0.1, number(0), "λ, the weight of the guidance term; 0 disables it (no teacher pass)")
    guidance: str = setting("kl", one_of(*GUIDANCES), "what keeps the student near its ImageNet self: kl (proxy "
                            "guidance, the paper's), l2sp, feature_l2, si or none")
    # SGD
    lr_base: float = setting(0.02, number(0), "η_base; a decision's scale a_c sets lr_c = a_c · η_base "
                             "(0 freezes the run)")
    momentum: float = setting(0.9, number(0, 1, below=True), "SGD momentum, shared by all coordinates")
    weight_decay: float = setting(5e-4, number(0), "SGD weight decay, shared by all coordinates")
    sgd: str = setting("official", one_of(*SGD_FORMS), "official (learning rate inside the momentum) or torch")
    lr_schedule: str = setting("constant", one_of(*LR_SCHEDULES), "constant (the action alone sets the rate) or "
                               "poly (the official train.py's warm-up and poly decay on top)")
    warmup_steps: int = setting(100, whole(0), "poly: the quadratic warm-up's SGD steps")
    # evaluation
    eval_every: int | str = setting(0, whole(0, choices=("epoch",)), "evaluate every this many decisions, or "
                                    "epoch (0: only at the end)")
    target_eval_size: int = setting(1000, whole(0), "target images evaluated on (0: the task's whole target set)")
    synthetic_eval_size: int = setting(500, whole(0), "held-out synthetic images, never trained on, for synthetic_acc "
                                       "and synthetic_xe (0: none)")
    imagenet_photos: int = setting(20, whole(0, 20), "how many of the 20 ImageNet photos evaluations classify with θ_o")
    tta_flip: bool = setting(False, FLAG, "evaluate on the mean of each image's and its mirror's sigmoid scores "
                             "(the official validate)")
    # speed
    device: str = setting("cpu", None, "torch device")
    channels_last: bool = setting(True, FLAG, "channels-last memory format")
    amp: bool = setting(False, FLAG, "bf16 autocast on CUDA (losses and rewards in fp32)")
    compile: str | None = setting(None, Setting(str, choices=("inductor", "aot_eager", "eager"), optional=True),
                                  "torch.compile the training step with this backend; null: eager")
    cache_teacher: bool = setting(True, FLAG, "cache the teacher's outputs per source image when the source has no "
                                  "random augmentation")
    num_workers: int = setting(2, whole(0), "DataLoader workers for file-based tasks")

    @classmethod
    def checked(cls, values: dict) -> FineTuningSettings:
        """The settings from keywords: an unknown name or a value out of range is one
        :class:`UserInputError` line."""
        check_settings(values, FINE_TUNING_CHECKS, ignore=FREE_FORM)
        return cls(**values)


@dataclass
class BatchedSettings:
    """What :class:`~asg_env.training.trainer.BatchedTrainer` (and the vector env) adds."""

    num_envs: int = setting(1, whole(1), "N, the runs held at once as one batched model: the first argument of "
                            "BatchedTrainer and the vector env (gym.make_vec's num_envs)")
    batching: str = setting("auto", one_of("auto", "vmap", "loop"), "how N runs are computed: vmap (one batched "
                            "model) or loop (run by run on views of the stacked weights); auto: loop on a CPU, "
                            "vmap elsewhere")


FIELDS = dataclasses.fields(FineTuningSettings)
DEFAULTS = {f.name: f.default for f in FIELDS}
BATCHED_FIELDS = dataclasses.fields(BatchedSettings)
BATCHED_CHECKS: dict[str, Setting] = {f.name: f.metadata["check"] for f in BATCHED_FIELDS}
FINE_TUNING_CHECKS: dict[str, Setting] = {f.name: f.metadata["check"] for f in FIELDS if f.metadata["check"]}
FREE_FORM = tuple(f.name for f in FIELDS if f.metadata["check"] is None)  # names and paths


def keyword_signature(fields, first: list[inspect.Parameter] | None = None) -> inspect.Signature:
    """A constructor's signature from settings fields: ``self``, then each as a keyword with its default."""
    self = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return inspect.Signature([self, *(first or []), *(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                                                          default=f.default) for f in fields)])


def settings_table(fields=FIELDS) -> str:
    """The documentation's table of settings (Markdown): name, default, what it allows, help."""
    rows = ["| setting | default | allows | what it does |", "|---|---|---|---|"]
    for f in fields:
        check = f.metadata["check"]
        allows = check.describe() if check else "a name or a path"
        default = "null" if f.default is None else repr(f.default) if isinstance(f.default, str) else f"{f.default:g}" \
            if isinstance(f.default, float) else str(f.default).lower() if isinstance(f.default, bool) else f.default
        rows.append(f"| `{f.name}` | `{default}` | {allows} | {f.metadata['help']} |")
    return "\n".join(rows) + "\n"
