"""ASG fine-tuning as a Gymnasium environment (ASG §2, Algorithm 1).

One episode is one fine-tuning run of an ImageNet model on synthetic images, ``T`` decisions
long. Each decision picks a learning-rate scale ``a_c ∈ {0, 0.1, …, 1.0}`` for every
optimization coordinate ``c``; the env then holds it for a window of SGD steps with
``lr_c = a_c · lr_base`` (momentum 0.9, weight decay 5e-4) on ``L = L_XE + λ L_KL``.

Observation (float32, clipped to finite bounds; names in ``obs_names``)::

    [L_XE, L_KL, t/T, mean(θ_n), std(θ_n), a_{t-1,1}/10, …, a_{t-1,C}/10]

Reward: ``r_t = L_{t-1} − L_t`` (Algorithm 1, line 8), a Python float. Which batch ``L`` is
measured on is set by ``reward_batch``:

* ``"train"`` (the paper's, and free): the mean over the window of the training losses
  measured after each SGD step, on the next training batch with the parameters that step
  produced. Each of those forward passes is the one the next SGD step back-propagates, so the
  env does exactly the work of a plain training loop. Batch-to-batch noise is part of it.
* ``"heldout"``: the loss of one fixed held-out *synthetic* batch after the window. Less
  noisy, at the cost of one extra forward pass per decision.

The observation's losses are the reward's. The official release likewise averages its
observation over the window (``obs_avg=True``).

The protocol follows the official release: the whole model stays in eval mode, so BatchNorm
normalises with the ImageNet statistics while its affine parameters train; at reset the
student's ImageNet head therefore equals the teacher and ``L_KL = 0``. SGD puts the learning
rate inside the momentum (``sgd="official"``, see :mod:`asg_env.optim`).

Divergence: a non-finite loss ends the episode (``terminated=True``) with reward
``divergence_penalty`` and ``info["diverged"] = True``; the observation is the last finite one.
"""

from __future__ import annotations

import contextlib
import math

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy

from asg_env.backbones import build_backbone, input_normalisation
from asg_env.coordinates import Coordinate, optimization_coordinates
from asg_env.errors import UserInputError
from asg_env.optim import SGD_FORMS, WINDOWS, action_windows, make_sgd, poly_factor
from asg_env.guidance import GUIDANCES, Guidance, make_guidance
from asg_env.imagenet_photos import load_imagenet_photos
from asg_env.proxy import HEADS, ProxyLoss, StudentNet, kl_to_teacher, make_teacher
from asg_env.tasks import Task, TensorSource, default_cache_dir, make_syndigits_task, make_visda_task
from asg_env.teacher_cache import DiskTeacherCache, MemoryTeacherCache

N_LEVELS = 11  # learning-rate scales 0, 0.1, …, 1.0
_LOSS_MAX, _STAT_MAX = 1e4, 1e3  # finite observation bounds; values are clipped into them
LR_SCHEDULES = ("constant", "poly")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise UserInputError(f"{name} must be one of {', '.join(map(repr, choices))}, not {value!r}")


