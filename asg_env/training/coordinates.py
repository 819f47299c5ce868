"""Optimization coordinates (ASG §2.2): groups of layers that share one learning-rate action.

The grouping is read off a traced forward pass, so any backbone gets one without a table:

1. Units. Walk the feature extractor's children in forward order. A child whose forward
   pass sees more than one change of spatial resolution (a whole network, VGG's
   ``features``, timm's ``blocks``) is split into its own children; any other child is a
   unit (ResNet's ``layer2``, one EfficientNet stage, a single conv).
2. Coordinates. Consecutive units that read and write the same resolutions form one
   coordinate, so a new coordinate starts wherever the resolution drops, and a unit that
   performs the drop by itself (a strided stem conv) stands alone. Units without trainable
   parameters (pools, activations) are dropped.
3. The new task head is always the last coordinate.

What this gives (224 px probe):

* ResNet-50/101: ``conv1, bn1, layer1, layer2, layer3, layer4, new_head`` (the paper's 7).
* VGG-16: ``conv1_x … conv5_x``, ``fc6+fc7``, ``new_head`` (7, the paper's count for VGG).
* EfficientNet-Lite0: ``conv_stem``, ``bn1+blocks.0``, ``blocks.1`` … ``blocks.5``,
  ``blocks.6+conv_head+bn2``, ``new_head`` (9): stages 3→4 and 5→6 change channels but
  only stages 1, 2, 3 and 5 drop resolution, so stage 4 (14→14 after stage 3's 28→14)
  and stage 6 start coordinates of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

Resolution = tuple[int, int] | None


@dataclass
class Coordinate:
    """One optimization coordinate: a name and the trainable parameters it controls."""

    name: str
    params: list[nn.Parameter] = field(repr=False)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def _resolution(t: object) -> Resolution:
    if isinstance(t, (tuple, list)) and t:
        t = t[0]
    if isinstance(t, torch.Tensor) and t.dim() == 4:
        return (int(t.shape[-2]), int(t.shape[-1]))
    return None


def _trace(features: nn.Module, probe_size: int) -> dict[str, tuple[Resolution, Resolution]]:
    """(input, output) resolution of every module that ran, keyed by qualified name."""
    seen: dict[str, tuple[Resolution, Resolution]] = {}
    hooks = []
    for name, module in features.named_modules():
        def hook(mod, inputs, output, name=name):
            seen.setdefault(name, (_resolution(inputs), _resolution(output)))

        hooks.append(module.register_forward_hook(hook))
    was_training = features.training
    features.eval()  # eval mode: tracing must not touch BatchNorm running statistics
    try:
        with torch.no_grad():
            device = next(features.parameters()).device
            features(torch.zeros(1, 3, probe_size, probe_size, device=device))
    finally:
        for h in hooks:
            h.remove()
        features.train(was_training)
    return seen


def _units(module: nn.Module, prefix: str, seen: dict) -> list[tuple[str, nn.Module]]:
    resolutions = {
        res
        for name, io in seen.items()
        if name == prefix or name.startswith(f"{prefix}.") or not prefix
        for res in io
        if res is not None
    }
    children = list(module.named_children())
    if len(resolutions) <= 2 or not children:
        return [(prefix, module)]
    units = []
    for child_name, child in children:
        units += _units(child, f"{prefix}.{child_name}" if prefix else child_name, seen)
    return units


def optimization_coordinates(
    features: nn.Module, new_head: nn.Module, probe_size: int = 224
) -> list[Coordinate]:
    """Group ``features``' trainable parameters into coordinates; ``new_head`` comes last."""
    seen = _trace(features, probe_size)
    groups: list[tuple[tuple, list[str], list[nn.Parameter]]] = []
    for name, unit in _units(features, "", seen):
        params = [p for p in unit.parameters() if p.requires_grad]
        if not params:
            continue
        if name not in seen:
            raise ValueError(f"module {name!r} has parameters but never ran in the forward pass")
        if groups and groups[-1][0] == seen[name]:
            groups[-1][1].append(name)
            groups[-1][2].extend(params)
        else:
            groups.append((seen[name], [name], params))
    coords = [Coordinate("+".join(names), params) for _, names, params in groups]
    coords.append(Coordinate("new_head", [p for p in new_head.parameters() if p.requires_grad]))
    covered = {id(p) for c in coords for p in c.params}
    missed = [n for n, p in features.named_parameters() if p.requires_grad and id(p) not in covered]
    if missed:
        raise ValueError(f"parameters outside every coordinate: {missed[:5]}")
    return coords
