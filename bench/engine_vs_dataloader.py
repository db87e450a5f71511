"""Benchmark: the training engine against a plain torchvision Dataset + DataLoader loop.

Same model (the classic convolutional autoencoder, family ``conv``), same
optimiser (Adam, lr 1e-3), same batch size (128), same number of steps, on real
MNIST training images. The DataLoader loop is what most tutorials write: a
Dataset that turns each uint8 image into a PIL image and applies ToTensor per
sample, and a DataLoader that collates batches. The engine keeps the whole set
as one tensor on the device and indexes it with a permutation.

Prints images per second for both, their ratio, the MSE each reached on the
training images it saw, and the share of the engine's wall time spent outside
forward, backward and optimiser step. Writes bench/results/engine_vs_dataloader.json.

    python bench/engine_vs_dataloader.py [--steps 300] [--mnist ../shared/datasets/mnist]
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


class PerSampleMnist(torch.utils.data.Dataset):
    """The tutorial way: uint8 image -> PIL -> ToTensor, one sample at a time."""

    def __init__(self, images: np.ndarray) -> None:
        from torchvision import transforms

        self.images = images  # (N, 28, 28) uint8
        self.to_tensor = transforms.ToTensor()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.to_tensor(Image.fromarray(self.images[i], mode="L"))


def dataloader_loop(images: np.ndarray, steps: int, device: torch.device, seed: int) -> tuple[float, float]:
    torch.manual_seed(seed)
    model = build_model("conv", (1, 28, 28), 16).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(
        PerSampleMnist(images), batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    losses, done = [], 0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    while done < steps:
        for x in loader:
            x = x.to(device, non_blocking=True)
            out = model(x)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            losses.append(out.loss.detach())
            done += 1
            if done == steps:
                break
    sync()
    seconds = time.perf_counter() - start
    return steps * BATCH / seconds, float(torch.stack(losses[-20:]).mean())


def engine_loop(
    images: np.ndarray, steps: int, device: torch.device, seed: int, *, cuda_graph: bool = False, timing: bool = False
) -> tuple[float, float, float]:
    torch.manual_seed(seed)
    model = build_model("conv", (1, 28, 28), 16)
    x = (images.astype(np.float32) / 255.0)[:, None]
    n = steps * BATCH  # one epoch of exactly `steps` steps
    reps = int(np.ceil(n / len(x)))
    train = engine.TrainingData(np.concatenate([x] * reps)[:n])
    val = engine.TrainingData(x[:BATCH])
    cfg = TrainingConfig(epochs=1, batch_size=BATCH, lr=1e-3, amp=False, cuda_graph=cuda_graph)
    last: list[float] = []

    def keep_last_steps(report: engine.EpochReport, model: object) -> None:
        last[:] = report.steps["loss"][-20:]

    result = engine.fit(
        model, train, val, cfg, seed=seed, device=device, progress=False, on_epoch=keep_last_steps, timing=timing
    )
    # The mean loss of the last 20 steps, as for the DataLoader loop.
    steps_loss = float(np.mean(last))
    outside = 1.0 - result.compute_seconds / result.wall_seconds
    return steps * BATCH / result.wall_seconds, steps_loss, outside


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", type=Path, default=REPO.parent / "shared" / "datasets" / "mnist")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "engine_vs_dataloader.json")
    args = parser.parse_args()
    device = engine.pick_device("auto")
    images = read_idx_folder(args.mnist, MNIST_CLASSES, kind="mnist").parts["train"].x[:, 0]

    # Warm-up (first CUDA kernels, allocator) so neither side pays it.
    engine_loop(images[:2048], 5, device, args.seed)
    dl_ips, dl_loss = dataloader_loop(images, args.steps, device, args.seed)
    en_ips, en_loss, _ = engine_loop(images, args.steps, device, args.seed)
    # The share of time outside forward/backward/step, from a run that times every step
    # (on a GPU that run synchronises each step, so its speed is not the one reported).
    _, _, outside = engine_loop(images, args.steps, device, args.seed, timing=True)
    rows = [("DataLoader + ToTensor", dl_ips, dl_loss), ("latentlab engine", en_ips, en_loss)]
    graph_ips = graph_loss = None
    if device.type == "cuda":
        graph_ips, graph_loss, _ = engine_loop(images, args.steps, device, args.seed, cuda_graph=True)
        rows.append(("engine + CUDA graph", graph_ips, graph_loss))
    best = max(en_ips, graph_ips or 0.0)
    ratio = best / dl_ips
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"device {device} ({where}), {args.steps} steps of {BATCH}")
    print(f"{'loop':<24}{'images/s':>12}{'train MSE':>12}")
    for name, ips, loss in rows:
        print(f"{name:<24}{ips:>12.0f}{loss:>12.4f}")
    print(f"speed-up {ratio:.1f}x (engine {en_ips / dl_ips:.1f}x", end="")
    print(f", with CUDA graph {graph_ips / dl_ips:.1f}x)" if graph_ips else ")", end="")
    print(f"; engine time outside forward/backward/step: {100 * outside:.1f}%")
    write_json(
        args.out,
        {
            "device": str(device),
            "device_name": where,
            "steps": args.steps,
            "batch_size": BATCH,
            "dataloader_images_per_s": dl_ips,
            "engine_images_per_s": en_ips,
            "engine_cuda_graph_images_per_s": graph_ips,
            "speedup": ratio,
            "dataloader_train_mse": dl_loss,
            "engine_train_mse": en_loss,
            "engine_cuda_graph_train_mse": graph_loss,
            "engine_share_outside_compute": outside,
        },
    )
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
