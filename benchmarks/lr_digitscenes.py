"""How SynDigitScenes-v0's η_base was chosen, on synthetic data only.

Large LR everywhere, no guidance, 300 SGD steps (T = 30), seed 7: the synthetic held-out mIoU
after each 100 steps for η_base ∈ {1e-3, 3e-3, 5e-3, 1e-2}, on the task's labels (dilated by
3 px, see label_dilation_digitscenes.py). The rule: the largest final synthetic mIoU among
the runs that stay finite. The real target's score is never read. Output:
runs/segmentation/lr_choice.txt (published in results/segmentation/).

    python -m benchmarks.lr_digitscenes      # about 3 minutes on 2 CPU cores
"""

import argparse
import os
import sys
import time

import gymnasium as gym

import asg_env  # noqa: F401  (registers the ids)
from agents.policies import make_baseline
from agents.rollout import fine_tune


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("runs", "segmentation"),
                   help="output folder (default: runs/segmentation; the published copy is results/segmentation)")
    args = p.parse_args(argv)
    lines, finals = [], {}
    for lr in (1e-3, 3e-3, 5e-3, 1e-2):
        env = gym.make("SynDigitScenes-v0", lr_base=lr, lam=0.0, guidance="none", episode_steps=30, sgd_steps=300,
                       eval_every=10, imagenet_photos=0, target_eval_size=1)
        start = time.perf_counter()
        history = fine_tune(env.unwrapped.trainer, make_baseline("large-everywhere", 9), 7)
        curve = [round(r["synthetic_miou"], 3) for r in history if "synthetic_miou" in r]
        lines.append(f"η_base {lr:g}: synthetic held-out mIoU at steps 0/100/200/300 {curve}, "
                     f"diverged {bool(history[-1].get('diverged'))}, {time.perf_counter() - start:.0f} s")
        print(lines[-1], flush=True)
        if not history[-1].get("diverged"):
            finals[lr] = curve[-1]
    lines.append(f"Rule: the largest final synthetic mIoU among finite runs → η_base = {max(finals, key=finals.get):g}.")
    print(lines[-1])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "lr_choice.txt"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
