"""Model-collapse loops: training-set composition, healing, truncation, the Gaussian theory, resuming, summaries.

The composition tests run a tracing backend whose labels tell every sample's
origin: real samples keep their pool index (>= 0); a sample drawn from
generation k's model is labelled ``-(k + 1) * TAG - i`` (< 0).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from latentlab.collapse import (
    CollapseConfig,
    GaussianBackend,
    GenerationResult,
    Samples,
    build_training_set,
    fresh_real_rows,
    relative_change,
    run_loop,
    summarise,
)
from latentlab.errors import DataError

TAG = 100_000
POOL = 60


def _pool(n: int = POOL) -> tuple[np.ndarray, np.ndarray]:
    """(n, 1, 1, 2) float32 points in [0, 1] and labels = their index."""
    rng = np.random.default_rng(7)
    return rng.uniform(0.2, 0.8, size=(n, 1, 1, 2)).astype(np.float32), np.arange(n)


def _synthetic(generation: int, n: int) -> Samples:
    return Samples(np.full((n, 1, 1, 2), 0.5, np.float32), -(generation + 1) * TAG - np.arange(n))


def _origin(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(real pool indices, generation of every synthetic sample)."""
    real = labels[labels >= 0]
    synthetic = (-labels[labels < 0]) // TAG - 1
    return real, synthetic


