"""Model collapse: generative models retrained on their own samples, generation after generation.

Generation 0 trains a generative model on real data. Every later generation
``g = 1..N`` trains a *fresh* model on a training set whose make-up is set by
the loop type:

``replace``
    only the samples of generation ``g - 1`` (the fully synthetic loop of
    Shumailov et al. 2024, "AI models collapse when trained on recursively
    generated data", and the "self-consuming" loop of Alemohammad et al. 2023);
``accumulate``
    the real data plus the samples of *every* earlier generation
    (Gerstgrasser et al. 2024, "Is model collapse inevitable?");
``augment``
    a fixed real subset plus ``round(f * real_size)`` samples of generation
    ``g - 1`` (Alemohammad et al.'s "synthetic augmentation loop");
``fresh``
    ``real_size`` *new* real samples each generation, drawn without replacement
    from the real pool (disjoint from all earlier generations as long as the pool
    allows, then reused least-recently-used first), plus ``round(f * real_size)``
    samples of generation ``g - 1`` (Alemohammad et al.'s "fresh data loop").

Every loop draws its samples with a truncation ``psi`` (``psi < 1`` samples
closer to the mode, the sampling bias that speeds collapse up). After the last
generation an optional *healing* phase trains ``H`` more generations on real
data only (the generation-0 real set; Bohacek and Farid 2023, "Nepotistically
trained generative-AI models collapse"). With ``healing_start: finetune`` each
healing generation continues training the previous generation's model, as
Bohacek and Farid retrain the collapsed model on real images; with ``fresh``
it trains a new one, a control that forgets the loop entirely.

The models and metrics are injected: a :class:`GenerativeBackend` fits, samples
and evaluates; this module only composes the training sets, derives seeds,
records results, persists state so that a killed run resumes, and summarises
over seeds. :class:`GaussianBackend` is the analytic toy model of Shumailov et
al. 2024 (section "Theoretical intuition"): a Gaussian refitted by maximum
likelihood to its own finite samples loses variance every generation (the
expected total variance shrinks by ``(M - 1) / M`` per generation for ``M``
samples, and almost surely tends to 0), whereas accumulating the data keeps it
near the real variance.

Seeds: every random choice of seed ``s`` derives from ``s``, the step and the
purpose only, not from the loop, so generation 0 is the same model under every
loop (a paired comparison) and reruns are identical.

The study on a processed dataset (:func:`run_collapse`, the ``collapse``
stage) uses the VAE and GAN backends of :mod:`latentlab.collapse_backends`:
it runs every (loop, seed) pair, or loads it from the state folder
(:func:`run_collapse_pairs` runs pairs without summarising, for parallel
workers), and writes the metrics JSON with an automatic verdict on the
expected pattern (:func:`collapse_pattern`), a CSV table and the figures;
:func:`collapse_report_section` renders them for ``reports/index.html``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np

from latentlab.atomic import atomic_path, write_json
from latentlab.config import CollapseConfig
from latentlab.errors import DataError

logger = logging.getLogger(__name__)

Array = np.ndarray
Phase = Literal["loop", "healing"]

# Purposes of derived seeds: one stream per (seed, step, purpose).
_POOL, _COMPOSE, _FIT, _SAMPLE, _EVAL = range(5)


# -------------------------------------------------------------------- backend
class GenerativeBackend(Protocol):
    """What the collapse loop needs of a generative model family (VAE, GAN, the Gaussian toy).

    ``fit`` trains a *fresh* model when ``init`` is None and otherwise continues
    training ``init`` (a model it returned before), without changing ``init``
    itself. A resumed run calls it for the unfinished generations only. A
    backend that writes checkpoints should be built per (loop, seed): the fit
    seed does not depend on the loop. ``save_model`` / ``load_model`` persist a
    model handle, so that a resumed run can fine-tune a model fitted before it.
    """

    def fit(self, images: Array, labels: Array | None, *, seed: int, generation: int, init: Any = None) -> Any:
        """Train on ``images`` (N, C, H, W) float32 in [0, 1] (labels (N,) or None); return a model handle.

        ``generation`` is the step of the run: ``g`` for loop generation g,
        ``N + h`` for healing generation h (unique within a run). ``init``: the
        model to continue from (a fine-tuned healing generation), or None.
        """
        ...

    def save_model(self, model: Any, path: Path) -> None:
        """Write ``model`` to the file ``path`` (the caller makes the write atomic)."""
        ...

    def load_model(self, path: Path) -> Any:
        """A model handle read from a file written by ``save_model``."""
        ...

    def sample(self, model: Any, n: int, *, psi: float, seed: int) -> tuple[Array, Array | None]:
        """Draw ``n`` samples with truncation ``psi``: images (n, C, H, W) float32, labels (n,) or None."""
        ...

    def evaluate(self, model: Any, samples: Array, sample_labels: Array | None, *, generation: int) -> dict[str, float]:
        """Quality/diversity metrics of ``samples``, plus a held-out real NLL or reconstruction error."""
        ...


# ---------------------------------------------------------------- data sets
class Samples(NamedTuple):
    """Images (N, C, H, W) float32 and their labels (N,), or None when unlabelled."""

    images: Array
    labels: Array | None


TrainingSet = tuple[Array, Array | None, dict[str, Any]]
Builder = Callable[[int, Samples, Sequence[Samples], CollapseConfig, np.random.Generator], TrainingSet]


def _concat(parts: Sequence[Samples]) -> Samples:
    """Stack parts; the labels survive only when every part has them."""
    parts = [p for p in parts if len(p.images)]
    if not parts:
        raise ValueError("empty training set")
    images = np.concatenate([np.asarray(p.images, dtype=np.float32) for p in parts])
    if any(p.labels is None for p in parts):
        return Samples(images, None)
    return Samples(images, np.concatenate([np.asarray(p.labels) for p in parts]))


def _take(s: Samples, rows: Array) -> Samples:
    return Samples(s.images[rows], None if s.labels is None else s.labels[rows])


def _fixed_real(pool: Samples, cfg: CollapseConfig) -> Samples:
    """The fixed real subset: the first ``real_size`` rows of the (already shuffled) pool."""
    if len(pool.images) < cfg.real_size:
        raise DataError(f"the real pool has {len(pool.images)} samples; real_size needs {cfg.real_size}")
    return _take(pool, np.arange(cfg.real_size))


def _previous(history: Sequence[Samples], generation: int) -> Samples:
    if len(history) < generation:
        raise ValueError(f"generation {generation} needs the samples of generation {generation - 1}")
    return history[generation - 1]


def _synthetic_subset(prev: Samples, cfg: CollapseConfig, rng: np.random.Generator) -> Samples:
    """``round(f * real_size)`` samples of the previous generation, chosen at random without replacement."""
    k = cfg.synthetic_count
    if k > len(prev.images):
        raise ValueError(f"{k} synthetic samples needed but the previous generation drew {len(prev.images)}")
    # At random, not the first k: a backend may return its samples ordered (by class, say).
    return _take(prev, np.sort(rng.choice(len(prev.images), size=k, replace=False)))


def _provenance(real: int, synthetic: int, generations: Iterable[int]) -> dict[str, Any]:
    return {"real": real, "synthetic": synthetic, "synthetic_generations": list(generations)}


def _replace(
    g: int, pool: Samples, history: Sequence[Samples], cfg: CollapseConfig, rng: np.random.Generator
) -> TrainingSet:
    prev = _previous(history, g)
    s = _concat([prev])
    return s.images, s.labels, _provenance(0, len(prev.images), [g - 1])


def _accumulate(
    g: int, pool: Samples, history: Sequence[Samples], cfg: CollapseConfig, rng: np.random.Generator
) -> TrainingSet:
    real = _fixed_real(pool, cfg)
    if len(history) < g:
        raise ValueError(f"generation {g} needs the samples of generations 0..{g - 1}")
    synthetic = list(history[:g])
    s = _concat([real, *synthetic])
    return s.images, s.labels, _provenance(len(real.images), sum(len(p.images) for p in synthetic), range(g))


def _augment(
    g: int, pool: Samples, history: Sequence[Samples], cfg: CollapseConfig, rng: np.random.Generator
) -> TrainingSet:
    real = _fixed_real(pool, cfg)
    synthetic = _synthetic_subset(_previous(history, g), cfg, rng)
    s = _concat([real, synthetic])
    return s.images, s.labels, _provenance(len(real.images), len(synthetic.images), [g - 1])


def fresh_real_rows(generation: int, pool_size: int, real_size: int) -> Array:
    """Rows of the shuffled pool that ``fresh`` generation ``generation`` trains on.

    Consecutive blocks of ``real_size``: disjoint across generations while
    ``(generation + 1) * real_size <= pool_size``, then wrapping round the pool
    (the least recently used rows first).
    """
    if real_size > pool_size:
        raise DataError(f"the real pool has {pool_size} samples; real_size needs {real_size}")
    return (generation * real_size + np.arange(real_size)) % pool_size


def _fresh(
    g: int, pool: Samples, history: Sequence[Samples], cfg: CollapseConfig, rng: np.random.Generator
) -> TrainingSet:
    real = _take(pool, fresh_real_rows(g, len(pool.images), cfg.real_size))
    synthetic = _synthetic_subset(_previous(history, g), cfg, rng)
    s = _concat([real, synthetic])
    return s.images, s.labels, _provenance(len(real.images), len(synthetic.images), [g - 1])


# Training set of loop generation g >= 1, by loop type (generation 0 is real data for every loop).
_BUILDERS: dict[str, Builder] = {
    "replace": _replace,
    "accumulate": _accumulate,
    "augment": _augment,
    "fresh": _fresh,
}


def build_training_set(
    loop: str,
    generation: int,
    real_pool: Samples | tuple[Array, Array | None],
    synthetic_history: Sequence[Samples | tuple[Array, Array | None]],
    cfg: CollapseConfig,
    rng: np.random.Generator,
    *,
    phase: Phase = "loop",
) -> TrainingSet:
    """The training set of one generation: (images (N, C, H, W) float32, labels (N,) or None, provenance).

    ``real_pool`` is the real data *in the order the run uses it* (shuffled
    once per seed): its first ``real_size`` rows are the fixed real subset.
    ``synthetic_history[k]`` holds the samples drawn from generation k's model.
    ``rng`` picks the synthetic subset of augment/fresh. Generation 0 and every
    healing generation train on the fixed real subset only. Provenance is
    ``{"real": count, "synthetic": count, "synthetic_generations": [k, ...]}``.
    Labels are kept only when every part is labelled. Pure: nothing is mutated.
    """
    if loop not in _BUILDERS:
        raise ValueError(f"unknown loop {loop!r} (known: {', '.join(_BUILDERS)})")
    if generation < 0:
        raise ValueError(f"generation must be >= 0, got {generation}")
    pool = Samples(*real_pool)
    if phase == "healing" or generation == 0:
        real = _fixed_real(pool, cfg)
        s = _concat([real])
        return s.images, s.labels, _provenance(len(real.images), 0, [])
    history = [Samples(*h) for h in synthetic_history]
    return _BUILDERS[loop](generation, pool, history, cfg, rng)


# ------------------------------------------------------------------- results
@dataclass(frozen=True)
class GenerationResult:
    """One trained generation of one loop and seed."""

    loop: str
    seed: int
    generation: int  # g in 0..N for phase "loop"; h in 1..H for phase "healing"
    phase: Phase
    n_real: int  # real samples in its training set
    n_synthetic: int  # synthetic samples in its training set
    metrics: dict[str, float]  # as returned by the backend's evaluate
    seconds: float  # wall time of fit, sampling and evaluation (not a metric: it differs between runs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationResult:
        return cls(
            loop=str(d["loop"]),
            seed=int(d["seed"]),
            generation=int(d["generation"]),
            phase=d["phase"],
            n_real=int(d["n_real"]),
            n_synthetic=int(d["n_synthetic"]),
            metrics={str(k): float(v) for k, v in d["metrics"].items()},
            seconds=float(d["seconds"]),
        )


SampleGrid = Callable[[GenerationResult, Array], None]


def derive_seed(seed: int, step: int, purpose: int) -> int:
    """A 32-bit seed for one (run seed, step, purpose); independent streams for different triples."""
    return int(np.random.SeedSequence([seed, step, purpose]).generate_state(1, dtype=np.uint32)[0])


# --------------------------------------------------------------------- state
class _State:
    """Finished generations of one (loop, seed) on disk: result JSON, and the samples (npz) of loop generations.

    The folder name carries a fingerprint of everything that shapes the results
    except N, H, the loop list and the seed list, so a changed setting or data set
    starts afresh instead of reusing stale generations. The backend is not part
    of it: use one ``state_dir`` per backend configuration.
    """

    def __init__(self, state_dir: Path, loop: str, seed: int, cfg: CollapseConfig, real: Array, labels: Array | None):
        settings = {
            "loop": loop,
            "seed": seed,
            "samples_per_generation": cfg.samples_per_generation,
            "real_size": cfg.real_size,
            "synthetic_fraction": cfg.synthetic_fraction,
            "psi": cfg.psi,
            "eval_samples": cfg.eval_samples,
            "data": _digest(real, labels),
        }
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        self.settings = settings
        self.folder = Path(state_dir) / f"{loop}-seed{seed}-{key}"
        self.n = cfg.generations
        self.healing_start = cfg.healing_start

    def _stem(self, phase: Phase, generation: int) -> str:
        if phase == "loop":
            return f"g{generation:04d}"
        # Healing depends on which generation it follows, and on how it starts (fresh healing kept
        # the name it had before fine-tuning existed, so its finished generations are still found).
        start = "-finetune" if self.healing_start == "finetune" else ""
        return f"after-g{self.n:04d}{start}-h{generation:04d}"

    def _model_path(self, phase: Phase, generation: int) -> Path:
        return self.folder / f"{self._stem(phase, generation)}.model"

    def save_model(self, backend: GenerativeBackend, model: Any, phase: Phase, generation: int) -> None:
        with atomic_path(self._model_path(phase, generation)) as tmp:
            backend.save_model(model, tmp)

    def load_model(self, backend: GenerativeBackend, phase: Phase, generation: int) -> Any | None:
        path = self._model_path(phase, generation)
        return backend.load_model(path) if path.exists() else None

    def load(self, phase: Phase, generation: int) -> tuple[GenerationResult, Samples | None] | None:
        stem = self._stem(phase, generation)
        result_path, samples_path = self.folder / f"{stem}.json", self.folder / f"{stem}.npz"
        if not result_path.exists() or (phase == "loop" and not samples_path.exists()):
            return None
        result = GenerationResult.from_dict(json.loads(result_path.read_text(encoding="utf-8"))["result"])
        if phase == "healing":
            return result, None
        with np.load(samples_path, allow_pickle=False) as z:
            samples = Samples(z["images"], z["labels"] if "labels" in z.files else None)
        return result, samples

    def save(self, result: GenerationResult, samples: Samples | None) -> None:
        """Save a finished generation; a model it needs kept must be saved (:meth:`save_model`) first."""
        stem = self._stem(result.phase, result.generation)
        if samples is not None:
            arrays = {"images": samples.images}
            if samples.labels is not None:
                arrays["labels"] = samples.labels
            with atomic_path(self.folder / f"{stem}.npz") as tmp:
                np.savez(tmp, **arrays)
        # The JSON last: its presence marks the generation finished.
        write_json(self.folder / f"{stem}.json", {"result": result.to_dict(), "settings": self.settings})


def _digest(real: Array, labels: Array | None) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in (real, labels):
        if a is None:
            h.update(b"none")
            continue
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


# ---------------------------------------------------------------------- loop
def _check_real(real_train: Array, real_labels: Array | None) -> None:
    if real_train.ndim != 4:
        raise DataError(f"real images must be (N, C, H, W), got shape {real_train.shape}")
    if not np.issubdtype(real_train.dtype, np.floating):
        raise DataError(f"real images must be float in [0, 1] (see data.store.to_unit_float), got {real_train.dtype}")
    if real_labels is not None and len(real_labels) != len(real_train):
        raise DataError(f"{len(real_labels)} real labels for {len(real_train)} real images")


def _continued(phase: Phase, generation: int, cfg: CollapseConfig) -> bool:
    """Whether the next step fine-tunes this step's model: the last loop generation and every healing
    generation but the last, when healing starts from the previous model."""
    if cfg.healing_generations == 0 or cfg.healing_start != "finetune":
        return False
    if phase == "loop":
        return generation == cfg.generations
    return generation < cfg.healing_generations


def _as_samples(out: tuple[Array, Array | None], n: int) -> Samples:
    images, labels = out
    images = np.asarray(images, dtype=np.float32)
    if len(images) != n or (labels is not None and len(labels) != n):
        raise ValueError(f"the backend returned {len(images)} samples, asked for {n}")
    return Samples(images, None if labels is None else np.asarray(labels))


def run_loop(
    loop: str,
    seed: int,
    backend: GenerativeBackend,
    real_train: Array,
    real_labels: Array | None,
    cfg: CollapseConfig,
    *,
    on_generation: Callable[[GenerationResult], None] | None = None,
    sample_grid: SampleGrid | None = None,
    state_dir: Path | None = None,
) -> list[GenerationResult]:
    """Run loop ``loop`` for ``seed``: generations 0..N, then healing generations 1..H, in order.

    ``real_train`` (P, C, H, W) float32 in [0, 1] is the real pool (labels (P,)
    or None); it is shuffled once under ``seed``. Each loop generation fits a
    fresh model on :func:`build_training_set`'s set, draws
    ``samples_per_generation`` samples (the later generations' data; loop phase
    only) and ``eval_samples`` samples for ``backend.evaluate``, all with
    truncation ``psi``. A healing generation fine-tunes the previous step's
    model on the real set (``healing_start: finetune``) or fits a fresh one.

    ``on_generation(result)`` and ``sample_grid(result, eval sample images)``
    are called after each generation computed by this call. With ``state_dir``,
    every finished generation is written there (atomically) and a rerun loads
    the finished prefix instead of refitting: it continues after the last
    finished generation, also when N has been raised since. A model the next
    step fine-tunes is saved with its generation; a generation whose model is
    needed but was not saved (its state predates the fine-tuning) is refitted,
    with the same seed. Returns every generation's result, loaded ones included.
    """
    if loop not in _BUILDERS:
        raise ValueError(f"unknown loop {loop!r} (known: {', '.join(_BUILDERS)})")
    _check_real(real_train, real_labels)
    order = np.random.default_rng(derive_seed(seed, 0, _POOL)).permutation(len(real_train))
    pool = Samples(real_train[order], None if real_labels is None else real_labels[order])
    state = None if state_dir is None else _State(state_dir, loop, seed, cfg, real_train, real_labels)

    steps: list[tuple[Phase, int, int]] = [("loop", g, g) for g in range(cfg.generations + 1)]
    steps += [("healing", h, cfg.generations + h) for h in range(1, cfg.healing_generations + 1)]
    history: list[Samples] = []
    results: list[GenerationResult] = []
    resuming = state is not None
    previous_model: Any = None  # the model the next step fine-tunes, when it does
    for phase, generation, step in steps:
        keep = _continued(phase, generation, cfg)
        if resuming:
            loaded = state.load(phase, generation)  # type: ignore[union-attr]
            if loaded is not None and keep:
                kept = state.load_model(backend, phase, generation)  # type: ignore[union-attr]
                if kept is None:
                    loaded = None  # finished before its model was kept: refit it (same seed, same set)
                else:
                    previous_model = kept
            if loaded is not None:
                result, samples = loaded
                results.append(result)
                if samples is not None:
                    history.append(samples)
                logger.info("%s seed %d: %s generation %d loaded from state", loop, seed, phase, generation)
                continue
            resuming = False  # from here on everything is recomputed: it follows a recomputed generation

        start = time.perf_counter()
        rng = np.random.default_rng(derive_seed(seed, step, _COMPOSE))
        images, labels, provenance = build_training_set(loop, generation, pool, history, cfg, rng, phase=phase)
        # Set only after a step whose model the next one fine-tunes (see _continued), else None.
        model = backend.fit(images, labels, seed=derive_seed(seed, step, _FIT), generation=step, init=previous_model)
        samples = None
        if phase == "loop":
            samples = _as_samples(
                backend.sample(model, cfg.samples_per_generation, psi=cfg.psi, seed=derive_seed(seed, step, _SAMPLE)),
                cfg.samples_per_generation,
            )
        evaluation = _as_samples(
            backend.sample(model, cfg.eval_samples, psi=cfg.psi, seed=derive_seed(seed, step, _EVAL)), cfg.eval_samples
        )
        metrics = backend.evaluate(model, evaluation.images, evaluation.labels, generation=step)
        result = GenerationResult(
            loop=loop,
            seed=seed,
            generation=generation,
            phase=phase,
            n_real=int(provenance["real"]),
            n_synthetic=int(provenance["synthetic"]),
            metrics={str(k): float(v) for k, v in metrics.items()},
            seconds=time.perf_counter() - start,
        )
        if state is not None:
            if keep:
                state.save_model(backend, model, phase, generation)
            state.save(result, samples)
        previous_model = model if keep else None
        if samples is not None:
            history.append(samples)
        results.append(result)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(result.metrics.items()))
        logger.info(
            "%s seed %d: %s generation %d (%d real, %d synthetic): %s (%.1f s)",
            loop,
            seed,
            phase,
            generation,
            result.n_real,
            result.n_synthetic,
            shown,
            result.seconds,
        )
        if on_generation is not None:
            on_generation(result)
        if sample_grid is not None:
            sample_grid(result, evaluation.images)
    return results


def run_study(
    make_backend: Callable[[str, int], GenerativeBackend],
    real_train: Array,
    real_labels: Array | None,
    cfg: CollapseConfig,
    *,
    on_generation: Callable[[GenerationResult], None] | None = None,
    sample_grid: SampleGrid | None = None,
    state_dir: Path | None = None,
) -> list[GenerationResult]:
    """:func:`run_loop` for every loop and seed of ``cfg``; ``make_backend(loop, seed)`` builds each run's backend."""
    results: list[GenerationResult] = []
    for loop in cfg.loops:
        for seed in cfg.seeds:
            results += run_loop(
                loop,
                seed,
                make_backend(loop, seed),
                real_train,
                real_labels,
                cfg,
                on_generation=on_generation,
                sample_grid=sample_grid,
                state_dir=state_dir,
            )
    return results


