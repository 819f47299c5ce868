"""ASG-Gym: syn→real fine-tuning with proxy guidance as Gymnasium environments.

Registered ids (the two embedded ones also as a native vector env, ``gym.make_vec(id,
num_envs=N)``: N runs as one batched model, :mod:`asg_env.envs.vector`):

* ``SynDigits-v0``: fonts-rendered digits → real MNIST, EfficientNet-Lite0, offline on a CPU.
* ``SynDigitScenes-v0``: segmentation of rendered digit scenes → real-MNIST scenes, FCN-8s on
  EfficientNet-Lite0, offline on a CPU.
* ``VisDA-v0``: VisDA-17 (train → validation) with ResNet-101, from a local data root.
* ``GTA5-Cityscapes-v0``: GTA5 → Cityscapes val segmentation with FCN-VGG16 (or FCN-ResNet50),
  from a local data root.
* ``ImageFolder-v0`` and ``SegFolder-v0``: your own synthetic and real images, from
  ``source_root`` and ``target_root`` folders (see :mod:`asg_env.tasks.folders`).
"""

from gymnasium.envs.registration import register

from asg_env.envs.control import N_LEVELS
from asg_env.envs.env import ASGEnv
from asg_env.errors import UserInputError

__all__ = ["ASGEnv", "N_LEVELS", "UserInputError"]

# SynDigits-v0's size, η_base and source size were chosen by benchmarks/grid_syndigits.py's rule
# (results/grid/grid.md), from runs without guidance only.
register(
    id="SynDigits-v0",
    entry_point="asg_env.envs.env:ASGEnv",
    vector_entry_point="asg_env.envs.vector:ASGVectorEnv",
    kwargs={"task": "syndigits", "image_size": 64, "lr_base": 3e-3, "source_size": 2000},
)
register(
    id="SynDigitScenes-v0",
    entry_point="asg_env.envs.env:ASGEnv",
    vector_entry_point="asg_env.envs.vector:ASGVectorEnv",
    kwargs={"task": "digitscenes", "image_size": 64, "batch_size": 16, "lr_base": 5e-3, "source_size": 1000,
            "target_eval_size": 500, "synthetic_eval_size": 200},
)
register(
    id="VisDA-v0",
    entry_point="asg_env.envs.env:ASGEnv",
    kwargs={
        "task": "visda",
        "backbone": "resnet101",
        "image_size": 224,
        "lr_base": 1e-4,
        "episode_steps": 1000,
        "target_eval_size": 0,
        "eval_every": "epoch",  # all 55,388 validation images: once per epoch, as the official code does
    },
)
# §3.2: FCN-VGG16 at 512×512 crops, batch 6, SGD 1e-3 (momentum 0.9, weight decay 5e-4), λ = 75.
register(
    id="GTA5-Cityscapes-v0",
    entry_point="asg_env.envs.env:ASGEnv",
    kwargs={
        "task": "gta5",
        "backbone": "vgg16",
        "image_size": 512,
        "batch_size": 6,
        "lr_base": 1e-3,
        "lam": 75.0,
        "episode_steps": 1000,
        "target_eval_size": 0,
        "num_workers": 4,
        "eval_every": "epoch",
    },
)
# Your own data: VisDA-17's recipe (η_base 1e-4, evaluation once per epoch on the whole target) and
# GTA5's (512 px crops, batch 6, η_base 1e-3, λ 75), on the backbone whose weights ship offline.
register(
    id="ImageFolder-v0",
    entry_point="asg_env.envs.env:ASGEnv",
    kwargs={"task": "imagefolder", "image_size": 224, "lr_base": 1e-4, "episode_steps": 1000, "target_eval_size": 0,
            "eval_every": "epoch"},
)
register(
    id="SegFolder-v0",
    entry_point="asg_env.envs.env:ASGEnv",
    kwargs={"task": "segfolder", "image_size": 512, "batch_size": 6, "lr_base": 1e-3, "lam": 75.0,
            "episode_steps": 1000, "target_eval_size": 0, "eval_every": "epoch"},
)
