"""Benchmark: the training engine against a plain torchvision Dataset + DataLoader loop.

Same model (the classic convolutional autoencoder, family ``conv``), same
optimiser (Adam, lr 1e-3), same batch size (128), the same number of steps: whole
epochs of the 60,000 real MNIST training images (469 steps each, the last of 96).
The DataLoader loop is what most tutorials write: a Dataset that turns each
uint8 image into a PIL image and applies ToTensor per sample, and a DataLoader
that collates batches. The engine keeps the whole set as one tensor on the
device and indexes it with a permutation, with its default bf16 autocast on a
GPU (``--fp32`` turns it off) and channels-last convolutions on CPU and under a
CUDA graph (engine.prefers_channels_last); the DataLoader loop runs fp32 NCHW.

Each side's time runs from the images in memory as a uint8 array to the last
step finished: the engine's includes copying the set to the device, capturing
its CUDA graph and the validation pass after each epoch.

Prints images per second for both, their ratio, the MSE each reached on the
training images it saw, and the share of the engine's wall time spent outside
forward, backward and optimiser step. Writes bench/results/engine_vs_dataloader.json.

    python bench/engine_vs_dataloader.py [--epochs 1] [--fp32] [--mnist ../shared/datasets/mnist]
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


def dataloader_loop(images: np.ndarray, epochs: int, device: torch.device, seed: int) -> tuple[float, float]:
    torch.manual_seed(seed)
    model = build_model("conv", (1, 28, 28), 16).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(
        PerSampleMnist(images), batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    losses = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    for _ in range(epochs):
        for x in loader:
            x = x.to(device, non_blocking=True)
            out = model(x)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            losses.append(out.loss.detach())
    sync()
    seconds = time.perf_counter() - start
    return epochs * len(images) / seconds, float(torch.stack(losses[-20:]).mean())


def engine_loop(
    images: np.ndarray,
    epochs: int,
    device: torch.device,
    seed: int,
    *,
    amp: bool = False,
    cuda_graph: bool = False,
    timing: bool = False,
) -> tuple[float, float, float]:
    torch.manual_seed(seed)
    model = build_model("conv", (1, 28, 28), 16)
    start = time.perf_counter()
    x = np.divide(images, np.float32(255.0), dtype=np.float32)[:, None]  # (N, 1, 28, 28), one pass
    train, val = engine.TrainingData(x), engine.TrainingData(x[:BATCH])
    cfg = TrainingConfig(epochs=epochs, batch_size=BATCH, lr=1e-3, amp=amp, cuda_graph=cuda_graph, patience=epochs)
    last: list[float] = []

    def keep_last_steps(report: engine.EpochReport, model: object) -> None:
        last[:] = report.steps["loss"][-20:]

    result = engine.fit(
        model, train, val, cfg, seed=seed, device=device, progress=False, on_epoch=keep_last_steps, timing=timing
    )
    seconds = time.perf_counter() - start
    # The mean loss of the last 20 steps, as for the DataLoader loop.
    steps_loss = float(np.mean(last))
    outside = 1.0 - result.compute_seconds / result.wall_seconds
    return epochs * len(x) / seconds, steps_loss, outside


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", type=Path, default=REPO.parent / "shared" / "datasets" / "mnist")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of the 60,000 images (469 steps each)")
    parser.add_argument(
        "--fp32", action="store_true", help="the engine without its default bf16 autocast (which is GPU only)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "engine_vs_dataloader.json")
    args = parser.parse_args()
    amp = not args.fp32
    device = engine.pick_device("auto")
    images = read_idx_folder(args.mnist, MNIST_CLASSES, kind="mnist").parts["train"].x[:, 0]

    steps = args.epochs * -(-len(images) // BATCH)
    # Warm-up (CUDA context, cuDNN's autotuning of every shape and layout, the allocator) so
    # that neither side pays it in its timed run: 16 full batches and one of 96, the shapes
    # of an epoch of 60,000, through each loop once.
    warm = images[: 16 * BATCH + len(images) % BATCH]
    dataloader_loop(warm, 1, device, args.seed)
    engine_loop(warm, 1, device, args.seed, amp=amp)
    engine_loop(warm, 1, device, args.seed, amp=amp, cuda_graph=device.type == "cuda")
    dl_ips, dl_loss = dataloader_loop(images, args.epochs, device, args.seed)
    en_ips, en_loss, _ = engine_loop(images, args.epochs, device, args.seed, amp=amp)
    # The share of time outside forward/backward/step, from a run that times every step
    # (on a GPU that run synchronises each step, so its speed is not the one reported).
    _, _, outside = engine_loop(images, args.epochs, device, args.seed, amp=amp, timing=True)
    rows = [("DataLoader + ToTensor", dl_ips, dl_loss), ("latentlab engine", en_ips, en_loss)]
    graph_ips = graph_loss = None
    if device.type == "cuda":
        graph_ips, graph_loss, _ = engine_loop(images, args.epochs, device, args.seed, amp=amp, cuda_graph=True)
        rows.append(("engine + CUDA graph", graph_ips, graph_loss))
    best = max(en_ips, graph_ips or 0.0)
    ratio = best / dl_ips
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"device {device} ({where}), {args.epochs} epochs of {len(images)} images, {steps} steps of {BATCH}")
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
            "epochs": args.epochs,
            "steps": steps,
            "batch_size": BATCH,
            "engine_amp_bf16": amp and device.type == "cuda",
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
