"""What one training step costs at each resolution and number of frozen layer groups
(`train.frozen_groups`), as a ratio to the whole network at the first size, in one process.

CPU time of the process, not wall time: on a shared machine another job's load stretches wall
time, while the work of a step stays what it is.

    python -m benchmarks.step_cost --sizes 128 160 192 --frozen 0 3
"""

from __future__ import annotations

import argparse
import time

import torch

from imageclf.config import TrainParams
from imageclf.models.zoo import build_model
from imageclf.training.transfer import TransferPlan


def step_seconds(model_name: str, size: int, frozen: int, batch: int, steps: int) -> float:
    """CPU seconds of one forward + backward + AdamW step, after one warm-up step."""
    model = build_model(model_name, 4, in_channels=3, image_size=size)
    model.to(memory_format=torch.channels_last).train()
    cfg = TrainParams.model_construct(
        freeze_epochs=0, unfreeze="all", layer_lr_decay=1.0, freeze_bn=False,
        transfer="finetune", frozen_groups=frozen,
    )  # fmt: skip
    plan = TransferPlan.for_model(model, cfg, pretrained=True)
    plan.prepare()
    plan.start_epoch(1, toggle_requires_grad=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-3)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (batch,))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()
    started = time.process_time()
    for _ in range(steps):
        step()
    return (time.process_time() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 160, 192])
    parser.add_argument("--frozen", nargs="+", type=int, default=[0, 3])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # CPU time per step is comparable on one thread
    base = None
    print("| size | frozen groups | CPU s / step | ratio |\n|---:|---:|---:|---:|")
    for size in args.sizes:
        for frozen in args.frozen:
            seconds = step_seconds(args.model, size, frozen, args.batch, args.steps)
            base = base or seconds
            print(f"| {size} | {frozen} | {seconds:.2f} | {seconds / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