# ------------------------------------------------------------------- summary
def summarise(results: Iterable[GenerationResult]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of every metric, per loop, phase and generation.

    Returns ``{"metrics": [names], "rows": [{"loop", "phase", "generation",
    "n_seeds", "seeds", "n_real", "n_synthetic", "mean": {metric: value},
    "std": {metric: value}}, ...]}``, rows by loop (first-seen order), phase
    (loop, then healing) and generation. ``std`` is the sample standard
    deviation (ddof 1), 0 for a single seed; a metric missing for some seeds is
    averaged over the seeds that have it; ``n_real``/``n_synthetic`` are means.
    """
    groups: dict[tuple[str, str, int], list[GenerationResult]] = {}
    seen: set[tuple[str, str, int, int]] = set()
    loop_order: dict[str, int] = {}
    for r in results:
        key = (r.loop, r.phase, r.generation, r.seed)
        if key in seen:
            raise ValueError(f"two results for loop {r.loop!r}, seed {r.seed}, {r.phase} generation {r.generation}")
        seen.add(key)
        loop_order.setdefault(r.loop, len(loop_order))
        groups.setdefault((r.loop, r.phase, r.generation), []).append(r)
    phase_order = {"loop": 0, "healing": 1}
    names = sorted({k for group in groups.values() for r in group for k in r.metrics})
    rows = []
    for (loop, phase, generation), group in sorted(
        groups.items(), key=lambda kv: (loop_order[kv[0][0]], phase_order[kv[0][1]], kv[0][2])
    ):
        mean: dict[str, float] = {}
        std: dict[str, float] = {}
        for name in names:
            values = np.array([r.metrics[name] for r in group if name in r.metrics], dtype=np.float64)
            if values.size == 0:
                continue
            mean[name] = float(values.mean())
            std[name] = float(values.std(ddof=1)) if values.size > 1 else 0.0
        rows.append(
            {
                "loop": loop,
                "phase": phase,
                "generation": generation,
                "n_seeds": len(group),
                "seeds": sorted(r.seed for r in group),
                "n_real": float(np.mean([r.n_real for r in group])),
                "n_synthetic": float(np.mean([r.n_synthetic for r in group])),
                "mean": mean,
                "std": std,
            }
        )
    return {"metrics": names, "rows": rows}


def relative_change(summary: dict[str, Any], metric: str) -> dict[str, float]:
    """Per loop: (last loop generation's mean - generation 0's mean) / |generation 0's mean| of ``metric``.

    -0.9 means the metric fell to a tenth of its generation-0 value; the sign
    is the direction of the change also for a negative generation-0 mean (a
    log-likelihood, say). A zero generation-0 mean gives 0 when the last is
    zero too, else +-inf. Loops without ``metric`` at both generations are left out.
    """
    first: dict[str, float] = {}
    last: dict[str, tuple[int, float]] = {}
    for row in summary["rows"]:
        if row["phase"] != "loop" or metric not in row["mean"]:
            continue
        value = float(row["mean"][metric])
        if row["generation"] == 0:
            first[row["loop"]] = value
        if row["loop"] not in last or row["generation"] > last[row["loop"]][0]:
            last[row["loop"]] = (row["generation"], value)
    change: dict[str, float] = {}
    for loop, base in first.items():
        end = last[loop][1]
        if base == 0.0:
            change[loop] = 0.0 if end == 0.0 else math.copysign(math.inf, end)
        else:
            change[loop] = (end - base) / abs(base)
    return change


# ----------------------------------------------------------------- toy model
@dataclass(frozen=True)
class GaussianModel:
    """A multivariate Gaussian over flattened images: covariance = ``factor.T @ factor``."""

    mean: Array  # (D,) float64
    factor: Array  # (r, D) float64, r = min(n fitted, D)
    shape: tuple[int, ...]  # (C, H, W) of one image

    @property
    def total_variance(self) -> float:
        """Trace of the covariance: the summed variance of every pixel."""
        return float(np.sum(self.factor**2))

    @property
    def covariance(self) -> Array:
        return self.factor.T @ self.factor


class GaussianBackend:
    """The analytic toy model of model collapse: a Gaussian fitted by maximum likelihood.

    ``fit`` estimates the mean and the MLE covariance (divided by N) of the
    flattened images; ``sample`` draws ``mean + psi * deviation`` (truncation
    scales the deviations, so the variance by ``psi**2``). Fitted to its own
    ``M`` samples, the Gaussian's expected total variance shrinks by a factor
    ``(M - 1) / M`` per generation, and the variance itself tends to 0 almost
    surely (Shumailov et al. 2024): collapse. Labels are ignored (samples are
    unlabelled). Samples are not clipped to [0, 1] unless ``clip``.

    ``evaluate`` returns ``total_variance`` (trace of the fitted covariance),
    ``sample_variance`` (trace of the covariance of the evaluated samples: the
    diversity actually produced, psi included) and, with a held-out real
    ``reference`` set, ``mean_shift`` (Euclidean distance of the fitted mean
    from the reference mean, pixel units) and ``heldout_nll`` (the negative mean
    log-likelihood of the reference images in nats per image, under the fitted
    Gaussian with ``ridge`` added to every variance so that a rank-deficient
    fit still has a density).
    """

    def __init__(self, reference: Array | None = None, *, ridge: float = 1e-4, clip: bool = False) -> None:
        if ridge <= 0.0:
            raise ValueError(f"ridge must be > 0, got {ridge}")
        self.ridge = ridge  # variance added to every dimension for the density, pixel units squared
        self.clip = clip  # clip samples to [0, 1] like images (this biases the variance)
        self.reference = None if reference is None else np.asarray(reference, np.float64).reshape(len(reference), -1)

    def fit(
        self, images: Array, labels: Array | None, *, seed: int, generation: int, init: GaussianModel | None = None
    ) -> GaussianModel:
        # ``init`` is not used: a maximum-likelihood fit has no state to continue from, so fine-tuning
        # the Gaussian on real data is refitting it.
        x = np.asarray(images, np.float64).reshape(len(images), -1)
        n, d = x.shape
        if n < 1:
            raise ValueError("cannot fit a Gaussian to no samples")
        mean = x.mean(axis=0)
        factor = (x - mean) / math.sqrt(n)  # factor.T @ factor is the MLE covariance
        if n > d:
            # A (D, D) square root instead: sampling then costs O(D) per sample, not O(N).
            eigenvalues, vectors = np.linalg.eigh(factor.T @ factor)
            factor = (vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))).T
        return GaussianModel(mean, factor, tuple(int(s) for s in images.shape[1:]))

    def sample(self, model: GaussianModel, n: int, *, psi: float, seed: int) -> tuple[Array, None]:
        rng = np.random.default_rng(seed)
        z = rng.standard_normal((n, model.factor.shape[0]))
        x = model.mean + psi * (z @ model.factor)
        if self.clip:
            x = np.clip(x, 0.0, 1.0)
        return x.reshape(n, *model.shape).astype(np.float32), None

    def save_model(self, model: GaussianModel, path: Path) -> None:
        with open(path, "wb") as fh:  # a file object: np.savez would append ".npz" to a path
            np.savez(fh, mean=model.mean, factor=model.factor, shape=np.asarray(model.shape))

    def load_model(self, path: Path) -> GaussianModel:
        with np.load(path, allow_pickle=False) as z:
            return GaussianModel(z["mean"], z["factor"], tuple(int(s) for s in z["shape"]))

    def evaluate(
        self, model: GaussianModel, samples: Array, sample_labels: Array | None, *, generation: int
    ) -> dict[str, float]:
        flat = np.asarray(samples, np.float64).reshape(len(samples), -1)
        metrics = {
            "total_variance": model.total_variance,
            "sample_variance": float(flat.var(axis=0).sum()),
        }
        if self.reference is not None:
            metrics["mean_shift"] = float(np.linalg.norm(model.mean - self.reference.mean(axis=0)))
            metrics["heldout_nll"] = -float(self.log_likelihood(model, self.reference).mean())
        return metrics

    def log_likelihood(self, model: GaussianModel, x: Array) -> Array:
        """Log-density (nats) of each row of ``x`` (N, ...) under the model's Gaussian plus ``ridge`` * I."""
        from scipy.linalg import cholesky, solve_triangular

        flat = np.asarray(x, np.float64).reshape(len(x), -1)
        d = flat.shape[1]
        cov = model.covariance + self.ridge * np.eye(d)
        lower = cholesky(cov, lower=True)
        z = solve_triangular(lower, (flat - model.mean).T, lower=True)
        log_det = 2.0 * np.sum(np.log(np.diag(lower)))
        return -0.5 * (np.sum(z**2, axis=0) + log_det + d * math.log(2 * math.pi))


# ---------------------------------------------------------------- the pattern
#: Metrics the verdict reads and whether higher is better for each.
PATTERN_METRICS: dict[str, bool] = {
    "precision": True,
    "recall": True,
    "coverage": True,
    "frechet_distance": False,
    "heldout_neg_elbo": False,  # VAEs only: the held-out real data's negative ELBO, nats per image
}
#: Largest relative change *for the worse* from generation 0 to N that still counts as "near generation 0".
#: Precision, recall and coverage are shares in [0, 1]: a 10 % relative loss is a visible step. The Fréchet
#: distance is a squared distance, noisier at a few thousand samples, and doubles for modest shifts: 25 %.
#: The held-out negative ELBO is a mean log-likelihood in nats, which moves little: 5 %.
PATTERN_TOLERANCE: dict[str, float] = {
    "precision": 0.10,
    "recall": 0.10,
    "coverage": 0.10,
    "frechet_distance": 0.25,
    "heldout_neg_elbo": 0.05,
}
#: A share in [0, 1] below this at generation 0 is not judged: the relative change of a value near
#: zero (e.g. the recall of an under-trained model, 0.01) is noise, not a trend.
RELIABLE_FROM: dict[str, float] = {"precision": 0.05, "recall": 0.05, "coverage": 0.05}
#: Fewest judged metrics for a loop's status to be known.
MIN_JUDGED = 3
#: Loops the literature expects to collapse, and loops it expects to stay near generation 0
#: (Shumailov et al. 2024; Gerstgrasser et al. 2024; Alemohammad et al. 2023).
COLLAPSING_LOOPS: tuple[str, ...] = ("replace",)
STABLE_LOOPS: tuple[str, ...] = ("accumulate", "fresh")

_METRIC_NAMES = {
    "frechet_distance": "Fréchet distance",
    "precision": "precision",
    "recall": "recall",
    "coverage": "class coverage",
    "entropy_normalised": "normalised label entropy",
    "entropy": "label entropy (nats)",
    "label_accuracy": "label accuracy",
    "heldout_neg_elbo": "held-out negative ELBO (nats)",
}


def _generation_zero(summary: dict[str, Any], loop: str) -> dict[str, float]:
    """The mean over seeds of every metric of ``loop`` at generation 0."""
    for row in summary["rows"]:
        if row["loop"] == loop and row["phase"] == "loop" and row["generation"] == 0:
            return dict(row["mean"])
    return {}


def _worse(metric: str, change: float) -> float:
    """How much worse (> 0) or better (< 0) a relative change is for ``metric``."""
    return -change if PATTERN_METRICS[metric] else change


def _percent(change: float) -> str:
    return f"{100 * change:+.0f} %" if math.isfinite(change) else ("+inf" if change > 0 else "-inf")


def collapse_pattern(summary: dict[str, Any], tolerance: dict[str, float] | None = None) -> dict[str, Any]:
    """An automatic verdict: did quality/diversity fall under ``replace`` and hold under ``accumulate``/``fresh``?

    For every loop and each metric of :data:`PATTERN_METRICS` it has, the
    relative change of the mean over seeds from generation 0 to the last loop
    generation (:func:`relative_change`). A metric is *judged* unless it is a
    share whose generation-0 value is below ``RELIABLE_FROM`` (a relative
    change of a near-zero value is noise). A judged metric *fell* when the
    change is worse than its tolerance (``PATTERN_TOLERANCE``: a relative loss
    of more than 10 % of precision, recall or coverage, a rise of more than
    25 % of the Fréchet distance or 5 % of the held-out negative ELBO); changes
    for the better never count against a loop. A loop has *degraded* when at
    least half of its judged metrics fell (one noisy metric does not decide),
    *held* otherwise, provided at least ``MIN_JUDGED`` metrics were judged and
    there was a generation after 0; else its status is unknown. The pattern
    is observed (``observed`` True) when replace degraded and every stable loop
    that ran (accumulate, fresh) held; not observed (False) as soon as one of
    them went the other way; else it cannot be judged (None: replace or both
    stable loops not run, or a status unknown). No significance test: with few
    seeds, read it beside the shaded seed spread of the figures. ``augment``
    is reported but not judged (the literature expects it to slow collapse
    down, not necessarily to stop it).

    Returns ``{"observed": bool | None, "verdict": sentence, "tolerance":
    {metric: t}, "loops": {loop: {"status": "degraded" | "held" | "unknown",
    "changes": {metric: change or None}, "fell": [metrics]}}}``.
    """
    tolerance = {**PATTERN_TOLERANCE, **(tolerance or {})}
    changes = {metric: relative_change(summary, metric) for metric in PATTERN_METRICS}
    loops = list(dict.fromkeys(row["loop"] for row in summary["rows"]))
    last = {row["loop"]: row["generation"] for row in summary["rows"] if row["phase"] == "loop"}
    per_loop: dict[str, dict[str, Any]] = {}
    for loop in loops:
        loop_changes = {m: changes[m].get(loop) for m in PATTERN_METRICS}
        start = _generation_zero(summary, loop)
        known = {
            m: c
            for m, c in loop_changes.items()
            if c is not None and not math.isnan(c) and start.get(m, 0.0) >= RELIABLE_FROM.get(m, -math.inf)
        }
        fell = [m for m, c in known.items() if _worse(m, c) > tolerance[m]]
        if len(known) < MIN_JUDGED or last.get(loop, 0) == 0:
            status = "unknown"
        elif 2 * len(fell) >= len(known):
            status = "degraded"
        else:
            status = "held"
        per_loop[loop] = {
            "status": status,
            "changes": {m: (c if c is not None and math.isfinite(c) else None) for m, c in loop_changes.items()},
            "fell": fell,
            "judged": sorted(known),
            "last_generation": last.get(loop),
        }

    def described(loop: str) -> str:
        info = per_loop[loop]
        items = [f"{_METRIC_NAMES[m]} {_percent(changes[m][loop])}" for m in info["judged"]]
        fell = f"; {len(info['fell'])} of {len(info['judged'])} fell" if info["judged"] else ""
        return f"{loop} ({', '.join(items)} from generation 0 to {info['last_generation']}{fell})"

    rule = (
        "a metric counts as fallen when it is worse than at generation 0 by more than "
        + ", ".join(f"{100 * tolerance[m]:.0f} % ({_METRIC_NAMES[m]})" for m in PATTERN_METRICS)
        + "; a loop degraded when at least half of its judged metrics fell (shares below "
        + f"{min(RELIABLE_FROM.values()):g} at generation 0 are not judged); means over seeds"
    )
    collapsing = [loop for loop in COLLAPSING_LOOPS if loop in per_loop]
    stable = [loop for loop in STABLE_LOOPS if loop in per_loop]
    expected = {**{loop: "degraded" for loop in collapsing}, **{loop: "held" for loop in stable}}
    contrary = [loop for loop, want in expected.items() if per_loop[loop]["status"] not in (want, "unknown")]
    unknown = [loop for loop in expected if per_loop[loop]["status"] == "unknown"]
    observed: bool | None
    if contrary:
        observed = False
        parts = [
            f"under {described(loop)} "
            + ("quality/diversity did not fall" if loop in collapsing else "quality/diversity fell")
            for loop in contrary
        ]
        verdict = "Collapse pattern not observed: " + "; ".join(parts) + "."
    elif not collapsing or not stable or unknown:
        observed = None
        if not collapsing or not stable:
            missing = [*COLLAPSING_LOOPS] if not collapsing else []
            missing += [] if stable else [" or ".join(STABLE_LOOPS)]
            why = f"not run: {', '.join(missing)}"
        else:
            why = f"metrics missing, or no generation after 0, for {', '.join(unknown)}"
        verdict = f"The collapse pattern cannot be judged ({why})."
    else:
        observed = True
        verdict = (
            f"Collapse pattern observed: quality/diversity fell under {'; '.join(described(x) for x in collapsing)}, "
            f"and stayed near generation 0 under {'; '.join(described(x) for x in stable)}."
        )
    return {
        "observed": observed,
        "verdict": f"{verdict} Rule: {rule}.",
        "tolerance": {m: tolerance[m] for m in PATTERN_METRICS},
        "reliable_from": dict(RELIABLE_FROM),
        "loops": per_loop,
    }


# ------------------------------------------------------------------ the study
METRICS_FIGURE = "metric_{metric}.png"
LOOP_GRID_FIGURE = "samples_{loop}.png"
GRIDS_FOLDER = "grids"
_LOOP_COLOURS = {"replace": "tab:red", "accumulate": "tab:blue", "augment": "tab:orange", "fresh": "tab:green"}


@dataclass(frozen=True)
class _Study:
    """Everything a collapse study runs on, loaded once."""

    real: Array  # (P, C, H, W) float32 in [0, 1]: the real pool (the train split)
    labels: Array  # (P,) int64
    backends: Any  # collapse_backends.StudyBackends
    spectrogram: bool
    grid_images: int


def _selection(given: Sequence[Any] | None, configured: Sequence[Any], what: str) -> tuple[Any, ...]:
    if given is None:
        return tuple(configured)
    chosen = tuple(dict.fromkeys(given))
    unknown = [v for v in chosen if v not in configured]
    if unknown or not chosen:
        raise ValueError(
            f"collapse {what} {list(chosen)}: each must be one of collapse.{what} {list(configured)} in params.yaml"
        )
    return tuple(v for v in configured if v in chosen)  # in the configured order


def _load_study(params: Any, dataset: str, paths: Any) -> _Study:
    from latentlab.collapse_backends import study_backends
    from latentlab.data.store import load_manifest, load_split

    if params.train.threads:
        import torch

        torch.set_num_threads(params.train.threads)
    folder = paths.processed(dataset)
    manifest = load_manifest(folder)
    train, test = load_split(folder, "train"), load_split(folder, "test")
    backends = study_backends(params, dataset, paths, test.unit_float(), len(manifest.class_names))
    return _Study(
        real=train.unit_float(),
        labels=np.asarray(train.y, np.int64),
        backends=backends,
        spectrogram=manifest.modality == "spectrogram",
        grid_images=2 * params.evaluate.grid_size,
    )


def _grid_path(state: _State, phase: Phase, generation: int) -> Path:
    return state.folder / f"grid-{state._stem(phase, generation)}.npz"


def _run_pairs(
    params: Any,
    study: _Study,
    loops: Sequence[str],
    seeds: Sequence[int],
    on_generation: Callable[[GenerationResult], None] | None,
) -> list[GenerationResult]:
    cfg = params.collapse
    results: list[GenerationResult] = []
    for loop in loops:
        for seed in seeds:
            state = _State(study.backends.state_dir, loop, seed, cfg, study.real, study.labels)

            def save_grid(result: GenerationResult, images: Array, state: _State = state) -> None:
                # Kept with the saved generation, so that a later call that only loads it can draw it.
                with atomic_path(_grid_path(state, result.phase, result.generation)) as tmp:
                    np.savez(tmp, images=np.asarray(images[: study.grid_images], np.float32))

            results += run_loop(
                loop,
                seed,
                study.backends.make(loop, seed),
                study.real,
                study.labels,
                cfg,
                on_generation=on_generation,
                sample_grid=save_grid,
                state_dir=study.backends.state_dir,
            )
    return results


def run_collapse_pairs(
    params: Any,
    dataset: str,
    paths: Any,
    *,
    loops: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    on_generation: Callable[[GenerationResult], None] | None = None,
) -> list[GenerationResult]:
    """Run (or load) the (loop, seed) pairs of ``loops`` x ``seeds`` (default: all of ``params.collapse``).

    Writes only the state folder (every finished generation, its samples and
    its sample-grid images): safe to call for disjoint pairs from parallel
    processes or threads. :func:`run_collapse` then finds them finished.
    """
    cfg = params.collapse
    loops = _selection(loops, cfg.loops, "loops")
    seeds = _selection(seeds, cfg.seeds, "seeds")
    return _run_pairs(params, _load_study(params, dataset, paths), loops, seeds, on_generation)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _x(row: dict[str, Any], generations: int) -> int:
    """Position on the generation axis: loop generation g at g, healing generation h at N + h."""
    return int(row["generation"]) + (generations if row["phase"] == "healing" else 0)


def save_metric_plot(summary: dict[str, Any], metric: str, path: Path, *, generations: int, title: str = "") -> Path:
    """``metric`` against generation, one line per loop type (mean over seeds, shaded +- std).

    Healing generations (real data only, after generation N) continue each line
    dashed, right of a dotted vertical line.
    """
    from latentlab.plots import _pyplot, save_figure

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    loops = list(dict.fromkeys(row["loop"] for row in summary["rows"]))
    healing = False
    for i, loop in enumerate(loops):
        colour = _LOOP_COLOURS.get(loop, f"C{i}")
        rows = [r for r in summary["rows"] if r["loop"] == loop and metric in r["mean"]]
        for phase in ("loop", "healing"):
            part = [r for r in rows if r["phase"] == phase]
            if phase == "healing" and part:
                healing = True
                # Start the dashed healing line at the last loop generation.
                part = [r for r in rows if r["phase"] == "loop" and r["generation"] == generations] + part
            if not part:
                continue
            x = np.array([_x(r, generations) for r in part], dtype=float)
            mean = np.array([r["mean"][metric] for r in part])
            std = np.array([r["std"].get(metric, 0.0) for r in part])
            ax.plot(
                x,
                mean,
                color=colour,
                linestyle="-" if phase == "loop" else "--",
                marker="o" if phase == "loop" else "s",
                markersize=4,
                label=loop if phase == "loop" else None,
            )
            ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.15, linewidth=0)
    if healing:
        n_healing = max(int(r["generation"]) for r in summary["rows"] if r["phase"] == "healing")
        ticks = list(range(generations + n_healing + 1))
        ax.set_xticks(ticks, [str(t) if t <= generations else f"heal {t - generations}" for t in ticks])
        ax.axvline(generations + 0.5, color="0.4", linestyle=":", linewidth=1)
        ax.text(
            generations + 0.55,
            0.98,
            "healing (real data)",
            transform=ax.get_xaxis_transform(),
            fontsize=7,
            va="top",
            color="0.3",
        )
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("generation")
    ax.set_ylabel(_METRIC_NAMES.get(metric, metric))
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, title="loop (mean ± std over seeds)", title_fontsize=7)
    return save_figure(fig, path)


