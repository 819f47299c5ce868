"""Caches of the frozen teacher's ImageNet logits, keyed by source image.

The teacher is frozen and in eval mode, so when the source images are fixed (no random
augmentation) its logits are a pure function of the image and proxy guidance only needs the
teacher once per image:

* :class:`MemoryTeacherCache` fills itself lazily, in fp32, for sources held in memory
  (SynDigits): exact, and the teacher runs only during the first epoch.
* :class:`DiskTeacherCache` is built once for file-based sources (VisDA-17), in one pass with a
  progress bar, stored as an fp16 ``.npy`` file and memory-mapped, so it survives between runs
  and costs no RAM. fp16 rounds the logits by about 1e-3 relative, so ``L_KL`` at reset is of
  order 1e-6 instead of exactly 0.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

Teacher = Callable[[torch.Tensor], torch.Tensor]


class MemoryTeacherCache:
    """Teacher logits for ``size`` in-memory images, computed the first time each is seen."""

    def __init__(self, size: int, num_logits: int, device: torch.device):
        self.logits = torch.empty(size, num_logits, device=device)
        self.known = torch.zeros(size, dtype=torch.bool, device=device)

    def __call__(self, x: torch.Tensor, index: torch.Tensor, teacher: Teacher) -> torch.Tensor:
        missing = ~self.known[index]
        if missing.any():
            self.logits[index[missing]] = teacher(x[missing]).float()
            self.known[index[missing]] = True
        return self.logits[index]


class DiskTeacherCache:
    """Teacher logits for every image of a dataset of ``(x, y, index)``, in an fp16 file."""

    def __init__(self, path: str, device: torch.device):
        self.array = np.load(path, mmap_mode="r")
        self.device = device

    @classmethod
    def open_or_build(cls, cache_dir: str, key: str, dataset: Dataset, teacher: Teacher, num_logits: int,
                      device: torch.device, batch_size: int = 64, num_workers: int = 2) -> "DiskTeacherCache":
        """Open the cache for ``key``, building it first if it does not exist yet."""
        name = hashlib.sha1(key.encode()).hexdigest()[:20]
        path = os.path.join(cache_dir, "teacher-logits", f"{name}.npy")
        if not os.path.isfile(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp.npy"
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(dataset), num_logits))
            loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
            for x, _, index in tqdm(loader, desc="caching teacher logits", leave=False):
                out[index.numpy()] = teacher(x.to(device)).float().cpu().numpy().astype(np.float16)
            out.flush()
            del out
            os.replace(tmp, path)  # atomic: an interrupted build never leaves half a cache
        return cls(path, device)

    def __call__(self, x: torch.Tensor, index: torch.Tensor, teacher: Teacher) -> torch.Tensor:
        logits = torch.from_numpy(self.array[index.cpu().numpy()].astype(np.float32))
        return logits.to(self.device, non_blocking=True)
