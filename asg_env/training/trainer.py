"""Proxy-guided syn→real fine-tuning with one learning rate per optimization coordinate: the
part of ASG that a policy drives, without the Gymnasium wrapper.

A run is ``T`` decisions. Decision t holds per-coordinate learning-rate scales
``a_c ∈ [0, 1]`` for ``windows[t]`` SGD steps with ``lr_c = a_c · lr_base`` (momentum 0.9,
weight decay 5e-4) on ``L = L_XE + λ · guidance``. :class:`~asg_env.envs.env.ASGEnv` wraps a
:class:`Trainer` into observations and rewards; ``apply_policy.py`` drives one directly.
:class:`BatchedTrainer` holds N runs of one configuration as one batched model
(:mod:`asg_env.training.batched`), with the same verbs; :class:`~asg_env.envs.vector.ASGVectorEnv`
wraps it. Both build the models in :class:`FineTuning`, their shared core, and read a
decision's outcome with the same functions (:func:`decision_values`, :func:`coordinate_stats`,
:func:`evaluation_due`).

Every decision reads the losses and θ_n's weight statistics in one host–device transfer
(:meth:`Trainer.step` returns them as floats); nothing else in a window waits for the device.

The protocol follows the official release: the whole model stays in eval mode, so BatchNorm
normalises with the ImageNet statistics while its affine parameters train; at reset the
student's ImageNet head therefore equals the teacher and the guidance term is 0. SGD puts the
learning rate inside the momentum (``sgd="official"``, see :mod:`asg_env.training.optim`).

Under ``torchrun`` (``torch.distributed`` initialised before the trainer is built) the
student is wrapped in DistributedDataParallel and each global batch of ``batch_size`` images
is split evenly over the ranks, in the order a single process would draw it; the losses that
a decision reads are averaged over the ranks, so every rank sees the same numbers, and
evaluation is sharded and reduced with torchmetrics.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchmetrics import MeanMetric

from asg_env.errors import UserInputError
from asg_env.tasks.imagenet_photos import load_imagenet_photos
from asg_env.tasks.registry import EpochOrder, Task, TaskOptions, TensorSource, build_task, default_cache_dir
from asg_env.training.backbones import build_backbone, check_image_size, input_normalisation
from asg_env.training.batched import StackedRuns
from asg_env.training.coordinates import Coordinate, optimization_coordinates
from asg_env.training.guidance import Guidance
from asg_env.training.kinds import KINDS
from asg_env.training.optim import action_windows, make_sgd, poly_factor
from asg_env.training.proxy import kl_to_teacher
from asg_env.training.segmentation import BilinearDeconv
from asg_env.training.settings import (
    BATCHED_CHECKS,
    BATCHED_FIELDS,
    DEFAULTS,
    FIELDS,
    BatchedSettings,
    FineTuningSettings,
    check_settings,
    keyword_signature,
)
from asg_env.training.teacher_cache import DiskTeacherCache, MemoryTeacherCache

VALUE_KEYS = ("loss", "loss_xe", "loss_guidance", "head_weight_mean", "head_weight_std")


def run_seeds(rng: np.random.Generator) -> tuple[int, int]:
    """The θ_n-initialisation and data-order seeds of one run, drawn from ``rng`` (the env's
    ``np_random``), so a run seeded ``s`` is the same whether an env or a driver starts it."""
    head_seed, data_seed = (int(s) for s in rng.integers(2**31 - 1, size=2))
    return head_seed, data_seed


def batching_refusals(settings: dict) -> list[str]:
    """Why these settings cannot run as a :class:`BatchedTrainer`, judged from the settings
    alone (missing ones take the defaults); the trainer adds what it learns when it is built
    (torchrun, a file-based source)."""
    get = lambda key: settings.get(key, DEFAULTS[key])  # noqa: E731
    why = []
    if get("bn_stats") != "frozen":
        why.append('bn_stats="frozen" (batch statistics update shared buffers in place, which vmap cannot '
                   "batch and a loop would mix)")
    if get("compile") is not None:
        why.append("no compile")
    lam = get("lam")  # a malformed λ is the settings check's to report
    guidance = "none" if isinstance(lam, (int, float)) and lam <= 0 else get("guidance")
    if guidance not in ("kl", "feature_l2", "none"):
        why.append(f"a guidance that does not hold the weights (kl, feature_l2, none; not {guidance!r})")
    return why


def evaluation_due(t: int, T: int, sgd_step: int, epoch_before: int, steps_per_epoch: int, eval_every: int | str) -> bool:
    """Whether the decision that brought a run to decision ``t`` and SGD step ``sgd_step`` (from
    epoch ``epoch_before``) is followed by an evaluation: ``eval_every`` decisions, or
    ``"epoch"`` at the first decision that ends in a new epoch, and always at the end."""
    if eval_every == "epoch":
        due = sgd_step // steps_per_epoch > epoch_before
    else:
        due = bool(eval_every) and t % eval_every == 0
    return t >= T or due


def decision_values(losses: torch.Tensor, check: torch.Tensor, head: torch.Tensor, stats: torch.Tensor | None,
                    rows: list[int], reduce=None) -> list[dict]:
    """A decision's outcome for each of N runs, as floats, in one host–device transfer: the
    losses (N × 3: L, L_XE, guidance), θ_n's weight mean and std (``head``, N × k) and, when
    given, the per-coordinate ``stats`` (N × C × 3). ``check`` (N: the window's summed training
    loss) only decides ``finite``. ``reduce`` averages the first four columns over the ranks.
    Returns the values of the runs ``rows``, in that order."""
    values = torch.cat([losses.detach().float(), check.detach().float()[:, None], head.mean(1, keepdim=True),
                        head.std(1, keepdim=True)], 1)
    if reduce is not None:
        values[:, :4] = reduce(values[:, :4])
    if stats is not None:
        values = torch.cat([values, stats.float().flatten(1)], 1)
    out = []
    for numbers in values[rows].tolist():
        v = dict(zip(VALUE_KEYS, numbers[:3] + numbers[4:6]))
        v["finite"] = all(math.isfinite(x) for x in numbers[:6])
        if stats is not None:
            v["coordinate_stats"] = np.array(numbers[6:]).reshape(-1, 3)
        out.append(v)
    return out


def coordinate_stats(now: list[torch.Tensor], before: list[torch.Tensor], origin: list[torch.Tensor],
                     grad_norms: torch.Tensor) -> torch.Tensor:
    """Per run and coordinate: the gradient norm (``grad_norms``, N × C), the update-to-weight
    ratio since ``before`` (the window's start) and the relative distance from ``origin`` (the
    run's start), as one N × C × 3 tensor. The weights are C tensors of N × size."""
    rows = []
    for c, (w, ref, start) in enumerate(zip(now, before, origin)):
        tiny = torch.finfo(w.dtype).tiny
        rows.append(torch.stack([grad_norms[:, c], (w - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(tiny),
                                 (w - start).norm(dim=1) / start.norm(dim=1).clamp_min(tiny)], 1))
    return torch.stack(rows, 1)


class FineTuning:
    """What every fine-tuning run of one configuration shares: the task, the student and its
    frozen teacher, the coordinates, the guidance and the objective, the teacher's cache, the
    windows of the decisions, and the evaluation of the student's current weights. The two
    trainers, :class:`Trainer` (one run) and :class:`BatchedTrainer` (N runs), add the runs.

    Takes every field of :class:`~asg_env.training.settings.FineTuningSettings` as a keyword
    (the task, the model, the decisions and SGD, proxy guidance, the evaluation, speed), each
    checked before anything is built; the documentation's settings table lists them.
    """

    def __init__(self, **settings):
        s = FineTuningSettings.checked(settings)
        self.config = {f.name: getattr(s, f.name) for f in FIELDS}
        check_image_size(s.backbone, s.image_size)
        if s.sgd_steps is not None and s.epochs is not None:
            raise UserInputError("give sgd_steps or epochs, not both")
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if s.batch_size % self.world_size:
            raise UserInputError(f"batch_size={s.batch_size} does not split evenly over {self.world_size} processes")
        self.device = torch.device(s.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.bn_stats, self.sgd, self.lr_schedule, self.warmup_steps = s.bn_stats, s.sgd, s.lr_schedule, int(s.warmup_steps)
        self.lam, self.lr_base = float(s.lam), float(s.lr_base)
        self.momentum, self.weight_decay = s.momentum, s.weight_decay
        self.reward_batch, self.eval_every, self.tta_flip = s.reward_batch, s.eval_every, bool(s.tta_flip)
        self.memory_format = torch.channels_last if s.channels_last else torch.contiguous_format
        self.coordinate_stats = bool(s.coordinate_stats)
        self.amp = bool(s.amp) and self.device.type == "cuda"

        mean, std = input_normalisation(s.backbone, s.weights)
        if isinstance(s.task, Task):  # a task built in code (benchmarks, research on new tasks)
            self.task: Task = s.task
        else:
            self.task = build_task(s.task, TaskOptions(s.image_size, s.batch_size, self.device, mean, std, s.data_root,
                                                       s.source_size, s.target_eval_size, s.synthetic_eval_size,
                                                       s.label_dilation, s.num_workers, (self.rank, self.world_size),
                                                       s.source_root, s.target_root, s.render_seed))
        self.kind = KINDS[self.task.kind]
        self.kind.check(self.config)
        parts = build_backbone(s.backbone, s.weights)
        self.mean, self.std, self.input_size = mean, std, parts.input_size
        self.imagenet_photos = int(s.imagenet_photos)
        self.backbone_name = parts.name

        sgd_steps = s.sgd_steps if s.epochs is None else max(1, round(s.epochs * self.task.steps_per_epoch))
        if s.episode_steps is None and sgd_steps is None:
            raise UserInputError("episode_steps=None (a decision per SGD step) needs sgd_steps or epochs")
        if s.window == "fixed" and None not in (sgd_steps, s.episode_steps) and sgd_steps < s.episode_steps:
            raise UserInputError(f"{sgd_steps} SGD steps cannot hold episode_steps={s.episode_steps} decisions")
        self.windows = action_windows(s.window, s.episode_steps, int(s.sgd_steps_per_action), sgd_steps,
                                      self.task.steps_per_epoch)
        self.T, self.total_sgd_steps = len(self.windows), sum(self.windows)
        self.teacher, self.student = self.kind.models(parts, self.task, self.config)
        self.teacher = self.teacher.to(self.device, memory_format=self.memory_format)
        self.student = self.student.to(self.device, memory_format=self.memory_format)
        self.coordinates: list[Coordinate] = optimization_coordinates(self.student.features, self.student.new_head)
        self.coordinate_names = [c.name for c in self.coordinates]
        # ImageNet weights kept in memory: reset() restores them without touching the disk.
        self._imagenet_state = {
            k: v.detach().clone() for k, v in self.student.state_dict().items() if not k.startswith("new_head.")
        }
        self.student.eval()
        self.guidance: Guidance = self.kind.guidance(s.guidance if self.lam > 0 else "none", self.student, self.task)
        self.objective: nn.Module = self.kind.objective(self.student, self.guidance, self.lam)
        self._train_objective: nn.Module = self.objective
        if self.world_size > 1:
            self._train_objective = nn.parallel.DistributedDataParallel(
                self.objective, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                forward_sync_buffers=s.bn_stats == "train",
            )
        if s.compile is not None:
            self._train_objective = torch.compile(self._train_objective, backend=s.compile, dynamic=False)
        needs_teacher = self.guidance.teacher_output is not None
        self._teacher_heldout = self._teacher_out(self.task.heldout[0]) if needs_teacher else None
        self._teacher_cache = self._make_teacher_cache(s.weights) if needs_teacher and s.cache_teacher else None
        self._target_reference: dict | None = None  # the teacher's target / ImageNet-photo predictions
        self.t = self.sgd_step = 0
        self.evaluation_due = False

    @property
    def steps_per_epoch(self) -> int:
        return self.task.steps_per_epoch

    @property
    def headline(self) -> str:
        """The evaluation's main measure: mean per-class accuracy, or mIoU for segmentation."""
        return self.kind.headline

    @property
    def class_iou_keys(self) -> list[str]:
        """The per-class entries of an evaluation (the IoU of each class, for segmentation)."""
        return self.kind.class_keys(self.task)

    # ------------------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, float]:
        """What the paper measures, without touching the training trajectory.

        * ``target_acc``, ``target_mean_class_acc``: the new head θ_n on the real target set
          (with ``tta_flip``, each image's sigmoid scores averaged with its mirror image's).
        * ``target_kl``: KL(teacher ‖ θ_o) on the real target images, the continuous measure of
          how much of the ImageNet model survives; ``teacher_agreement`` is its top-1 cousin.
        * ``imagenet_top1`` (θ_o) and ``imagenet_teacher_top1``: top-1 on the 20 real ImageNet
          validation photos of the ``foolbox`` wheel at the backbone's native resolution.
        * ``synthetic_acc`` and ``synthetic_xe`` (its cross-entropy): θ_n on held-out synthetic
          images, where the task has them.

        Segmentation reports ``target_miou``, ``target_pixel_acc`` and ``target_iou/<class>``
        (torchmetrics' confusion matrix, label 255 ignored; the mean is over the classes that
        occur) instead of the accuracies, ``synthetic_miou``, and the KL and agreement per patch.

        Runs in eval mode under ``inference_mode``, so neither the weights nor the BatchNorm
        statistics change. Under torchrun each rank evaluates its share of the target batches
        and torchmetrics reduces them. The teacher's outputs are computed once and kept.
        """
        was_training = self.student.training
        self.student.eval()
        first = self._target_reference is None
        ref = self._target_reference if not first else {"target": {}, "photos": None}
        metrics = self.kind.metrics(self.task)
        metrics.update(target_kl=MeanMetric(), teacher_agreement=MeanMetric())
        for m in metrics.values():
            m.to(self.device)
        shard = (self.rank, self.world_size)
        with torch.inference_mode(), self._autocast():
            for i, (x, y) in enumerate(self.task.target.batches(shard=shard)):
                x = x.contiguous(memory_format=self.memory_format)
                old = self.kind.update_target(metrics, self.student, x, y, self.tta_flip)
                if first:
                    ref["target"][i] = self.teacher(x).float()
                teacher = ref["target"][i]
                metrics["target_kl"].update(kl_to_teacher(old, teacher), weight=len(y))
                metrics["teacher_agreement"].update((old.argmax(-1) == teacher.argmax(-1)).float())
            if self.task.source_eval is not None:
                self._update_synthetic(metrics)
            out = self.kind.finish({name: m.compute() for name, m in metrics.items()}, self.task)
            photos = ref["photos"]
            if first and self.imagenet_photos:
                photos = load_imagenet_photos(self.input_size, self.mean, self.std, self.device)
                photos = None if photos is None else (photos[0][: self.imagenet_photos], photos[1][: self.imagenet_photos])
            if photos is not None:
                x, y = photos
                x = x.contiguous(memory_format=self.memory_format)
                if first:
                    ref["photos"] = photos
                    ref["imagenet_teacher_top1"] = (self.kind.teacher_classify(self.teacher, x).argmax(1) == y).float().mean()
                out["imagenet_top1"] = (self.student.classify(x).argmax(1) == y).float().mean()
                out["imagenet_teacher_top1"] = ref["imagenet_teacher_top1"]
        self._target_reference = ref
        self.student.train(was_training)
        keys = list(out)
        return dict(zip(keys, torch.stack([out[k_].float().to(self.device) for k_ in keys]).tolist()))

    def evaluate_synthetic(self) -> dict[str, float]:
        """θ_n on the held-out synthetic images alone (``synthetic_acc``, ``synthetic_xe``): what
        a learning-rate policy is scored on (:func:`asg_env.envs.env.capped_score`). It reads no real
        target image. Classification tasks with ``synthetic_eval_size > 0`` only."""
        metrics = {k: m.to(self.device) for k, m in self.kind.metrics(self.task).items() if k.startswith("synthetic_")}
        if "synthetic_xe" not in metrics:
            raise UserInputError("the synthetic score needs a classification task with synthetic_eval_size > 0")
        was_training = self.student.training
        self.student.eval()
        with torch.inference_mode(), self._autocast():
            self._update_synthetic(metrics)
        self.student.train(was_training)
        return {k: float(m.compute()) for k, m in metrics.items()}

    def _update_synthetic(self, metrics: dict) -> None:
        for x, y in self.task.source_eval.batches(shard=(self.rank, self.world_size)):
            self.kind.update_synthetic(metrics, self.student, x.contiguous(memory_format=self.memory_format), y)

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
        width = self._teacher_heldout[0].numel()  # what the teacher gives per image, flattened
        if isinstance(self.task.source, TensorSource):
            return MemoryTeacherCache(len(self.task.source), width, self.device)
        if self.task.cached_images is None:
            return None
        key = f"{self.task.teacher_cache_key}-{self.backbone_name}-{weights}-{self.guidance.teacher_output}"
        path = DiskTeacherCache.path_for(default_cache_dir(), key)
        if self.rank == 0:  # one rank builds the file; the others wait for it
            DiskTeacherCache.build(path, self.task.cached_images, self._teacher_out, width, self.device,
                                   num_workers=self.task.source.num_workers)
        if self.world_size > 1:
            dist.barrier()
        return DiskTeacherCache(path, self.device)

    def _start_weights(self, head_seed: int) -> None:
        """The student at the ImageNet weights (kept in memory) with a fresh θ_n from ``head_seed``."""
        self.student.load_state_dict(self._imagenet_state, strict=False)
        self._init_new_head(torch.Generator(device="cpu").manual_seed(head_seed))

    def _init_new_head(self, generator: torch.Generator) -> None:
        """θ_n afresh: PyTorch's default Linear init, drawn from the run's seed; FCN score
        convolutions at zero and learned upsampling at bilinear (the official ``fcn8s_vgg.py``)."""
        with torch.no_grad():
            for layer in self.student.new_head.modules():
                if isinstance(layer, nn.Linear):
                    bound = 1.0 / math.sqrt(layer.in_features)
                    for p in (layer.weight, layer.bias):
                        p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=generator))
                elif isinstance(layer, nn.Conv2d):
                    layer.weight.zero_()
                    layer.bias.zero_()
                elif isinstance(layer, BilinearDeconv):
                    layer.reset_parameters()


FineTuning.__init__.__signature__ = keyword_signature(FIELDS)


class Trainer(FineTuning):
    """One fine-tuning run of an ImageNet model on synthetic images, decision by decision:
    :meth:`reset`, then :meth:`step` T times; :meth:`evaluate` at any point. Takes the settings
    of :class:`FineTuning`."""

    def reset(self, head_seed: int, data_seed: int) -> dict[str, float]:
        """Start a run from the ImageNet weights: a fresh θ_n from ``head_seed``, a fresh SGD,
        and the data order of ``data_seed``. Returns L_0 (Algorithm 1, line 2) as floats."""
        torch.manual_seed(head_seed)  # only stochastic layers (VGG's dropout, bn_stats="train") draw from it
        self._start_weights(head_seed)
        self.optimizer = make_sgd(
            self.sgd, [{"params": c.params, "lr": self.lr_base, "name": c.name} for c in self.coordinates],
            lr=self.lr_base, momentum=self.momentum, weight_decay=self.weight_decay,
        )
        self.task.source.reset(data_seed)
        self.t = self.sgd_step = 0
        self.evaluation_due = False
        self.student.train(self.bn_stats == "train")
        for p in self.student.parameters():  # the previous run's last gradient is not this run's
            p.grad = None
        self._origin = self._weights() if self.coordinate_stats else None
        self._pending = self._train_losses()
        losses = self._pending if self.reward_batch == "train" else self._heldout_losses()
        return self._read(losses, losses[0], self._origin)

    def step(self, scales) -> dict[str, float]:
        """Hold learning-rate ``scales`` (one per coordinate, in [0, 1]) for the next window of
        SGD steps. Returns the decision's losses and θ_n's statistics; ``finite`` is False when
        any loss of the window was not finite. Sets :attr:`evaluation_due`."""
        if self.t >= self.T:
            raise RuntimeError(f"the run is over: all {self.T} decisions were made")
        window = self.windows[self.t]
        epoch_before = self.sgd_step // self.steps_per_epoch
        before = self._weights() if self.coordinate_stats else None
        sums = None
        for i in range(window):
            factor = poly_factor(self.sgd_step, self.total_sgd_steps, self.warmup_steps) if self.lr_schedule == "poly" else 1.0
            for group, scale in zip(self.optimizer.param_groups, scales):
                group["lr"] = float(scale) * self.lr_base * factor
            self.optimizer.zero_grad(set_to_none=True)
            self._pending[0].backward()
            self.optimizer.step()
            self.sgd_step += 1
            # forward of the next batch with the new θ; only the window's last is a checkpoint point
            self._pending = self._train_losses(snapshot=i == window - 1)
            losses = self._pending.detach()
            sums = losses if sums is None else sums + losses
        self.t += 1
        values = self._read(sums / window if self.reward_batch == "train" else self._heldout_losses(), sums[0], before)
        self.evaluation_due = evaluation_due(self.t, self.T, self.sgd_step, epoch_before, self.steps_per_epoch,
                                             self.eval_every)
        return values

    @property
    def learning_rates(self) -> dict[str, float]:
        return {g["name"]: g["lr"] for g in self.optimizer.param_groups}

    def state_dict(self) -> dict:
        """Everything that determines the rest of the run, taken between two decisions: the
        student, the optimizer, the progress, the data position and the RNGs, as of just
        before the batch that the next SGD step trains on was drawn (that batch's forward
        pass is redone on loading). With ``bn_stats="train"`` that forward pass has already
        updated the BatchNorm running statistics, so the buffers are saved as they were
        before it, and loading counts the batch once."""
        pending = dict(self._before_pending)
        student = self.student.state_dict()
        student.update((k, v) for k, v in pending.pop("buffers", {}).items() if k in student)
        state = {"student": student, "optimizer": self.optimizer.state_dict(),
                 "t": self.t, "sgd_step": self.sgd_step, **pending}
        if isinstance(self._teacher_cache, MemoryTeacherCache):
            state["teacher_cache"] = self._teacher_cache.state_dict()
        return copy.deepcopy(state)  # a snapshot: training goes on updating these tensors in place

    def load_state_dict(self, state: dict) -> None:
        """Continue the run saved by :meth:`state_dict` (after :meth:`reset` built its SGD)."""
        try:
            self.student.load_state_dict(state["student"])
        except RuntimeError as err:
            first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
            raise UserInputError(f"the checkpoint's weights do not fit this model (another configuration or an "
                                 f"older ASG-Gym): {first}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.t, self.sgd_step = int(state["t"]), int(state["sgd_step"])
        if "teacher_cache" in state and isinstance(self._teacher_cache, MemoryTeacherCache):
            self._teacher_cache.load_state_dict(state["teacher_cache"])
        self.task.source.load_state_dict(state["source"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self._pending = self._train_losses()

    def _train_losses(self, snapshot: bool = True) -> torch.Tensor:
        if snapshot:  # what state_dict() needs to redraw this batch after a restart
            self._before_pending = {"source": self.task.source.state_dict(), "torch_rng": torch.get_rng_state()}
            if self.bn_stats == "train":  # the forward pass below updates the running statistics
                self._before_pending["buffers"] = {k: v.clone() for k, v in self.student.named_buffers()}
            if self.device.type == "cuda":
                self._before_pending["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        x, y, index, key = self.task.source.next()
        x = x.contiguous(memory_format=self.memory_format)
        teacher = None
        if self.guidance.teacher_output is not None:
            cached = self._teacher_cache is not None and index is not None
            teacher = self._teacher_cache(x, index, key, self._teacher_out) if cached else self._teacher_out(x)
        with self._autocast():
            return self._train_objective(x, y, teacher)

    def _heldout_losses(self) -> torch.Tensor:
        x, y = self.task.heldout
        was_training = self.student.training
        self.student.eval()
        with torch.no_grad(), self._autocast():
            losses = self.objective(x.contiguous(memory_format=self.memory_format), y, self._teacher_heldout)
        self.student.train(was_training)
        return losses

    def _read(self, losses: torch.Tensor, check: torch.Tensor, before: list[torch.Tensor] | None) -> dict[str, float]:
        """:func:`decision_values` of this run (the losses averaged over the ranks), with the
        per-coordinate statistics since ``before`` when the trainer measures them."""
        stats = None
        if self.coordinate_stats:
            grads = [[p.grad.detach().flatten() for p in c.params if p.grad is not None] for c in self.coordinates]
            norms = torch.stack([torch.cat(g).norm() if g else torch.zeros((), device=self.device) for g in grads])
            stats = coordinate_stats(self._weights(), before, self._origin, norms[None])
        head = self.student.classifier.weight.detach().reshape(1, -1)
        reduce = self._all_mean if self.world_size > 1 else None
        return decision_values(losses[None], check.view(1), head, stats, [0], reduce)[0]

    def _weights(self) -> list[torch.Tensor]:
        """Each coordinate's weights, flattened into one row: C tensors of 1 × size."""
        return [torch.cat([p.detach().flatten() for p in c.params])[None] for c in self.coordinates]

    @staticmethod
    def _all_mean(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x / dist.get_world_size()


class BatchedTrainer(FineTuning):
    """``num_envs`` fine-tuning runs of one configuration at once, as one batched model
    (:mod:`asg_env.training.batched`): each with its own θ_n, data order, learning rates and SGD
    state, sharing the teacher and its cache. The verbs are :class:`Trainer`'s, for a set of
    runs: :meth:`reset` starts some, :meth:`step` moves some one decision, :meth:`evaluate`
    measures one; ``t``, ``sgd_step`` and ``evaluation_due`` hold one entry per run.

    Needs an in-memory source (the embedded tasks), ``bn_stats="frozen"``, one process, no
    ``compile`` and a guidance that does not hold the weights (``kl``, ``feature_l2``,
    ``none``).

    Args:
        num_envs: N, the runs held at once.
        **settings: ``batching`` (:class:`~asg_env.training.settings.BatchedSettings`: vmap or
            loop; on a CPU loop is faster, vmap's grouped convolutions being slower than the
            runs one by one there; both give the same results within float tolerance) and the
            runs' configuration, as :class:`FineTuning` takes it.
    """

    def __init__(self, num_envs: int, **settings: Any):
        batching = settings.pop("batching", BatchedSettings.batching)
        check_settings({"num_envs": num_envs, "batching": batching}, BATCHED_CHECKS)
        super().__init__(**settings)
        why = []
        if self.world_size > 1:
            why.append("one process (not torchrun)")
        if not isinstance(self.task.source, TensorSource):
            why.append("an in-memory source (the embedded tasks, not files)")
        why += batching_refusals(self.config)
        if why:
            raise UserInputError("batched runs need " + ", ".join(why))
        N = self.num_envs = int(num_envs)
        self.batching = batching if batching != "auto" else ("loop" if self.device.type == "cpu" else "vmap")
        self.runs = StackedRuns(self.objective, self.coordinates, N, self.sgd, self.momentum, self.weight_decay,
                                self.batching)
        self._orders = [EpochOrder(len(self.task.source), self.task.source.batch_size) for _ in range(N)]
        self.t, self.sgd_step = [-1] * N, [0] * N  # -1: never started
        self.evaluation_due = np.zeros(N, dtype=bool)
        self._classifier_name = next(n for n, p in self.objective.named_parameters() if p is self.student.classifier.weight)
        self._batch: list[torch.Tensor | None] | None = None  # every run's pending batch: x, y, teacher
        self._origin = {n: p.detach().clone() for n, p in self.runs.params.items()} if self.coordinate_stats else None

    def reset(self, seeds: dict[int, tuple[int, int]]) -> dict[int, dict[str, float]]:
        """Start the given runs afresh, ``{run: (head_seed, data_seed)}`` (as
        :meth:`Trainer.reset` does for one run); the others keep going. Returns each started
        run's L_0, in one transfer."""
        for run, (head_seed, data_seed) in seeds.items():
            self._start_weights(head_seed)
            start = {n: p.detach() for n, p in self.objective.named_parameters() if n in self.runs.params}
            self.runs.load_run(run, start)
            if self._origin is not None:
                for n, w in start.items():
                    self._origin[n][run].copy_(w)
            self._orders[run].reset(data_seed)
            self.t[run] = self.sgd_step[run] = 0
            self.evaluation_due[run] = False
        runs = sorted(seeds)
        self._draw(runs)
        with self._autocast():
            self._pending = self.runs.losses(*self._batch)
        losses = self._pending if self.reward_batch == "train" else self._heldout_losses()
        grads = torch.zeros(self.num_envs, len(self.coordinates), device=self.device)
        return self._read(losses, losses[:, 0], self._origin, grads, runs)

    def step(self, scales: np.ndarray, runs: list[int]) -> dict[int, dict[str, float]]:
        """Hold ``scales[r]`` (N × C) for the next window of each run ``r`` in ``runs``; the
        other runs keep their weights and data position. Returns each stepped run's values, as
        :meth:`Trainer.step` does for one run, all in one transfer; sets :attr:`evaluation_due`."""
        for r in runs:
            if not 0 <= self.t[r] < self.T:
                raise RuntimeError(f"run {r} is {'over' if self.t[r] >= self.T else 'not started'}")
        N, scales = self.num_envs, np.asarray(scales, dtype=float)
        window = np.zeros(N, dtype=int)
        window[runs] = [self.windows[self.t[r]] for r in runs]
        epoch_before = {r: self.sgd_step[r] // self.steps_per_epoch for r in runs}
        before = {n: p.detach().clone() for n, p in self.runs.params.items()} if self.coordinate_stats else None
        grad_norms = torch.zeros(N, len(self.coordinates), device=self.device)
        sums = torch.zeros(N, 3, device=self.device)
        # every learning rate of the windows and the masks go to the device once per decision
        longest = int(window.max())
        factors = np.ones((longest, N))
        for r in runs:
            for i in range(window[r]):
                if self.lr_schedule == "poly":
                    factors[i, r] = poly_factor(self.sgd_step[r] + i, self.total_sgd_steps, self.warmup_steps)
        lrs = torch.as_tensor(factors[:, :, None] * scales[None] * self.lr_base, dtype=torch.float32, device=self.device)
        window_t = torch.as_tensor(window, device=self.device)
        for i in range(longest):
            moving_runs = [r for r in runs if i < window[r]]
            moving = window_t > i
            self.runs.backward(self._pending, moving)
            if self.coordinate_stats:  # the gradient of each run's last SGD step of its window
                grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in self.runs.params.items()}
                norms = torch.stack([g.norm(dim=1) for g in self.runs.coordinate_tensors(grads)], 1)
                grad_norms = torch.where((window_t == i + 1)[:, None], norms, grad_norms)
            self.runs.sgd_step(lrs[i], None if len(moving_runs) == N else moving)
            for r in moving_runs:
                self.sgd_step[r] += 1
            self._draw(moving_runs)
            with self._autocast():
                self._pending = self.runs.losses(*self._batch)
            sums += torch.where(moving[:, None], self._pending.detach(), torch.zeros_like(sums))
        for r in runs:
            self.t[r] += 1
            self.evaluation_due[r] = evaluation_due(self.t[r], self.T, self.sgd_step[r], epoch_before[r],
                                                    self.steps_per_epoch, self.eval_every)
        mean = sums / window_t.clamp(min=1)[:, None]
        losses = mean if self.reward_batch == "train" else self._heldout_losses()
        return self._read(losses, sums[:, 0], before, grad_norms, runs)

    def evaluate(self, run: int) -> dict[str, float]:
        """:meth:`FineTuning.evaluate` of run ``run``'s weights."""
        self._load_student(run)
        return super().evaluate()

    def evaluate_synthetic(self, run: int) -> dict[str, float]:
        """:meth:`FineTuning.evaluate_synthetic` of run ``run``'s weights."""
        self._load_student(run)
        return super().evaluate_synthetic()

    def state_dict(self) -> dict:
        """Everything that determines the rest of every run, taken between two decisions: the
        stacked weights and velocities, each run's progress and data position, and the pending
        batches (whose forward pass is redone on loading)."""
        clone = lambda tensors: {n: t.detach().clone() for n, t in tensors.items()}  # noqa: E731
        state = {"params": clone(self.runs.params), "velocity": clone(self.runs.velocity), "t": list(self.t),
                 "sgd_step": list(self.sgd_step), "evaluation_due": self.evaluation_due.copy(),
                 "orders": copy.deepcopy([o.state_dict() for o in self._orders]),
                 "batch": None if self._batch is None else [None if t is None else t.clone() for t in self._batch],
                 "origin": None if self._origin is None else clone(self._origin)}
        if isinstance(self._teacher_cache, MemoryTeacherCache):
            state["teacher_cache"] = copy.deepcopy(self._teacher_cache.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue the runs saved by :meth:`state_dict`, in a trainer of the same configuration."""
        if len(state["t"]) != self.num_envs:
            raise UserInputError(f"the checkpoint holds {len(state['t'])} runs, not num_envs={self.num_envs}")
        with torch.no_grad():
            for n, p in self.runs.params.items():
                p.copy_(state["params"][n])
                self.runs.velocity[n].copy_(state["velocity"][n])
            if self._origin is not None:
                for n, w in self._origin.items():
                    w.copy_(state["origin"][n])
        self.t, self.sgd_step = list(state["t"]), list(state["sgd_step"])
        self.evaluation_due = np.array(state["evaluation_due"], dtype=bool)
        for order, saved in zip(self._orders, state["orders"]):
            order.load_state_dict(saved)
        if "teacher_cache" in state and isinstance(self._teacher_cache, MemoryTeacherCache):
            self._teacher_cache.load_state_dict(state["teacher_cache"])
        self._batch = None if state["batch"] is None else [None if t is None else self.runs.zeros_like_runs(t[0]).copy_(t)
                                                           for t in state["batch"]]
        if self._batch is not None:
            with self._autocast():
                self._pending = self.runs.losses(*self._batch)

    def _load_student(self, run: int) -> None:
        with torch.no_grad():
            for n, p in self.objective.named_parameters():
                if n in self.runs.params:
                    p.copy_(self.runs.params[n][run])

    def _draw(self, runs: list[int]) -> None:
        """The next training batch of each of ``runs``, into the pending batches."""
        if not runs:
            return
        x, y, index, key = self.task.source.next_runs([self._orders[r] for r in runs])
        teacher = None
        if self.guidance.teacher_output is not None:
            flat = x.flatten(0, 1).contiguous(memory_format=self.memory_format)
            if self._teacher_cache is not None:
                teacher = self._teacher_cache(flat, index.flatten(), key.flatten(), self._teacher_out)
            else:
                teacher = self._teacher_out(flat)
            teacher = teacher.view(len(runs), -1, *teacher.shape[1:])
        if self._batch is None:
            layouts = (x[0].contiguous(memory_format=self.memory_format), y[0], None if teacher is None else teacher[0])
            self._batch = [self.runs.zeros_like_runs(t) if t is not None else None for t in layouts]
        for store, new in zip(self._batch, (x, y, teacher)):
            if new is not None:
                store[runs] = new

    def _heldout_losses(self) -> torch.Tensor:
        x, y = self.task.heldout
        with self._autocast():
            return self.runs.losses_on(x.contiguous(memory_format=self.memory_format), y, self._teacher_heldout)

    def _read(self, losses: torch.Tensor, check: torch.Tensor, before: dict[str, torch.Tensor] | None,
              grad_norms: torch.Tensor, runs: list[int]) -> dict[int, dict[str, float]]:
        """:func:`decision_values` of the runs ``runs``, by run, with the per-coordinate
        statistics since ``before`` when the trainer measures them."""
        stats = None
        if self.coordinate_stats:
            now = {n: p.detach() for n, p in self.runs.params.items()}
            stats = coordinate_stats(*(self.runs.coordinate_tensors(t) for t in (now, before, self._origin)), grad_norms)
        head = self.runs.params[self._classifier_name].detach().flatten(1)
        return dict(zip(runs, decision_values(losses, check, head, stats, runs)))


BatchedTrainer.__init__.__signature__ = keyword_signature(
    [f for f in BATCHED_FIELDS if f.name != "num_envs"] + list(FIELDS),
    first=[inspect.Parameter("num_envs", inspect.Parameter.POSITIONAL_OR_KEYWORD)])


def init_distributed() -> tuple[int, int, str | None]:
    """Join the process group that ``torchrun`` describes in the environment (NCCL on GPUs,
    gloo on CPUs). Returns (rank, world size, this rank's device or None to choose freely)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return 0, 1, None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return dist.get_rank(), dist.get_world_size(), f"cuda:{local_rank}"
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), "cpu"
