"""Benchmark: one CPU training step in the default (NCHW) and the channels-last (NHWC) layout.

What ``engine.prefers_channels_last`` rests on. For each convolutional model
the pipeline trains, milliseconds per optimiser step (forward, backward, AdamW
or Adam) at batch 128 (DCGAN: 64, a discriminator and a generator step) with
the weights in NCHW and in NHWC; the input batch stays NCHW, as in the engine
on CPU. Inputs are uniform random images: a convolution's time does not depend
on the values. Each layout is timed ``--repeats`` times, interleaved, after 5
warm-up steps; the median is reported. Writes bench/results/channels_last_cpu.json.

    python bench/channels_last_cpu.py [--threads 1] [--steps 30] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from latentlab.atomic import write_json
from latentlab.models.base import build_model
from latentlab.models.gan import build_gan
from latentlab.quality import DomainClassifier

REPO = Path(__file__).resolve().parents[1]

Step = Callable[[], None]


def autoencoder(family: str, shape: tuple[int, int, int], channels_last: bool) -> Step:
    model = build_model(family, shape, 16)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(128, *shape)

    def step() -> None:
        out = model(x)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    return step


def classifier(channels_last: bool) -> Step:
    model = DomainClassifier(in_channels=1, num_classes=10, image_size=(28, 28))
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,))

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def dcgan(channels_last: bool) -> Step:
    pair = build_gan("dcgan", (1, 28, 28), 16)
    if channels_last:
        pair.to(memory_format=torch.channels_last)
    opt_g = torch.optim.Adam(pair.generator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(pair.discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    real = torch.rand(64, 1, 28, 28)

    def step() -> None:
        # One discriminator and one generator step with the non-saturating loss (softplus form).
        fake = pair.generator(pair.sample_latent(64))
        d_loss = F.softplus(-pair.discriminator(real)).mean() + F.softplus(pair.discriminator(fake.detach())).mean()
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        g_loss = F.softplus(-pair.discriminator(fake)).mean()
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()

    return step


CASES: dict[str, Callable[[bool], Step]] = {
    "conv (1, 28, 28)": lambda cl: autoencoder("conv", (1, 28, 28), cl),
    "conv (4, 28, 28)": lambda cl: autoencoder("conv", (4, 28, 28), cl),
    "conv_plus (1, 28, 28)": lambda cl: autoencoder("conv_plus", (1, 28, 28), cl),
    "conv_plus (1, 32, 32)": lambda cl: autoencoder("conv_plus", (1, 32, 32), cl),
    "vae_conv (1, 28, 28)": lambda cl: autoencoder("vae_conv", (1, 28, 28), cl),
    "domain classifier (1, 28, 28)": classifier,
    "dcgan (1, 28, 28)": dcgan,
}


def time_step(make: Callable[[bool], Step], channels_last: bool, steps: int) -> float:
    torch.manual_seed(0)
    step = make(channels_last)
    for _ in range(5):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return 1000 * (time.perf_counter() - start) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per layout, interleaved")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "channels_last_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = {}
    print(f"{'model':<32}{'NCHW ms':>10}{'NHWC ms':>10}{'speed-up':>10}")
    for name, make in CASES.items():
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for channels_last in (False, True):
                times[channels_last].append(time_step(make, channels_last, args.steps))
        nchw, nhwc = statistics.median(times[False]), statistics.median(times[True])
        rows[name] = {
            "nchw_ms": nchw,
            "nhwc_ms": nhwc,
            "speedup": nchw / nhwc,
            "all_ms": {"nchw": times[False], "nhwc": times[True]},
        }
        print(f"{name:<32}{nchw:>10.1f}{nhwc:>10.1f}{nchw / nhwc:>9.2f}x", flush=True)
    write_json(
        args.out,
        {
            "threads": args.threads,
            "steps": args.steps,
            "repeats": args.repeats,
            "torch": torch.__version__,
            "cases": rows,
        },
    )
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