def _grid_images(state: _State, result: GenerationResult, n: int) -> Array | None:
    """The images of one generation's sample grid: saved by the grid hook, else its saved samples."""
    path = _grid_path(state, result.phase, result.generation)
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            return z["images"][:n]
    loaded = state.load(result.phase, result.generation)
    if loaded is not None and loaded[1] is not None:
        return loaded[1].images[:n]
    return None


def _row_label(result: GenerationResult) -> str:
    return f"g{result.generation}" if result.phase == "loop" else f"heal {result.generation}"


def _write_figures(
    params: Any,
    dataset: str,
    study: _Study,
    summary: dict[str, Any],
    results: list[GenerationResult],
    loops: Sequence[str],
    seeds: Sequence[int],
    figures: Path,
) -> dict[str, Any]:
    from latentlab.plots import save_image_grid, save_tiles

    cfg = params.collapse
    title = f"{dataset}: {cfg.model}"
    listing: dict[str, Any] = {"metrics": {}, "loop_grids": {}, "generation_grids": {}}
    for metric in summary["metrics"]:
        name = METRICS_FIGURE.format(metric=metric)
        save_metric_plot(summary, metric, figures / name, generations=cfg.generations, title=title)
        listing["metrics"][metric] = name
    first_seed = seeds[0]
    (figures / GRIDS_FOLDER).mkdir(exist_ok=True)
    for loop in loops:
        state = _State(study.backends.state_dir, loop, first_seed, cfg, study.real, study.labels)
        rows, labels, names = [], [], []
        for result in [r for r in results if r.loop == loop and r.seed == first_seed]:
            images = _grid_images(state, result, study.grid_images)
            if images is None:
                continue
            tag = f"g{result.generation:02d}" if result.phase == "loop" else f"heal{result.generation:02d}"
            name = f"{GRIDS_FOLDER}/{loop}_{tag}.png"
            half = max(1, len(images) // 2)
            save_tiles(
                [images[:half], images[half:]] if len(images) > 1 else [images],
                figures / name,
                spectrogram=study.spectrogram,
            )
            names.append(name)
            rows.append(images[: params.evaluate.grid_size])
            labels.append(_row_label(result))
        listing["generation_grids"][loop] = names
        if rows:
            name = LOOP_GRID_FIGURE.format(loop=loop)
            save_image_grid(
                rows,
                labels,
                figures / name,
                title=f"{title}, {loop} loop, seed {first_seed}",
                spectrogram=study.spectrogram,
            )
            listing["loop_grids"][loop] = name
    return listing


def run_collapse(
    params: Any,
    dataset: str,
    paths: Any,
    *,
    loops: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    on_generation: Callable[[GenerationResult], None] | None = None,
) -> tuple[dict[str, Any], Path, Path]:
    """The model-collapse study of ``dataset``: run (or load) every pair, summarise, write figures.

    ``params``: :class:`~latentlab.config.Params`; ``paths``:
    :class:`~latentlab.paths.ProjectPaths`. The real pool is the processed
    train split, the quality reference and the held-out likelihood set fixed
    subsets of the test split; the backend is the zoo entry
    ``collapse.model`` (:mod:`latentlab.collapse_backends`), scored by the
    domain classifier at ``paths.classifier(dataset)``. ``loops`` / ``seeds``
    (default: all of ``params.collapse``) choose the pairs: only those are run,
    and only those summarised. Finished generations are saved under
    ``paths.collapse_state(dataset)`` (one folder per backend configuration),
    so a rerun, or a call after :func:`run_collapse_pairs`, loads them and fits
    nothing. ``on_generation(result)`` is called after each generation computed
    (not loaded) by this call.

    Writes, each atomically: ``paths.study_metrics("collapse", dataset)``
    (JSON: ``summary`` (:func:`summarise`), ``relative_change`` {metric:
    {loop: change}} (None where infinite), ``results`` (every
    :class:`GenerationResult` as a dict), ``pattern`` (:func:`collapse_pattern`),
    ``settings``); ``paths.study_table("collapse", dataset)`` (CSV, a row per
    loop x phase x generation x metric with the mean and std over seeds); and
    the figures folder ``paths.study_report("collapse", dataset)``: one PNG per
    metric against generation, a sample grid per loop (rows: generations, first
    seed) and per generation (``grids/``), and ``summary.json`` listing them.
    Returns (metrics, metrics file, figures folder).
    """
    from latentlab.atomic import atomic_dir
    from latentlab.evaluate import write_csv

    cfg = params.collapse
    loops = _selection(loops, cfg.loops, "loops")
    seeds = _selection(seeds, cfg.seeds, "seeds")
    study = _load_study(params, dataset, paths)
    results = _run_pairs(params, study, loops, seeds, on_generation)
    summary = summarise(results)
    changes = {metric: relative_change(summary, metric) for metric in summary["metrics"]}
    pattern = collapse_pattern(summary)
    settings = {
        "dataset": dataset,
        **cfg.model_dump(mode="json"),
        **study.backends.settings,  # after the config: the resolved latent size replaces a null one
        "loops": list(loops),
        "seeds": list(seeds),
        "n_real_pool": len(study.real),
        "real_floor": study.backends.real_floor(study.real, params.generate.quality.seed),
        "device": str(study.backends.context.device),
        "state_dir": str(study.backends.state_dir),
    }
    metrics: dict[str, Any] = {
        "summary": summary,
        "relative_change": {m: {loop: _finite(c) for loop, c in per.items()} for m, per in changes.items()},
        "results": [r.to_dict() for r in results],
        "pattern": pattern,
        "settings": settings,
    }
    figures_dir = paths.study_report("collapse", dataset)
    with atomic_dir(figures_dir) as figures:
        listing = _write_figures(params, dataset, study, summary, results, loops, seeds, figures)
        write_json(figures / "summary.json", {"dataset": dataset, "verdict": pattern["verdict"], **listing})
    table = [
        {
            "loop": row["loop"],
            "phase": row["phase"],
            "generation": row["generation"],
            "x": _x(row, cfg.generations),
            "metric": metric,
            "mean": row["mean"][metric],
            "std": row["std"][metric],
            "n_seeds": row["n_seeds"],
        }
        for row in summary["rows"]
        for metric in summary["metrics"]
        if metric in row["mean"]
    ]
    write_csv(paths.study_table("collapse", dataset), table)
    metrics_path = paths.study_metrics("collapse", dataset)
    write_json(metrics_path, metrics)
    logger.info("%s: %s", dataset, pattern["verdict"])
    return metrics, metrics_path, figures_dir


# ------------------------------------------------------------------- report
def _percent_or_inf(value: float | None) -> str:
    return "inf" if value is None else f"{100 * value:+.1f} %"


def _metric_order(names: Iterable[str]) -> list[str]:
    """The verdict's metrics first, then the others as named in ``_METRIC_NAMES``, then the rest."""
    preferred = [*PATTERN_METRICS, *_METRIC_NAMES]
    names = list(dict.fromkeys(names))
    return sorted(names, key=lambda n: (preferred.index(n) if n in preferred else len(preferred), n))


def _healing_phrase(settings: dict[str, Any]) -> str:
    """ "2 healing (finetune)" from a study's settings; studies run before ``healing_start`` healed fresh."""
    count = int(settings.get("healing_generations", 0) or 0)
    if count == 0:
        return "no healing"
    return f"{count} healing ({settings.get('healing_start', 'fresh')})"


def collapse_report_section(params: Any, paths: Any) -> str:
    """HTML fragment for ``reports/index.html``: the collapse study of every dataset of ``collapse.datasets``.

    Per dataset: the settings, the verdict, the metric figures, the sample
    grids per loop and a table of relative changes; a short line when the study
    has not run. Image paths are relative to ``paths.reports``.
    """
    import html
    import os

    def rel(p: Path) -> str:
        return Path(os.path.relpath(p, paths.reports)).as_posix()

    esc = html.escape
    out = ['<h2 id="collapse">Model collapse</h2>']
    datasets = params.collapse.datasets
    if not datasets:
        return out[0] + '\n<p class="muted">collapse.datasets is empty: the study was not run.</p>\n'
    out.append(
        '<p class="muted">Each generation trains a fresh generative model; generation 0 on real data, later ones '
        "on a mix set by the loop type: <i>replace</i> on the previous generation's samples only, <i>accumulate</i> "
        "on the real data plus every earlier generation's samples, <i>augment</i> on a fixed real subset plus a "
        "share of the previous samples, <i>fresh</i> on new real data plus a share of the previous samples. "
        "Quality and diversity are measured in the domain classifier's feature space against held-out real test "
        "images. Healing generations train on the fixed real subset only: with <i>finetune</i> each continues "
        "training the previous generation's model, as Bohacek and Farid (2023) retrain a collapsed model on real "
        "data (they report that it does not fully heal); with <i>fresh</i> each trains a new model, a control that "
        "does not depend on the loop before it.</p>"
    )
    for dataset in datasets:
        metrics_path = paths.study_metrics("collapse", dataset)
        figures = paths.study_report("collapse", dataset)
        if not metrics_path.exists():
            out.append(f'<h3>{esc(dataset)}</h3>\n<p class="muted">Collapse study not run on {esc(dataset)}.</p>')
            continue
        data = json.loads(metrics_path.read_text(encoding="utf-8"))
        listing_path = figures / "summary.json"
        listing = json.loads(listing_path.read_text(encoding="utf-8")) if listing_path.exists() else {}
        s = data.get("settings", {})
        pattern = data.get("pattern", {})
        observed = pattern.get("observed")
        css = {True: "ok", False: "fail"}.get(observed, "muted")
        latent = f", latent size {s['latent_size']}" if s.get("latent_size") else ""
        out.append(f"<h3>{esc(dataset)}</h3>")
        out.append(
            "<p>"
            + esc(
                f"Model {s.get('model')} ({s.get('family')}{latent}); loops {', '.join(s.get('loops', []))}; "
                f"seeds {', '.join(str(x) for x in s.get('seeds', []))}; {s.get('generations')} generations after "
                f"generation 0, {_healing_phrase(s)}; real_size {s.get('real_size')}, "
                f"{s.get('samples_per_generation')} samples per generation, synthetic fraction "
                f"{s.get('synthetic_fraction')}, psi {s.get('psi')}; metrics on {s.get('eval_samples')} samples "
                f"against {s.get('n_reference')} real test images."
            )
            + "</p>"
        )
        out.append(f'<p class="{css}">{esc(str(pattern.get("verdict", "no verdict")))}</p>')
        floor = s.get("real_floor")
        if floor:
            shown = ", ".join(f"{_METRIC_NAMES.get(k, k)} {floor[k] + 0.0:.4g}" for k in _metric_order(floor))
            out.append(
                f'<p class="muted">Real data against the same reference (the best attainable): {esc(shown)}.</p>'
            )
        changes = data.get("relative_change", {})
        names = _metric_order(changes)
        # The JSON is written with sorted keys: the loops' order is that of the settings.
        loops = [loop for loop in s.get("loops", []) if any(loop in changes[m] for m in names)]
        if names and loops:
            head = "".join(f"<th>{esc(_METRIC_NAMES.get(m, m))}</th>" for m in names)
            rows = []
            for loop in loops:
                status = pattern.get("loops", {}).get(loop, {}).get("status", "")
                cells = "".join(
                    f"<td>{_percent_or_inf(changes[m][loop])}</td>" if loop in changes[m] else "<td></td>"
                    for m in names
                )
                rows.append(f'<tr><td class="l">{esc(loop)}</td><td class="l">{esc(status)}</td>{cells}</tr>')
            out.append(
                '<p class="muted">Relative change of the mean over seeds from generation 0 to the last loop '
                "generation.</p>"
                f'<table><tr><th class="l">loop</th><th class="l">verdict</th>{head}</tr>{"".join(rows)}</table>'
            )
        plots = listing.get("metrics", {})
        for metric in _metric_order(plots):
            name = plots[metric]
            if (figures / name).exists():
                out.append(f'<img src="{esc(rel(figures / name))}" alt="{esc(metric)} against generation">')
        loop_grids = listing.get("loop_grids", {})
        grids = [
            (x, loop_grids[x]) for x in s.get("loops", []) if x in loop_grids and (figures / loop_grids[x]).exists()
        ]
        if grids:
            out.append("<h4>Samples per generation</h4>")
            out.append('<div class="maps">')
            for loop, name in grids:
                out.append(
                    f'<figure style="display:inline-block;margin:.3rem"><img src="{esc(rel(figures / name))}" '
                    f'alt="samples of the {esc(loop)} loop" style="max-width:22rem">'
                    f"<figcaption>{esc(loop)}</figcaption></figure>"
                )
            out.append("</div>")
    return "\n".join(out) + "\n"