class ASGEnv(gym.Env):
    """Layer-wise learning-rate control of proxy-guided syn→real fine-tuning.

    Args:
        task: ``"syndigits"`` (embedded, offline) or ``"visda"`` (VisDA-17 from ``data_root``).
        backbone: ``efficientnet_lite0``, ``resnet50``, ``resnet101`` or ``vgg16``. Inputs are
            normalised as the backbone's weights expect (0.5/0.5 for EfficientNet-Lite, the
            ImageNet mean/std for torchvision models).
        weights: ``"imagenet"`` (for torchvision models: ``IMAGENET1K_V1``, the paper's), a
            torchvision weight name, a file path, or ``None`` for an explicitly random backbone.
        data_root: dataset root (VisDA-17; falls back to ``$ASG_DATA``) or the SynDigits cache.
        episode_steps: T, the number of decisions in an episode (``window="fixed"``); ``None``
            for one decision per SGD step.
        sgd_steps_per_action: SGD steps each decision holds its action for; with
            ``window="growing"``, the shortest window (the official ``_min_iter``, 10).
        sgd_steps: total SGD steps of the episode. With ``window="fixed"`` they are split
            evenly over the T decisions; by default T × ``sgd_steps_per_action``.
        epochs: the episode's length in passes over the source instead of ``sgd_steps``.
        window: ``"fixed"`` or ``"growing"`` (the official release's windows, which roughly
            double within each epoch; T then follows from ``sgd_steps``).
        lam: λ, the weight of the guidance term; 0 disables it (no teacher pass).
        guidance: the term that keeps the student near its ImageNet self (see
            :mod:`asg_env.guidance`): ``"kl"`` (proxy guidance, the paper's), ``"l2sp"``,
            ``"feature_l2"``, ``"si"`` or ``"none"``. The observation's second loss is that term.
        lr_base: η_base. momentum, weight_decay: SGD settings shared by all coordinates.
        sgd: ``"official"`` (learning rate inside the momentum) or ``"torch"``; see
            :mod:`asg_env.optim`.
        lr_schedule: ``"constant"`` (the action alone sets the rate, as in ``l2o_train.py``)
            or ``"poly"``: the official ``train.py`` schedule (quadratic warm-up over
            ``warmup_steps``, poly decay 0.9) multiplies every rate.
        batch_size, image_size: training batch size and square input size.
        head: θ_n: ``"linear"`` (the paper's one fully-connected layer) or ``"mlp"`` (the
            official 2048→512→classes).
        reward_batch: ``"train"`` or ``"heldout"`` (see the module docstring).
        eval_every: evaluate on the real target every this many decisions, or ``"epoch"`` at
            the first decision that ends in each new epoch (0: only at the end).
        evaluate_target: switch target evaluation off entirely (faster policy training).
        target_eval_size: evaluate on this many target images (0: all of them).
        tta_flip: evaluate on the average of the sigmoid scores of each image and its
            horizontal flip (the official ``validate``).
        source_size: number of rendered SynDigits training images.
        synthetic_eval_size: further rendered SynDigits images, never trained on, on which
            evaluations report ``synthetic_acc`` (0: none).
        imagenet_photos: how many of the 20 ImageNet photos evaluations classify with θ_o
            (``imagenet_top1``; 0: none). They run at the backbone's native resolution.
        device: torch device. channels_last, amp: speed options (AMP only on CUDA, bf16).
        cache_teacher: cache the teacher's logits per source image when the source has no
            random augmentation (in memory for SynDigits, on disk for VisDA). Exact up to the
            disk cache's fp16, since the teacher is frozen.
        divergence_penalty: reward when the loss becomes non-finite.
        num_workers: DataLoader workers for file-based tasks.
        bn_stats: ``"frozen"`` (the official protocol): the model stays in eval mode, so
            BatchNorm uses the ImageNet statistics and only its affine parameters train.
            ``"train"``: BatchNorm normalises with batch statistics and updates its running
            statistics, whatever the action (a level-0 coordinate only stops its parameters).
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        task: str = "syndigits",
        backbone: str = "efficientnet_lite0",
        weights: str | None = "imagenet",
        data_root: str | None = None,
        episode_steps: int | None = 100,
        sgd_steps_per_action: int = 1,
        sgd_steps: int | None = None,
        epochs: float | None = None,
        window: str = "fixed",
        lam: float = 0.1,
        guidance: str = "kl",
        lr_base: float = 0.02,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        sgd: str = "official",
        lr_schedule: str = "constant",
        warmup_steps: int = 100,
        batch_size: int = 32,
        image_size: int = 32,
        head: str = "linear",
        reward_batch: str = "train",
        eval_every: int | str = 0,
        evaluate_target: bool = True,
        target_eval_size: int = 1000,
        tta_flip: bool = False,
        source_size: int = 10_000,
        synthetic_eval_size: int = 500,
        imagenet_photos: int = 20,
        device: str = "cpu",
        channels_last: bool = True,
        amp: bool = False,
        cache_teacher: bool = True,
        divergence_penalty: float = -10.0,
        num_workers: int = 2,
        bn_stats: str = "frozen",
    ):
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        for name, value, choices in (("bn_stats", bn_stats, ("frozen", "train")),
                                     ("reward_batch", reward_batch, ("train", "heldout")),
                                     ("window", window, WINDOWS), ("sgd", sgd, SGD_FORMS),
                                     ("lr_schedule", lr_schedule, LR_SCHEDULES), ("head", head, HEADS),
                                     ("guidance", guidance, GUIDANCES)):
            _choice(name, value, choices)
        if any(v is not None and v < 1 for v in (episode_steps, sgd_steps_per_action, sgd_steps)):
            raise UserInputError("episode_steps, sgd_steps_per_action and sgd_steps must be at least 1")
        if sgd_steps is not None and epochs is not None:
            raise UserInputError("give sgd_steps or epochs, not both")
        if epochs is not None and not epochs > 0:
            raise UserInputError(f"epochs must be positive, not {epochs}")
        if eval_every != "epoch" and not (isinstance(eval_every, int) and eval_every >= 0):
            raise UserInputError(f"eval_every must be a count of decisions (0: at the end) or 'epoch', not {eval_every!r}")
        self.device = torch.device(device)
        self.bn_stats, self.sgd, self.lr_schedule, self.warmup_steps = bn_stats, sgd, lr_schedule, int(warmup_steps)
        self.lam, self.lr_base = float(lam), float(lr_base)
        self.momentum, self.weight_decay = momentum, weight_decay
        self.reward_batch, self.eval_every, self.tta_flip = reward_batch, eval_every, bool(tta_flip)
        self.evaluate_target_enabled = bool(evaluate_target)
        self.divergence_penalty = float(divergence_penalty)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.amp = bool(amp) and self.device.type == "cuda"

        mean, std = input_normalisation(backbone)
        if task == "syndigits":
            self.task: Task = make_syndigits_task(
                image_size, batch_size, self.device, mean, std, data_root, source_size, target_eval_size,
                synthetic_eval_size=synthetic_eval_size,
            )
        elif task == "visda":
            self.task = make_visda_task(image_size, batch_size, self.device, mean, std, data_root, target_eval_size, num_workers)
        else:
            raise UserInputError(f"unknown task {task!r}; choose 'syndigits' or 'visda'")
        parts = build_backbone(backbone, weights)
        self.mean, self.std, self.input_size = mean, std, parts.input_size
        if imagenet_photos < 0:
            raise UserInputError(f"imagenet_photos must be 0 or more (20 at most are used), not {imagenet_photos}")
        self.imagenet_photos = int(imagenet_photos)
        self.backbone_name = parts.name

        if epochs is not None:
            sgd_steps = max(1, round(epochs * self.task.steps_per_epoch))
        if episode_steps is None and sgd_steps is None:
            raise UserInputError("episode_steps=None (a decision per SGD step) needs sgd_steps or epochs")
        if window == "fixed" and None not in (sgd_steps, episode_steps) and sgd_steps < episode_steps:
            raise UserInputError(f"{sgd_steps} SGD steps cannot hold episode_steps={episode_steps} decisions")
        self.windows = action_windows(window, episode_steps, int(sgd_steps_per_action), sgd_steps,
                                      self.task.steps_per_epoch)
        self.T, self.total_sgd_steps = len(self.windows), sum(self.windows)
        self.teacher = make_teacher(parts).to(self.device, memory_format=self.memory_format)
        self.student = StudentNet(parts, self.task.num_classes, head).to(self.device, memory_format=self.memory_format)
        self.coordinates: list[Coordinate] = optimization_coordinates(self.student.features, self.student.new_head)
        # ImageNet weights kept in memory: reset() restores them without touching the disk.
        self._imagenet_state = {
            k: v.detach().clone() for k, v in self.student.state_dict().items() if not k.startswith("new_head.")
        }
        self.student.eval()
        active = self.lam > 0 and guidance != "none"
        self.guidance: Guidance = make_guidance(guidance if active else "none", self.student,
                                                self.task.heldout[0] if guidance == "si" else None)
        needs_teacher = self.guidance.teacher_output is not None
        self._teacher_heldout = self._teacher_out(self.task.heldout[0]) if needs_teacher else None
        self._teacher_cache = self._make_teacher_cache(weights) if needs_teacher and cache_teacher else None
        self._target_reference: dict | None = None  # the teacher's target / ImageNet-photo predictions

        C = len(self.coordinates)
        self.last_action = np.full(C, N_LEVELS - 1, dtype=np.int64)
        self.coordinate_names = [c.name for c in self.coordinates]
        self.obs_names = ["loss_xe", "loss_guidance", "progress", "head_weight_mean", "head_weight_std"] + [
            f"last_action/{n}" for n in self.coordinate_names
        ]
        self._obs_high = np.array([_LOSS_MAX, _LOSS_MAX, 1.0, _STAT_MAX, _STAT_MAX] + [1.0] * C, np.float32)
        self._obs_low = np.array([0.0, 0.0, 0.0, -_STAT_MAX, 0.0] + [0.0] * C, np.float32)
        self.observation_space = spaces.Box(self._obs_low, self._obs_high, dtype=np.float32)
        self.action_space = spaces.MultiDiscrete([N_LEVELS] * C)

    # ----------------------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        head_seed, data_seed = (int(s) for s in self.np_random.integers(2**31 - 1, size=2))
        torch.manual_seed(head_seed)  # only stochastic layers (VGG's dropout, bn_stats="train") draw from it

        self.student.load_state_dict(self._imagenet_state, strict=False)
        self._init_new_head(torch.Generator(device="cpu").manual_seed(head_seed))
        self.optimizer = make_sgd(
            self.sgd, [{"params": c.params, "lr": self.lr_base, "name": c.name} for c in self.coordinates],
            lr=self.lr_base, momentum=self.momentum, weight_decay=self.weight_decay,
        )
        self.task.source.reset(data_seed)

        self.t = self.sgd_step = 0
        self.diverged = False
        self.last_action = np.full(len(self.coordinates), N_LEVELS - 1, dtype=np.int64)
        self.student.train(self.bn_stats == "train")
        self._pending = self._train_losses()  # L_0 (Algorithm 1, line 2)
        losses = self._pending if self.reward_batch == "train" else self._heldout_losses()
        self._values = self._read(losses)
        self._obs = self._observation(self._values)
        return self._obs.copy(), self._info(self._values)

    def step(self, action):
        action = np.asarray(action, dtype=np.int64).reshape(-1)
        if not self.action_space.contains(action):
            raise UserInputError(f"action {action.tolist()} is outside {self.action_space}")
        if self.diverged:
            return self._obs.copy(), 0.0, True, False, {"diverged": True}
        scales = action / (N_LEVELS - 1)
        self.last_action = action
        window = self.windows[self.t]
        epoch_before = self.sgd_step // self.task.steps_per_epoch

        sums = None
        for _ in range(window):
            factor = poly_factor(self.sgd_step, self.total_sgd_steps, self.warmup_steps) if self.lr_schedule == "poly" else 1.0
            for group, scale in zip(self.optimizer.param_groups, scales):
                group["lr"] = float(scale) * self.lr_base * factor
            self.optimizer.zero_grad(set_to_none=True)
            self._pending.total.backward()
            self.optimizer.step()
            self.sgd_step += 1
            self._pending = self._train_losses()  # forward of the next batch with the new θ
            step_losses = torch.stack([self._pending.xe, self._pending.guidance, self._pending.total]).detach()
            sums = step_losses if sums is None else sums + step_losses
        self.t += 1
        if self.reward_batch == "train":
            xe, kl, total = sums / window
            values = self._read(ProxyLoss(total, xe, kl))
        else:
            values = self._read(self._heldout_losses())

        previous = self._values["loss"]
        if not all(math.isfinite(v) for v in (*values.values(), float(sums[2]))):
            self.diverged = True
            self._obs[2] = self.t / self.T
            return self._obs.copy(), self.divergence_penalty, True, False, self._info(values)

        self._values = values
        self._obs = self._observation(values)
        terminated = self.t >= self.T
        info = self._info(values)
        if self.eval_every == "epoch":
            due = self.sgd_step // self.task.steps_per_epoch > epoch_before
        else:
            due = bool(self.eval_every) and self.t % self.eval_every == 0
        if self.evaluate_target_enabled and (terminated or due):
            info.update(self.evaluate_target())
        return self._obs.copy(), previous - values["loss"], terminated, False, info

    # ------------------------------------------------------------------------- evaluation
    def evaluate_target(self) -> dict[str, float]:
        """What the paper measures, without touching the training trajectory.

        * ``target_acc``, ``target_mean_class_acc``: the new head θ_n on the real target set
          (with ``tta_flip``, each image's sigmoid scores averaged with its mirror image's).
        * ``target_kl``: KL(teacher ‖ θ_o) on the real target images, the continuous measure of
          how much of the ImageNet model survives; ``teacher_agreement`` is its top-1 cousin.
        * ``imagenet_top1`` (θ_o) and ``imagenet_teacher_top1``: top-1 on the 20 real ImageNet
          validation photos of the ``foolbox`` wheel at the backbone's native resolution, the
          embedded stand-in for Table 2's ImageNet column (absent without ``foolbox``).
        * ``synthetic_acc``: θ_n on held-out synthetic images, where the task has them.

        Runs in eval mode under ``inference_mode``, so neither the weights nor the BatchNorm
        statistics change. The teacher's outputs are computed once and kept.
        """
        was_training = self.student.training
        self.student.eval()
        first = self._target_reference is None
        ref = self._target_reference if not first else {"target": [], "photos": None}
        preds, labels, kls, agree = [], [], [], []
        with torch.inference_mode(), self._autocast():
            for i, (x, y) in enumerate(self.task.target.batches()):
                x = x.contiguous(memory_format=self.memory_format)
                features = self.student.features(x)
                new, old = self.student.new_head(features), self.student.imagenet_head(features)
                if self.tta_flip:
                    new = (new.float().sigmoid() + self.student(x.flip(3))[0].float().sigmoid()) / 2
                if first:
                    ref["target"].append(self.teacher(x).float())
                teacher = ref["target"][i]
                preds.append(new.argmax(1))
                labels.append(y)
                kls.append(kl_to_teacher(old, teacher) * len(y))
                agree.append((old.argmax(1) == teacher.argmax(1)).sum())
            preds, labels = torch.cat(preds), torch.cat(labels)
            k = self.task.num_classes
            out = {
                "target_acc": multiclass_accuracy(preds, labels, k, average="micro"),
                "target_mean_class_acc": multiclass_accuracy(preds, labels, k, average="macro"),
                "target_kl": torch.stack(kls).sum() / len(labels),
                "teacher_agreement": torch.stack(agree).sum() / len(labels),
            }
            if self.task.source_eval is not None:
                sx, sy = zip(*[(self.student(x.contiguous(memory_format=self.memory_format))[0].argmax(1), y)
                               for x, y in self.task.source_eval.batches()])
                out["synthetic_acc"] = multiclass_accuracy(torch.cat(sx), torch.cat(sy), k, average="micro")
            photos = ref["photos"]
            if first and self.imagenet_photos:
                photos = load_imagenet_photos(self.input_size, self.mean, self.std, self.device)
                photos = None if photos is None else (photos[0][: self.imagenet_photos], photos[1][: self.imagenet_photos])
            if photos is not None:
                x, y = photos
                x = x.contiguous(memory_format=self.memory_format)
                if first:
                    ref["photos"] = photos
                    ref["imagenet_teacher_top1"] = (self.teacher(x).argmax(1) == y).float().mean()
                out["imagenet_top1"] = (self.student(x)[1].argmax(1) == y).float().mean()
                out["imagenet_teacher_top1"] = ref["imagenet_teacher_top1"]
        self._target_reference = ref
        self.student.train(was_training)
        keys = list(out)
        return dict(zip(keys, torch.stack([torch.as_tensor(out[k_], dtype=torch.float32, device=self.device)
                                           for k_ in keys]).tolist()))

    # ---------------------------------------------------------------------------- helpers
    def _autocast(self):
        if self.amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _teacher_out(self, x: torch.Tensor) -> torch.Tensor:
        """What the guidance compares the student with: the teacher's logits or features."""
        with torch.inference_mode(), self._autocast():
            x = x.contiguous(memory_format=self.memory_format)
            out = self.teacher[0](x) if self.guidance.teacher_output == "features" else self.teacher(x)
        return out.clone()  # a normal tensor: inference tensors cannot be saved for backward

    def _make_teacher_cache(self, weights) -> MemoryTeacherCache | DiskTeacherCache | None:
        width = self.student.imagenet_head.out_features if self.guidance.teacher_output == "logits" else self.student.imagenet_head.in_features
        if isinstance(self.task.source, TensorSource):
            return MemoryTeacherCache(len(self.task.source), width, self.device)
        if self.task.cached_images is None:
            return None
        key = f"{self.task.teacher_cache_key}-{self.backbone_name}-{weights}-{self.guidance.teacher_output}"
        return DiskTeacherCache.open_or_build(default_cache_dir(), key, self.task.cached_images, self._teacher_out,
                                              width, self.device, num_workers=self.task.source.loader.num_workers)

    def _losses_on(self, x: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor | None) -> ProxyLoss:
        with self._autocast():
            features = self.student.features(x)
            xe = F.cross_entropy(self.student.new_head(features).float(), y)
            term = self.guidance(self.student, features, teacher)
        return ProxyLoss(xe + self.lam * term, xe, term)

    def _train_losses(self) -> ProxyLoss:
        x, y, index = self.task.source.next()
        x = x.contiguous(memory_format=self.memory_format)
        teacher = None
        if self.guidance.teacher_output is not None:
            cached = self._teacher_cache is not None and index is not None
            teacher = self._teacher_cache(x, index, self._teacher_out) if cached else self._teacher_out(x)
        return self._losses_on(x, y, teacher)

    def _heldout_losses(self) -> ProxyLoss:
        x, y = self.task.heldout
        was_training = self.student.training
        self.student.eval()
        with torch.no_grad():
            losses = self._losses_on(x.contiguous(memory_format=self.memory_format), y, self._teacher_heldout)
        self.student.train(was_training)
        return losses

    def _init_new_head(self, generator: torch.Generator) -> None:
        """θ_n with PyTorch's default Linear init, drawn from the episode's seed."""
        with torch.no_grad():
            for layer in self.student.new_head.modules():
                if isinstance(layer, nn.Linear):
                    bound = 1.0 / math.sqrt(layer.in_features)
                    for p in (layer.weight, layer.bias):
                        p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=generator))

    def _read(self, losses: ProxyLoss) -> dict[str, float]:
        """The losses and θ_n's weight statistics as floats, in one host-device transfer."""
        w = self.student.classifier.weight.detach()
        values = torch.stack([losses.total.detach(), losses.xe.detach(), losses.guidance.detach(), w.mean(), w.std()])
        return dict(zip(("loss", "loss_xe", "loss_guidance", "head_weight_mean", "head_weight_std"), values.tolist()))

    def _observation(self, values: dict[str, float]) -> np.ndarray:
        obs = np.concatenate([
            [values["loss_xe"], values["loss_guidance"], self.t / self.T, values["head_weight_mean"], values["head_weight_std"]],
            self.last_action / (N_LEVELS - 1),
        ]).astype(np.float32)
        return np.clip(obs, self._obs_low, self._obs_high)

    def _info(self, values: dict[str, float]) -> dict:
        return {
            "step": self.t,
            "sgd_step": self.sgd_step,
            "loss": values["loss"],
            "loss_xe": values["loss_xe"],
            "loss_guidance": values["loss_guidance"],
            "lr": {g["name"]: g["lr"] for g in self.optimizer.param_groups},
            "diverged": self.diverged,
        }
