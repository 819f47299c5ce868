"""How SynDigitScenes-v0's label dilation was chosen, on synthetic labels only.

FCN-8s predicts at stride 8 and upsamples bilinearly, so it cannot draw 2-3 px strokes: its
mIoU would measure stroke localisation, which no domain gap touches, instead of which digit
is where. For each radius this prints how well the synthetic labels survive a stride-8 round
trip (each class's share of every 8×8 cell, bilinearly upsampled, argmax: the resolution
ceiling, no learning involved) and how much of the image the digits cover. The rule: the
smallest radius whose ceiling reaches 0.75 mIoU. The real target's labels are not read.
Output: runs/segmentation/label_dilation.txt (published in results/segmentation/).

    python -m benchmarks.label_dilation_digitscenes      # a few seconds (renders on first use)
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from asg_env.tasks.digitscenes import CLASSES, dilate_labels, load_digit_scenes
from asg_env.tasks.registry import default_cache_dir
from asg_env.training.segmentation import iou_from_confusion

STRIDE, SCENES, SIZE, RULE = 8, 1016, 64, 0.75  # SynDigitScenes-v0's source + held-out batch, 64 px


def stride_ceiling(labels: torch.Tensor, stride: int) -> float:
    k = len(CLASSES)
    one_hot = F.one_hot(labels, k).permute(0, 3, 1, 2).float()
    rebuilt = F.interpolate(F.avg_pool2d(one_hot, stride), size=labels.shape[-2:], mode="bilinear",
                            align_corners=False).argmax(1)
    confusion = torch.bincount(labels.flatten() * k + rebuilt.flatten(), minlength=k * k).view(k, k)
    return iou_from_confusion(confusion)[1].item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("runs", "segmentation"),
                   help="output folder (default: runs/segmentation; the published copy is results/segmentation)")
    args = p.parse_args(argv)
    _, labels = load_digit_scenes(default_cache_dir(), "synthetic", SCENES, SIZE, seed=0)
    lines, chosen = [], None
    for radius in range(5):
        y = torch.from_numpy(dilate_labels(labels, radius)).long()
        ceiling = stride_ceiling(y, STRIDE)
        chosen = radius if chosen is None and ceiling >= RULE else chosen
        lines.append(f"radius {radius}: digits cover {(y > 0).float().mean().item():.1%} of the pixels, "
                     f"stride-{STRIDE} ceiling mIoU {ceiling:.3f}")
        print(lines[-1], flush=True)
    lines.append(f"Rule: the smallest radius with a ceiling ≥ {RULE} → label_dilation = {chosen}.")
    print(lines[-1])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "label_dilation.txt"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
