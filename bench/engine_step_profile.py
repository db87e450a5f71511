"""Benchmark: where one training step of the convolutional autoencoder spends its time on a GPU.

For the ``conv`` autoencoder at batch 128 on real MNIST, with the engine's own
step functions (eager, and captured as a CUDA graph), in fp32 and bf16 autocast,
in the default and the channels-last memory format:

- ``loop_ms``: milliseconds per step of the engine's loop (slice the device
  permutation, run the step, keep its loss values), timed over many steps with
  one synchronisation at the end: what training sees;
- ``gpu_ms``: milliseconds per step with the host out of the way (back-to-back
  graph replays, or eager steps, timed by CUDA events): the GPU's own time, so
  ``loop_ms`` well above it means the host (launches, Python) is the limit;
- ``kernels``: CUDA kernels one eager step launches (torch.profiler).

Also the one-off costs of ``engine.fit`` before its first step: copying the
training set to the device and hashing it for a checkpoint fingerprint.
Needs CUDA. Writes bench/results/engine_step_profile.json.

    python bench/engine_step_profile.py [--steps 500] [--mnist ../shared/datasets/mnist]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from latentlab import engine
from latentlab.atomic import write_json
from latentlab.config import TrainingConfig
from latentlab.data.idx import MNIST_CLASSES, read_idx_folder
from latentlab.models.base import build_model

REPO = Path(__file__).resolve().parents[1]
BATCH = 128


def _variant(images: torch.Tensor, steps: int, *, graph: bool, amp: bool, channels_last: bool) -> dict[str, float]:
    torch.manual_seed(0)
    device = images.device
    model = build_model("conv", (1, 28, 28), 16).to(device)
    inputs = images
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        inputs = images.contiguous(memory_format=torch.channels_last)
    cfg = TrainingConfig(batch_size=BATCH, lr=1e-3, amp=amp, cuda_graph=graph)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True, capturable=graph)
    step: engine._Step = engine._eager_step(model, optimizer, inputs, None, device, amp)
    if graph:
        step = engine._graphed_step(model, optimizer, inputs, None, device, cfg, step)
    order = torch.randperm(len(inputs), device=device)

    def run(n: int) -> list[torch.Tensor]:
        values = []
        for i in range(n):
            first = (i * BATCH) % (len(inputs) - BATCH)
            values.append(step(order[first : first + BATCH]))
        return values

    run(20)  # warm-up: cuDNN autotuning, allocator
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    values = run(steps)
    torch.stack(values).cpu()
    loop_ms = 1e3 * (time.perf_counter() - t0) / steps

    # The GPU's own time: queue work far ahead of the GPU, then time it with events.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    if graph:
        start.record()
        for _ in range(steps):
            step.graph.replay()
        end.record()
    else:
        # An eager step's GPU idles while the host launches, so this is near loop_ms.
        index = order[:BATCH]
        start.record()
        for _ in range(steps):
            step(index)
        end.record()
    torch.cuda.synchronize()
    gpu_ms = start.elapsed_time(end) / steps

    kernels = 0
    if not graph:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step(order[:BATCH])
            torch.cuda.synchronize()
        kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return {"loop_ms": loop_ms, "gpu_ms": gpu_ms, "images_per_s": BATCH / loop_ms * 1e3, "kernels": kernels}


def _kernel_table(images: torch.Tensor, *, amp: bool) -> str:
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = build_model("conv", (1, 28, 28), 16).to(images.device).to(memory_format=torch.channels_last)
    inputs = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    step = engine._eager_step(model, optimizer, inputs, None, images.device, amp)
    index = torch.arange(BATCH, device=images.device)
    for _ in range(20):
        step(index)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step(index)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=70)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", type=Path, default=REPO.parent / "shared" / "datasets" / "mnist")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "engine_step_profile.json")
    parser.add_argument("--kernels", action="store_true", help="also print the CUDA kernels of one eager step")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("engine_step_profile: needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    x = read_idx_folder(args.mnist, MNIST_CLASSES, kind="mnist").parts["train"].x.astype(np.float32) / 255.0

    t0 = time.perf_counter()
    engine.TrainingData(x).digest()
    digest_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    images = engine._to_device(x, torch.device("cuda"))
    torch.cuda.synchronize()
    to_device_s = time.perf_counter() - t0

    rows = {}
    print(f"{torch.cuda.get_device_name()}, conv autoencoder, batch {BATCH}, {args.steps} steps per row")
    print(f"{'step':<34}{'loop ms':>9}{'gpu ms':>9}{'images/s':>11}{'kernels':>9}")
    for graph in (False, True):
        for amp in (False, True):
            for channels_last in (False, True):
                name = f"{'graph' if graph else 'eager'} {'bf16' if amp else 'fp32'}" + (
                    " channels_last" if channels_last else ""
                )
                row = _variant(images, args.steps, graph=graph, amp=amp, channels_last=channels_last)
                rows[name] = row
                print(
                    f"{name:<34}{row['loop_ms']:>9.3f}{row['gpu_ms']:>9.3f}"
                    f"{row['images_per_s']:>11.0f}{row['kernels'] or '':>9}"
                )
    if args.kernels:
        for amp in (False, True):
            print(f"kernels of one eager step, {'bf16' if amp else 'fp32'} channels_last, by GPU time:")
            print(_kernel_table(images, amp=amp))
    print(
        f"one-off: training set ({x.nbytes / 1e6:.0f} MB) to the device {to_device_s:.3f} s, SHA-256 {digest_s:.3f} s"
    )
    write_json(
        args.out,
        {
            "device_name": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "batch_size": BATCH,
            "steps": args.steps,
            "train_bytes": int(x.nbytes),
            "to_device_s": to_device_s,
            "digest_s": digest_s,
            "steps_profile": rows,
        },
    )
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
