"""ASG fine-tuning as a Gymnasium environment (ASG §2, Algorithm 1).

One episode is one fine-tuning run of an ImageNet model on synthetic images, ``T`` actions
long. Each action picks a learning-rate scale ``a_c ∈ {0, 0.1, …, 1.0}`` for every
optimization coordinate ``c``; the env then takes ``sgd_steps_per_action`` SGD steps with
``lr_c = a_c · lr_base`` (momentum 0.9, weight decay 5e-4) on ``L = L_XE + λ L_KL``.

Observation (float32, clipped to finite bounds; names in ``obs_names``)::

    [L_XE, L_KL, t/T, mean(θ_n), std(θ_n), a_{t-1,1}/10, …, a_{t-1,C}/10]

Reward: ``r_t = L_{t-1} − L_t`` (Algorithm 1, line 8), a Python float. Which batch ``L`` is
measured on is set by ``reward_batch``:

* ``"train"`` (the paper's, and free): the loss of the *next* training batch, computed with
  the parameters the action produced. That forward pass is the one the next SGD step
  back-propagates, so the env does exactly the work of a plain training loop. Batch-to-batch
  noise is part of the reward.
* ``"heldout"``: the loss of one fixed held-out *synthetic* batch, in eval mode, after the
  action's SGD steps. Less noisy, at the cost of one extra forward pass per action.

The observation's losses come from the same batch as the reward.

Divergence: a non-finite loss ends the episode (``terminated=True``) with reward
``divergence_penalty`` and ``info["diverged"] = True``; the observation is the last finite one.
"""

from __future__ import annotations

import contextlib
import math

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy

from asg_env.backbones import build_backbone
from asg_env.coordinates import Coordinate, optimization_coordinates
from asg_env.errors import UserInputError
from asg_env.proxy import ProxyLoss, StudentNet, make_teacher, proxy_guidance_loss
from asg_env.tasks import Task, make_syndigits_task, make_visda_task

N_LEVELS = 11  # learning-rate scales 0, 0.1, …, 1.0
_LOSS_MAX, _STAT_MAX = 1e4, 1e3  # finite observation bounds; values are clipped into them


