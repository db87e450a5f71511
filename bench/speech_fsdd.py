"""Benchmark: speech cleaning on the real Free Spoken Digit Dataset.

The default pipeline cleans espeak-ng digits synthesized offline; this runs the
same stages on the 3,000 real FSDD recordings of ../shared/datasets/fsdd (6
speakers): ingest, corrupt (white and babble noise at the params' SNR), train
and evaluate PCA and the denoising autoencoder, compare. It builds a project in
a work folder (default bench/work/speech_fsdd, not versioned) whose params are
the repository's params.yaml restricted to speech, calls the library functions
behind the stages (no MLflow, no Great Expectations), prints the spectral SNR
of the noisy input, the Wiener filter and each cleaner for every noise, and
writes bench/results/speech_fsdd.json.

    python bench/speech_fsdd.py
    python bench/speech_fsdd.py --set 'train.zoo.denoising.latent_sizes=[128]' --out bench/results/speech_fsdd_k128.json

An existing work folder is reused stage by stage (delete it after changing
--set values that change ingest or corrupt).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_FSDD = REPO.parent / "shared" / "datasets" / "fsdd" / "recordings"
MODELS = ["pca", "denoising"]


def build_params(fsdd: Path, assignments: list[str]) -> dict:
    """The repository's params, speech only (read from ``fsdd``), PCA and the denoising model, no studies."""
    from latentlab.errors import ConfigError
    from latentlab.overlay import set_dotted

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["pipeline"]["datasets"] = ["speech"]
    params["ingest"]["datasets"] = {"speech": params["ingest"]["datasets"]["speech"] | {"path": str(fsdd)}}
    params["train"]["models"] = MODELS
    params["evaluate"]["latent"]["models"] = []
    for study in ("anomaly", "sparsity"):
        params["evaluate"][study]["datasets"] = []
    params["generate"]["datasets"] = []
    params["collapse"]["datasets"] = []
    for assignment in assignments:
        try:
            set_dotted(params, assignment)
        except ConfigError as exc:
            raise SystemExit(f"--set {exc}") from None
    return params


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdd", type=Path, default=SHARED_FSDD, help="folder of {digit}_{speaker}_{index}.wav")
    parser.add_argument("--root", type=Path, default=REPO / "bench" / "work" / "speech_fsdd")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one parameter")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "speech_fsdd.json")
    args = parser.parse_args()
    if not args.fsdd.is_dir():
        print(f"{args.fsdd} is absent: this benchmark needs the real FSDD recordings", file=sys.stderr)
        return 2

    from latentlab.atomic import write_json, write_text
    from latentlab.compare import compare_dataset
    from latentlab.config import load_params
    from latentlab.corrupt import corrupt_dataset
    from latentlab.data.ingest import ingest_dataset
    from latentlab.data.store import load_manifest
    from latentlab.engine import pick_device
    from latentlab.evaluate import evaluate_model
    from latentlab.paths import ProjectPaths
    from latentlab.train import trainer_for

    args.root.mkdir(parents=True, exist_ok=True)
    write_text(args.root / "params.yaml", yaml.safe_dump(build_params(args.fsdd, args.set), sort_keys=False))
    paths = ProjectPaths(args.root)
    params = load_params(paths.params)
    timings: dict[str, float] = {}

    def timed(name: str, step: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        value = step()
        timings[name] = round(time.perf_counter() - start, 1)
        print(f"{name}: {timings[name]} s", flush=True)
        return value

    if not (paths.processed("speech") / "manifest.json").exists():
        timed(
            "ingest",
            lambda: ingest_dataset(
                "speech",
                params.dataset("speech"),
                params.ingest,
                paths.processed("speech"),
                paths.raw_dataset("speech"),
            ),
        )
    if not (paths.corrupted("speech") / "manifest.json").exists():
        timed(
            "corrupt",
            lambda: corrupt_dataset("speech", paths.processed("speech"), paths.corrupted("speech"), params.corrupt),
        )
    for model in MODELS:
        timed(
            f"train {model}", lambda m=model: trainer_for(params.train.spec(m).family)(params, "speech", m, paths, None)
        )
        timed(f"evaluate {model}", lambda m=model: evaluate_model(params, "speech", m, paths))
    compared, _, _ = timed("compare", lambda: compare_dataset(params, "speech", paths))
    counts = load_manifest(paths.processed("speech")).counts
    cleaning = {
        noise: {"snr_db": entry["snr_db"], "improvement_over_wiener_db": entry["improvement_over_wiener_db"]}
        for noise, entry in compared["speech_cleaning"].items()
        if isinstance(entry, dict) and "snr_db" in entry
    }
    print(f"\nspectral SNR on the {counts['test']} FSDD test recordings (dB)")
    for noise, entry in cleaning.items():
        for method, snr in entry["snr_db"].items():
            print(f"{noise:<16}{method:<64}{snr:>7.2f}")
    result = {
        "device": str(pick_device("auto")),
        "fsdd": str(args.fsdd),
        "set": args.set,
        "counts": counts,
        "timings_s": timings,
        "speech_cleaning": cleaning,
        "log_mel": compared["denoising"],
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