class TracingBackend:
    """Records every fit's labels; samples carry the generation that drew them; counts fits."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.fits: list[tuple[int, np.ndarray]] = []  # (generation, labels)
        self.inits: list[int | None] = []  # the step of the model each fit started from (None: fresh)
        self.fail_at = fail_at

    def fit(self, images, labels, *, seed, generation, init=None):
        if generation == self.fail_at:
            raise RuntimeError(f"killed at generation {generation}")
        assert images.dtype == np.float32 and images.shape[1:] == (1, 1, 2)
        self.fits.append((generation, labels.copy()))
        self.inits.append(None if init is None else init["generation"])
        return {"generation": generation, "mean": float(images.mean())}

    def save_model(self, model, path):
        path.write_text(json.dumps(model))

    def load_model(self, path):
        return json.loads(path.read_text())

    def sample(self, model, n, *, psi, seed):
        return _synthetic(model["generation"], n)

    def evaluate(self, model, samples, sample_labels, *, generation):
        return {"train_mean": model["mean"], "generation": float(generation)}


def _cfg(**overrides: Any) -> CollapseConfig:
    base = dict(
        loops=("replace", "accumulate", "augment", "fresh"),
        generations=4,
        seeds=(0,),
        samples_per_generation=8,
        real_size=10,
        synthetic_fraction=0.5,
        eval_samples=4,
    )
    return CollapseConfig(**{**base, **overrides})


def _compose(loop: str, generations: int, cfg: CollapseConfig) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """Training labels and provenance of generations 0..generations, with synthetic history of 8 per generation."""
    images, labels = _pool()
    history = [_synthetic(k, cfg.samples_per_generation) for k in range(generations)]
    rng = np.random.default_rng(0)
    out = []
    for g in range(generations + 1):
        x, y, prov = build_training_set(loop, g, (images, labels), history[:g], cfg, rng)
        assert len(x) == len(y) == prov["real"] + prov["synthetic"]
        out.append((y, prov))
    return out


# ---------------------------------------------------------------- composition
def test_generation_zero_is_the_same_real_subset_for_every_loop():
    cfg = _cfg()
    firsts = [_compose(loop, 0, cfg)[0] for loop in cfg.loops]
    for y, prov in firsts:
        assert prov == {"real": 10, "synthetic": 0, "synthetic_generations": []}
        np.testing.assert_array_equal(y, np.arange(10))


def test_replace_trains_on_the_previous_generation_only():
    for g, (y, prov) in enumerate(_compose("replace", 4, _cfg())):
        if g == 0:
            continue
        real, synthetic = _origin(y)
        assert real.size == 0 and prov["real"] == 0 and prov["synthetic"] == 8
        assert set(synthetic.tolist()) == {g - 1}


def test_accumulate_keeps_all_real_and_grows_by_samples_per_generation():
    sets = _compose("accumulate", 4, _cfg())
    for g, (y, prov) in enumerate(sets):
        real, synthetic = _origin(y)
        np.testing.assert_array_equal(np.sort(real), np.arange(10))
        assert prov["real"] == 10 and prov["synthetic"] == 8 * g
        assert np.bincount(synthetic, minlength=g).tolist() == [8] * g
    assert [len(y) for y, _ in sets] == [10, 18, 26, 34, 42]


@pytest.mark.parametrize(("fraction", "expected"), [(0.5, 5), (0.3, 3), (0.8, 8), (0.0, 0)])
def test_augment_has_a_fixed_real_subset_and_round_f_real_synthetic(fraction, expected):
    for g, (y, prov) in enumerate(_compose("augment", 4, _cfg(synthetic_fraction=fraction))):
        real, synthetic = _origin(y)
        np.testing.assert_array_equal(np.sort(real), np.arange(10))
        assert prov["real"] == 10
        if g:
            assert prov["synthetic"] == expected == synthetic.size
            assert set(synthetic.tolist()) <= {g - 1}
            # A subset without repeats.
            assert len(set(y[y < 0].tolist())) == expected


def test_fresh_draws_disjoint_real_samples_while_the_pool_allows():
    sets = _compose("fresh", 5, _cfg())  # 6 generations x 10 real = the whole pool of 60
    seen: set[int] = set()
    for g, (y, prov) in enumerate(sets):
        real, synthetic = _origin(y)
        assert prov["real"] == real.size == 10 and len(set(real.tolist())) == 10
        assert seen.isdisjoint(real.tolist()), f"generation {g} reuses real samples"
        seen |= set(real.tolist())
        assert synthetic.size == (5 if g else 0) and set(synthetic.tolist()) <= {g - 1}
    assert seen == set(range(POOL))


def test_fresh_wraps_round_an_exhausted_pool_least_recently_used_first():
    rows = [fresh_real_rows(g, 25, 10) for g in range(4)]
    assert rows[1].tolist() == list(range(10, 20))
    assert rows[2].tolist() == [20, 21, 22, 23, 24, 0, 1, 2, 3, 4]
    assert rows[3].tolist() == list(range(5, 15))


def test_labels_are_dropped_when_a_part_is_unlabelled():
    images, labels = _pool()
    history = [Samples(np.zeros((8, 1, 1, 2), np.float32), None)]
    x, y, prov = build_training_set("augment", 1, (images, labels), history, _cfg(), np.random.default_rng(0))
    assert y is None and len(x) == 15 and x.dtype == np.float32


def test_build_training_set_rejects_unknown_loops_and_missing_history():
    images, labels = _pool()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown loop"):
        build_training_set("recycle", 1, (images, labels), [], _cfg(), rng)
    with pytest.raises(ValueError, match="generation 0"):
        build_training_set("replace", 1, (images, labels), [], _cfg(), rng)


def test_config_validates_loop_names_and_sizes():
    with pytest.raises(ValidationError, match="loops"):
        _cfg(loops=("replace", "recycle"))
    with pytest.raises(ValidationError, match="extra"):
        _cfg(generation=3)
    with pytest.raises(ValidationError, match="more than the 8 drawn"):
        _cfg(synthetic_fraction=1.0)  # 10 synthetic > 8 drawn
    assert _cfg(loops=("replace",), synthetic_fraction=1.0).synthetic_count == 10


# ------------------------------------------------------------------ run_loop
@pytest.mark.parametrize("loop", ["replace", "accumulate", "augment", "fresh"])
def test_run_loop_fits_the_composed_sets_then_heals_on_real_data_only(loop):
    images, labels = _pool()
    cfg = _cfg(generations=3, healing_generations=2)
    backend = TracingBackend()
    seen: list[GenerationResult] = []
    results = run_loop(loop, 0, backend, images, labels, cfg, on_generation=seen.append)

    assert seen == results
    assert [(r.phase, r.generation) for r in results] == [("loop", g) for g in range(4)] + [
        ("healing", 1),
        ("healing", 2),
    ]
    assert [generation for generation, _ in backend.fits] == [0, 1, 2, 3, 4, 5]  # healing h fits as step N + h
    fixed = backend.fits[0][1]
    assert np.all(fixed >= 0) and len(fixed) == 10
    for r, (_, y) in zip(results, backend.fits, strict=True):
        real, synthetic = _origin(y)
        assert (r.n_real, r.n_synthetic) == (real.size, synthetic.size)
        if r.phase == "healing":
            # Real data only: the generation-0 real set.
            assert synthetic.size == 0
            np.testing.assert_array_equal(y, fixed)
    expected_synthetic = {"replace": 8, "accumulate": 24, "augment": 5, "fresh": 5}[loop]
    assert results[3].n_synthetic == expected_synthetic


@pytest.mark.parametrize("start", ["finetune", "fresh"])
def test_healing_continues_from_the_previous_model_or_starts_fresh(start):
    images, labels = _pool()
    cfg = _cfg(generations=3, healing_generations=2, healing_start=start)
    backend = TracingBackend()
    run_loop("replace", 0, backend, images, labels, cfg)
    # Loop generations always start fresh; healing 1 (step 4) fine-tunes generation 3, healing 2 healing 1.
    expected = [None, None, None, None, 3, 4] if start == "finetune" else [None] * 6
    assert backend.inits == expected


def test_healing_start_must_be_known():
    with pytest.raises(ValidationError, match="healing_start"):
        _cfg(healing_start="warm")


def test_run_loop_rejects_integer_images():
    images, labels = _pool()
    with pytest.raises(DataError, match="float"):
        run_loop("replace", 0, TracingBackend(), (images * 255).astype(np.uint8), labels, _cfg())


# ------------------------------------------------------------ Gaussian model
def test_gaussian_fit_is_the_mle_and_psi_scales_the_deviations():
    rng = np.random.default_rng(3)
    x = (0.5 + 0.1 * rng.standard_normal((50, 1, 2, 2))).astype(np.float32)
    backend = GaussianBackend(reference=x)
    model = backend.fit(x, None, seed=0, generation=0)
    flat = x.reshape(50, -1).astype(np.float64)
    np.testing.assert_allclose(model.covariance, np.cov(flat.T, bias=True), atol=1e-9)
    assert model.total_variance == pytest.approx(flat.var(axis=0).sum())

    full, _ = backend.sample(model, 500, psi=1.0, seed=11)
    half, _ = backend.sample(model, 500, psi=0.5, seed=11)
    assert full.shape == (500, 1, 2, 2) and full.dtype == np.float32
    np.testing.assert_allclose(
        half - model.mean.reshape(1, 1, 2, 2), 0.5 * (full - model.mean.reshape(1, 1, 2, 2)), atol=1e-6
    )
    m_full = backend.evaluate(model, full, None, generation=0)
    m_half = backend.evaluate(model, half, None, generation=0)
    assert m_half["sample_variance"] == pytest.approx(0.25 * m_full["sample_variance"], rel=1e-4)
    assert m_half["sample_variance"] < 0.3 * m_full["sample_variance"]
    # Fitted to its own data, the mean is exact and the held-out NLL is finite.
    assert m_full["mean_shift"] == pytest.approx(0.0, abs=1e-6)
    assert np.isfinite(m_full["heldout_nll"])


def test_gaussian_nll_matches_scipy_and_grows_when_the_fit_collapses():
    from scipy.stats import multivariate_normal

    rng = np.random.default_rng(4)
    x = (0.5 + 0.1 * rng.standard_normal((200, 1, 1, 3))).astype(np.float32)
    backend = GaussianBackend(reference=x[:100], ridge=1e-4)
    model = backend.fit(x[100:], None, seed=0, generation=0)  # n > D: the (D, D) square root
    ref = x[:100].reshape(100, -1).astype(np.float64)
    expected = multivariate_normal(model.mean, model.covariance + 1e-4 * np.eye(3)).logpdf(ref)
    np.testing.assert_allclose(backend.log_likelihood(model, x[:100]), expected, rtol=1e-9)
    narrow = backend.fit(x[100:103], None, seed=0, generation=1)  # 3 points: a tiny covariance
    nll = backend.evaluate(model, x[:10], None, generation=0)["heldout_nll"]
    assert backend.evaluate(narrow, x[:10], None, generation=1)["heldout_nll"] > nll


def test_psi_below_one_makes_the_replace_loop_collapse_faster():
    images, _ = _pool()
    cfg = _cfg(generations=5, samples_per_generation=20, real_size=20, eval_samples=20)
    spread = {}
    for psi in (1.0, 0.7):
        results = run_loop("replace", 0, GaussianBackend(), images, None, cfg.model_copy(update={"psi": psi}))
        spread[psi] = results[-1].metrics["total_variance"] / results[0].metrics["total_variance"]
    # Truncation multiplies the variance by psi**2 every generation: 0.49**5 ~ 0.03 on top of the rest.
    assert spread[0.7] < 0.1 * spread[1.0]


def test_gaussian_theory_replace_collapses_accumulate_stays_near_the_real_variance():
    """Shumailov et al. 2024 (Gaussian case) and Gerstgrasser et al. 2024, on 2-D points.

    Replace, M = 20 samples, MLE refits: each generation multiplies the variance
    of a dimension by chi2(M-1)/M, so log(var_50 / var_0) has mean
    50 * E[log(chi2_19 / 20)] = 50 * -0.105 = -5.2 and sd ~ 0.32 * sqrt(50) = 2.3
    per seed; over 8 seeds the mean log ratio has sd ~ 0.8, so the geometric-mean
    ratio exp(-5.2) ~ 0.006 is far below the threshold 0.2 (exp(-1.6), > 4 sd
    away). Accumulate refits on 20 real + 20 g synthetic points, so the
    generation-g error shrinks like 1/g and the variance stays put: in 4000
    simulated seeds the per-seed log ratio had mean -0.05 and sd 0.21, so the
    8-seed geometric mean lies in [0.6, 1.5] with > 6 sd of margin.
    """
    rng = np.random.default_rng(123)
    pool = (0.5 + rng.standard_normal((400, 1, 1, 2)) * np.array([0.1, 0.05])).astype(np.float32)
    cfg = CollapseConfig(
        loops=("replace", "accumulate"),
        generations=50,
        seeds=tuple(range(8)),
        samples_per_generation=20,
        real_size=20,
        eval_samples=2,
    )
    ratio = {}
    for loop in cfg.loops:
        runs = [run_loop(loop, seed, GaussianBackend(), pool, None, cfg) for seed in cfg.seeds]
        logs = [np.log(r[-1].metrics["total_variance"] / r[0].metrics["total_variance"]) for r in runs]
        ratio[loop] = float(np.exp(np.mean(logs)))
    assert ratio["replace"] < 0.2
    assert 0.6 < ratio["accumulate"] < 1.5
    assert ratio["replace"] < 0.2 * ratio["accumulate"]


# ------------------------------------------------------------------- resuming
def _strip(results: list[GenerationResult]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.to_dict().items() if k != "seconds"} for r in results]


class CountingGaussian(GaussianBackend):
    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.fitted: list[int] = []
        self.inits: list[Any] = []  # the model each fit was given to start from
        self.models: list[Any] = []  # every model fitted, in order
        self.fail_at = fail_at

    def fit(self, images, labels, *, seed, generation, init=None):
        if generation == self.fail_at:
            raise RuntimeError("killed")
        self.fitted.append(generation)
        self.inits.append(init)
        self.models.append(super().fit(images, labels, seed=seed, generation=generation, init=init))
        return self.models[-1]


@pytest.mark.parametrize("loop", ["replace", "accumulate", "fresh"])
def test_rerun_with_more_generations_fits_only_the_new_ones(tmp_path, loop):
    images, labels = _pool()
    cfg = _cfg(generations=2, samples_per_generation=12, real_size=12)
    first = CountingGaussian()
    run_loop(loop, 1, first, images, labels, cfg, state_dir=tmp_path)
    assert first.fitted == [0, 1, 2]  # three generations

    longer = cfg.model_copy(update={"generations": 5})
    resumed, called = CountingGaussian(), []
    results = run_loop(loop, 1, resumed, images, labels, longer, state_dir=tmp_path, on_generation=called.append)
    assert resumed.fitted == [3, 4, 5]
    assert [r.generation for r in called] == [3, 4, 5]

    straight = run_loop(loop, 1, CountingGaussian(), images, labels, longer)
    assert _strip(results) == _strip(straight)


def test_a_killed_run_resumes_after_its_last_finished_generation(tmp_path):
    images, labels = _pool()
    cfg = _cfg(generations=5, healing_generations=1, samples_per_generation=12, real_size=12)
    with pytest.raises(RuntimeError, match="killed"):
        run_loop("accumulate", 2, CountingGaussian(fail_at=3), images, labels, cfg, state_dir=tmp_path)
    resumed = CountingGaussian()
    results = run_loop("accumulate", 2, resumed, images, labels, cfg, state_dir=tmp_path)
    assert resumed.fitted == [3, 4, 5, 6]
    assert _strip(results) == _strip(run_loop("accumulate", 2, CountingGaussian(), images, labels, cfg))
    # Nothing half-written, and a third run fits nothing.
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    again = CountingGaussian()
    assert _strip(run_loop("accumulate", 2, again, images, labels, cfg, state_dir=tmp_path)) == _strip(results)
    assert again.fitted == []


def _same_gaussian(a, b) -> bool:
    return bool(np.array_equal(a.mean, b.mean) and np.array_equal(a.factor, b.factor) and a.shape == b.shape)


def test_a_run_killed_while_healing_fine_tunes_the_saved_model(tmp_path):
    images, labels = _pool()
    cfg = _cfg(generations=2, healing_generations=2, samples_per_generation=12, real_size=12)
    straight = CountingGaussian()
    expected = run_loop("augment", 0, straight, images, labels, cfg)
    with pytest.raises(RuntimeError, match="killed"):
        run_loop("augment", 0, CountingGaussian(fail_at=4), images, labels, cfg, state_dir=tmp_path)
    # Only the models a later step starts from are kept: generation N and healing 1 (not healing 2).
    kept = sorted(p.name for p in tmp_path.rglob("*.model"))
    assert kept == ["after-g0002-finetune-h0001.model", "g0002.model"]

    resumed = CountingGaussian()
    results = run_loop("augment", 0, resumed, images, labels, cfg, state_dir=tmp_path)
    assert resumed.fitted == [4]
    # Healing 2 started from healing 1's model as read back from disk, identical to the one fitted.
    assert _same_gaussian(resumed.inits[0], straight.models[3])
    assert _strip(results) == _strip(expected)


def test_a_generation_whose_model_was_not_kept_is_refitted_when_a_later_step_needs_it(tmp_path):
    images, labels = _pool()
    cfg = _cfg(generations=2, healing_generations=1, samples_per_generation=12, real_size=12)
    fitted = CountingGaussian()
    first = run_loop("replace", 0, fitted, images, labels, cfg, state_dir=tmp_path)
    # Two healing generations now: healing 1's model is needed but was not kept (it was the last).
    more = cfg.model_copy(update={"healing_generations": 2})
    resumed = CountingGaussian()
    results = run_loop("replace", 0, resumed, images, labels, more, state_dir=tmp_path)
    assert resumed.fitted == [3, 4]  # healing 1 refitted from generation 2's saved model, then healing 2
    assert _same_gaussian(resumed.inits[0], fitted.models[2])
    assert _same_gaussian(resumed.inits[1], resumed.models[0])
    assert _strip(results[:4]) == _strip(first)
    # A state without generation N's model (written before fine-tuning existed) refits generation N too.
    for path in tmp_path.rglob("*.model"):
        path.unlink()
    again = CountingGaussian()
    assert _strip(run_loop("replace", 0, again, images, labels, more, state_dir=tmp_path)) == _strip(results)
    assert again.fitted == [2, 3, 4]


def test_fresh_healing_keeps_no_model_and_its_own_state(tmp_path):
    images, labels = _pool()
    cfg = _cfg(generations=2, healing_generations=1, healing_start="fresh", samples_per_generation=12, real_size=12)
    run_loop("replace", 0, CountingGaussian(), images, labels, cfg, state_dir=tmp_path)
    assert not list(tmp_path.rglob("*.model"))
    assert [p.name for p in tmp_path.rglob("after-*.json")] == ["after-g0002-h0001.json"]
    # Fine-tuned healing is another result: it is computed, not read from the fresh one.
    finetune = CountingGaussian()
    run_loop(
        "replace", 0, finetune, images, labels, cfg.model_copy(update={"healing_start": "finetune"}), state_dir=tmp_path
    )
    assert finetune.fitted == [2, 3]  # generation 2 again, to keep its model; then the fine-tuned healing


def test_changed_settings_do_not_reuse_stale_state(tmp_path):
    images, labels = _pool()
    cfg = _cfg(generations=2)
    run_loop("replace", 0, CountingGaussian(), images, labels, cfg, state_dir=tmp_path)
    other = CountingGaussian()
    run_loop("replace", 0, other, images, labels, cfg.model_copy(update={"psi": 0.5}), state_dir=tmp_path)
    assert other.fitted == [0, 1, 2]
    moved = CountingGaussian()
    run_loop("replace", 0, moved, images + np.float32(0.01), labels, cfg, state_dir=tmp_path)
    assert moved.fitted == [0, 1, 2]


# ------------------------------------------------------------------- summary
def _result(loop: str, seed: int, generation: int, value: float, phase: str = "loop") -> GenerationResult:
    return GenerationResult(loop, seed, generation, phase, 10, 0, {"var": value, "nll": -value}, 0.1)  # type: ignore[arg-type]


def test_summarise_averages_over_seeds_and_relative_change_compares_with_generation_zero():
    results = [
        _result("replace", 0, 0, 1.0),
        _result("replace", 1, 0, 3.0),
        _result("replace", 0, 1, 0.5),
        _result("replace", 1, 1, 0.1),
        _result("accumulate", 0, 0, 2.0),
        _result("accumulate", 1, 0, 2.0),
        _result("accumulate", 0, 1, 2.5),
        _result("accumulate", 1, 1, 1.5),
        _result("accumulate", 0, 1, 9.0, phase="healing"),
    ]
    summary = summarise(reversed(results))
    json.dumps(summary)  # JSON-able
    assert summary["metrics"] == ["nll", "var"]
    keys = [(r["loop"], r["phase"], r["generation"]) for r in summary["rows"]]
    assert keys == [
        ("accumulate", "loop", 0),
        ("accumulate", "loop", 1),
        ("accumulate", "healing", 1),
        ("replace", "loop", 0),
        ("replace", "loop", 1),
    ]
    rows = {k: r for k, r in zip(keys, summary["rows"], strict=True)}
    first = rows[("replace", "loop", 0)]
    assert first["n_seeds"] == 2 and first["seeds"] == [0, 1]
    assert first["mean"]["var"] == pytest.approx(2.0) and first["std"]["var"] == pytest.approx(np.sqrt(2.0))
    assert rows[("replace", "loop", 1)]["mean"]["nll"] == pytest.approx(-0.3)
    assert rows[("accumulate", "loop", 0)]["std"]["var"] == 0.0
    healing = rows[("accumulate", "healing", 1)]
    assert healing["n_seeds"] == 1 and healing["std"]["var"] == 0.0 and healing["mean"]["var"] == 9.0

    change = relative_change(summary, "var")
    # Healing is not the last *loop* generation.
    assert change == {"accumulate": pytest.approx(0.0), "replace": pytest.approx(0.3 / 2.0 - 1.0)}
    # A negative generation-0 mean: the sign still tells the direction (nll rose from -2.0 to -0.3).
    assert relative_change(summary, "nll") == {"accumulate": pytest.approx(0.0), "replace": pytest.approx(0.85)}
    assert relative_change(summary, "missing") == {}


def test_summarise_rejects_duplicate_results():
    with pytest.raises(ValueError, match="two results"):
        summarise([_result("replace", 0, 0, 1.0), _result("replace", 0, 0, 2.0)])