class ASGEnv(gym.Env):
    """Layer-wise learning-rate control of proxy-guided syn→real fine-tuning.

    Args:
        task: ``"syndigits"`` (embedded, offline) or ``"visda"`` (VisDA-17 from ``data_root``).
        backbone: ``efficientnet_lite0``, ``resnet50``, ``resnet101`` or ``vgg16``.
        weights: ``"imagenet"``, a torchvision weight name, a file path, or ``None`` for an
            explicitly random backbone (proxy guidance is then meaningless).
        data_root: dataset root (VisDA-17; falls back to ``$ASG_DATA``) or the SynDigits cache.
        episode_steps: T, the number of actions in an episode.
        sgd_steps_per_action: SGD steps taken with each action's learning rates.
        lam: λ, the weight of the proxy-guidance KL term; 0 disables it (no teacher pass).
        lr_base: η_base. momentum, weight_decay: SGD settings shared by all coordinates.
        batch_size, image_size: training batch size and square input size.
        reward_batch: ``"train"`` or ``"heldout"`` (see the module docstring).
        eval_every: evaluate on the real target every this many actions (0: only at the end).
        evaluate_target: switch target evaluation off entirely (faster policy training).
        target_eval_size: evaluate on this many target images (0: all of them).
        source_size: number of rendered SynDigits training images.
        device: torch device. channels_last, amp: speed options (AMP only on CUDA, bf16).
        cache_teacher: remember the teacher's logits per source image when the source has
            no random augmentation (SynDigits). Exact, since the teacher is frozen.
        divergence_penalty: reward when the loss becomes non-finite.
        num_workers: DataLoader workers for file-based tasks.
        bn_stats: ``"train"``: BatchNorm layers normalise with batch statistics and update their
            running statistics, except in coordinates whose current scale is 0, which are
            frozen entirely (ImageNet statistics, as the paper's "fix this group" implies).
            ``"frozen"``: every BatchNorm layer keeps the ImageNet statistics; its affine
            parameters still train.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        task: str = "syndigits",
        backbone: str = "efficientnet_lite0",
        weights: str | None = "imagenet",
        data_root: str | None = None,
        episode_steps: int = 100,
        sgd_steps_per_action: int = 1,
        lam: float = 0.1,
        lr_base: float = 0.02,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        batch_size: int = 32,
        image_size: int = 32,
        reward_batch: str = "train",
        eval_every: int = 0,
        evaluate_target: bool = True,
        target_eval_size: int = 1000,
        source_size: int = 10_000,
        device: str = "cpu",
        channels_last: bool = True,
        amp: bool = False,
        cache_teacher: bool = True,
        divergence_penalty: float = -10.0,
        num_workers: int = 2,
        bn_stats: str = "train",
    ):
        if bn_stats not in ("train", "frozen"):
            raise UserInputError(f"bn_stats must be 'train' or 'frozen', not {bn_stats!r}")
        self.bn_stats = bn_stats
        if reward_batch not in ("train", "heldout"):
            raise UserInputError(f"reward_batch must be 'train' or 'heldout', not {reward_batch!r}")
        if episode_steps < 1 or sgd_steps_per_action < 1:
            raise UserInputError("episode_steps and sgd_steps_per_action must be at least 1")
        self.device = torch.device(device)
        self.T, self.k = int(episode_steps), int(sgd_steps_per_action)
        self.lam, self.lr_base = float(lam), float(lr_base)
        self.momentum, self.weight_decay = momentum, weight_decay
        self.reward_batch, self.eval_every = reward_batch, int(eval_every)
        self.evaluate_target_enabled = bool(evaluate_target)
        self.divergence_penalty = float(divergence_penalty)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.amp = bool(amp) and self.device.type == "cuda"
        self.cache_teacher = bool(cache_teacher)

        if task == "syndigits":
            self.task: Task = make_syndigits_task(
                image_size, batch_size, self.device, data_root, source_size, target_eval_size
            )
        elif task == "visda":
            self.task = make_visda_task(image_size, batch_size, self.device, data_root, target_eval_size, num_workers)
        else:
            raise UserInputError(f"unknown task {task!r}; choose 'syndigits' or 'visda'")

        parts = build_backbone(backbone, weights)
        self.backbone_name = parts.name
        self.teacher = make_teacher(parts).to(self.device, memory_format=self.memory_format)
        self.student = StudentNet(parts, self.task.num_classes).to(self.device, memory_format=self.memory_format)
        self.coordinates: list[Coordinate] = optimization_coordinates(self.student.features, self.student.new_head)
        owner = {id(p): i for i, c in enumerate(self.coordinates) for p in c.params}
        self._coordinate_norms: list[list[nn.Module]] = [[] for _ in self.coordinates]
        for m in self.student.features.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                self._coordinate_norms[owner[id(m.weight)]].append(m)
        # ImageNet weights kept in memory: reset() restores them without touching the disk.
        self._imagenet_state = {
            k: v.detach().clone() for k, v in self.student.state_dict().items() if not k.startswith("new_head.")
        }
        self._teacher_heldout = self._teacher_logits(self.task.heldout[0]) if self.lam > 0 else None
        self._teacher_target_pred: torch.Tensor | None = None
        # The teacher is frozen and in eval mode, so for fixed source images (no random
        # augmentation) its logits are a pure function of the image: compute each once.
        self._teacher_cache: torch.Tensor | None = None
        self._teacher_known: torch.Tensor | None = None

        C = len(self.coordinates)
        self.last_action = np.full(C, N_LEVELS - 1, dtype=np.int64)
        self.coordinate_names = [c.name for c in self.coordinates]
        self.obs_names = ["loss_xe", "loss_kl", "progress", "head_weight_mean", "head_weight_std"] + [
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
        torch.manual_seed(head_seed)  # only stochastic layers (VGG's dropout) draw from it

        self.student.load_state_dict(self._imagenet_state, strict=False)
        self._init_new_head(torch.Generator(device="cpu").manual_seed(head_seed))
        self.optimizer = torch.optim.SGD(
            [{"params": c.params, "lr": self.lr_base, "name": c.name} for c in self.coordinates],
            lr=self.lr_base, momentum=self.momentum, weight_decay=self.weight_decay,
        )
        self.task.source.reset(data_seed)

        self.t = 0
        self.diverged = False
        self.last_action = np.full(len(self.coordinates), N_LEVELS - 1, dtype=np.int64)
        self._train_mode()
        self._pending = self._train_losses()  # L_0 (Algorithm 1, line 2)
        self._losses = self._pending if self.reward_batch == "train" else self._heldout_losses()
        self._obs = self._observation(self._losses)
        return self._obs.copy(), self._info(self._losses)

    def step(self, action):
        action = np.asarray(action, dtype=np.int64).reshape(-1)
        if not self.action_space.contains(action):
            raise UserInputError(f"action {action.tolist()} is outside {self.action_space}")
        if self.diverged:
            return self._obs.copy(), 0.0, True, False, {"diverged": True}
        for group, level in zip(self.optimizer.param_groups, action):
            group["lr"] = float(level) / (N_LEVELS - 1) * self.lr_base
        self.last_action = action
        self._train_mode()

        previous = self._losses.total.item()
        for _ in range(self.k):
            self.optimizer.zero_grad(set_to_none=True)
            self._pending.total.backward()
            self.optimizer.step()
            self._pending = self._train_losses()  # forward of the next batch with θ_{t+1}
            if not math.isfinite(self._pending.total.item()):
                break
        self.t += 1
        losses = self._pending if self.reward_batch == "train" else self._heldout_losses()

        if not (math.isfinite(losses.total.item()) and math.isfinite(self._pending.total.item())):
            self.diverged = True
            self._obs[2] = self.t / self.T
            info = self._info(losses)
            return self._obs.copy(), self.divergence_penalty, True, False, info

        self._losses = losses
        self._obs = self._observation(losses)
        terminated = self.t >= self.T
        info = self._info(losses)
        if self.evaluate_target_enabled and (terminated or (self.eval_every and self.t % self.eval_every == 0)):
            info.update(self.evaluate_target())
        return self._obs.copy(), previous - losses.total.item(), terminated, False, info

    # ------------------------------------------------------------------------- evaluation
    def evaluate_target(self) -> dict[str, float]:
        """Accuracy on the real target set, and top-1 agreement of the student's ImageNet
        head with the teacher there (how much ImageNet knowledge is kept).

        Runs in eval mode under ``inference_mode``: it changes neither the weights nor the
        BatchNorm statistics, so evaluating never alters the training trajectory.
        """
        was_training = self.student.training
        self.student.eval()
        preds, labels, imagenet_preds = [], [], []
        with torch.inference_mode(), self._autocast():
            for x, y in self.task.target.batches():
                new, old = self.student(x.contiguous(memory_format=self.memory_format))
                preds.append(new.argmax(1))
                imagenet_preds.append(old.argmax(1))
                labels.append(y)
            if self._teacher_target_pred is None:  # the teacher is frozen: predict once
                self._teacher_target_pred = torch.cat(
                    [self.teacher(x.contiguous(memory_format=self.memory_format)).argmax(1)
                     for x, _ in self.task.target.batches()]
                )
        if was_training:
            self._train_mode()
        preds, labels = torch.cat(preds), torch.cat(labels)
        k = self.task.num_classes
        return {
            "target_acc": float(multiclass_accuracy(preds, labels, k, average="micro")),
            "target_mean_class_acc": float(multiclass_accuracy(preds, labels, k, average="macro")),
            "teacher_agreement": float((torch.cat(imagenet_preds) == self._teacher_target_pred).float().mean()),
        }

    # ---------------------------------------------------------------------------- helpers
    def _autocast(self):
        if self.amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self._autocast():
            logits = self.teacher(x)
        return logits.clone()  # a normal tensor: inference tensors cannot be saved for backward

    def _losses_on(self, x: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor | None) -> ProxyLoss:
        with self._autocast():
            new, old = self.student(x)
        return proxy_guidance_loss(new, y, old, teacher, self.lam)

    def _train_losses(self) -> ProxyLoss:
        x, y, index = self.task.source.next()
        x = x.contiguous(memory_format=self.memory_format)
        return self._losses_on(x, y, self._cached_teacher_logits(x, index) if self.lam > 0 else None)

    def _cached_teacher_logits(self, x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        if index is None or not self.cache_teacher:
            return self._teacher_logits(x)
        if self._teacher_cache is None:
            n = len(self.task.source)
            self._teacher_cache = torch.empty(n, self.student.imagenet_head.out_features, device=self.device)
            self._teacher_known = torch.zeros(n, dtype=torch.bool, device=self.device)
        missing = ~self._teacher_known[index]
        if missing.any():
            self._teacher_cache[index[missing]] = self._teacher_logits(x[missing]).float()
            self._teacher_known[index[missing]] = True
        return self._teacher_cache[index]

    def _heldout_losses(self) -> ProxyLoss:
        x, y = self.task.heldout
        self.student.eval()
        with torch.no_grad():
            losses = self._losses_on(x.contiguous(memory_format=self.memory_format), y, self._teacher_heldout)
        self._train_mode()
        return losses

    def _train_mode(self) -> None:
        """Training mode, with BatchNorm statistics frozen where ``bn_stats`` and the
        current action say so."""
        self.student.train()
        for norms, level in zip(self._coordinate_norms, self.last_action):
            if self.bn_stats == "frozen" or level == 0:
                for m in norms:
                    m.eval()

    def _init_new_head(self, generator: torch.Generator) -> None:
        """θ_n with PyTorch's default Linear init, drawn from the episode's seed."""
        head = self.student.new_head
        bound = 1.0 / math.sqrt(head.in_features)
        with torch.no_grad():
            for p in (head.weight, head.bias):
                p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=generator))

    def _observation(self, losses: ProxyLoss) -> np.ndarray:
        w = self.student.new_head.weight.detach()
        obs = np.concatenate([
            [losses.xe.item(), losses.kl.item(), self.t / self.T, w.mean().item(), w.std().item()],
            self.last_action / (N_LEVELS - 1),
        ]).astype(np.float32)
        return np.clip(obs, self._obs_low, self._obs_high)

    def _info(self, losses: ProxyLoss) -> dict:
        return {
            "step": self.t,
            "loss": losses.total.item(),
            "loss_xe": losses.xe.item(),
            "loss_kl": losses.kl.item(),
            "lr": {g["name"]: g["lr"] for g in self.optimizer.param_groups},
            "diverged": self.diverged,
        }
