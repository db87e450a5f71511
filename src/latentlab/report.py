"""The ``report`` stage: ``reports/index.html``, the page a person reads.

It gathers what the other stages wrote (manifests, validation results,
corruption statistics, metrics and figures) and links to it with relative
paths, so the ``reports/`` folder can be copied or served as it is.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from latentlab.atomic import write_text
from latentlab.config import Params
from latentlab.data.store import load_manifest
from latentlab.paths import ProjectPaths

_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; color: #222; line-height: 1.45; padding: 0 1rem; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 3rem; border-bottom: 1px solid #bbb; } h3 { margin-top: 2rem; }
table { border-collapse: collapse; margin: .6rem 0 1.2rem; font-size: .88rem; }
th, td { border: 1px solid #ccc; padding: .2rem .55rem; text-align: right; }
th { background: #f1f1f1; } td.l, th.l { text-align: left; } tr.best td { font-weight: 700; }
.ok { color: #176f2c; font-weight: 600; } .fail { color: #b3261e; font-weight: 600; }
.note { background: #fff7e0; border-left: 4px solid #e0a800; padding: .4rem .8rem; }
img { max-width: 100%; border: 1px solid #ddd; margin: .3rem 0; }
.maps img { max-width: 32%; } nav a { margin-right: 1rem; } .muted { color: #666; font-size: .88rem; }
</style></head><body>
<h1>{{ title }}</h1>
<p>Datasets: <nav style="display:inline">{% for d in datasets %}<a href="#{{ d.name }}">{{ d.name }}</a>{% endfor %}{% if generative %} <a href="#generative">generative models</a>{% endif %}{% if collapse %} <a href="#collapse">model collapse</a>{% endif %}</nav></p>
<p>Every number and figure below comes from the pipeline's last run (<code>dvc repro</code> or the Prefect flow);
the MLflow UI holds every run's parameters, per-step losses and artifacts.
MSE is the mean squared error per pixel with values in [0, 1]; PSNR (dB) is the mean over images of 10·log10(1/MSE<sub>i</sub>);
SSIM is the mean structural similarity (Wang et al. 2004).</p>
{% for d in datasets %}
<h2 id="{{ d.name }}">{{ d.name }}</h2>
{% if d.missing %}<p class="fail">{{ d.missing }}</p>{% else %}
<h3>Data</h3>
<table>
<tr><th class="l">source</th><td class="l">{{ d.source.kind }} from <code>{{ d.source.location }}</code></td></tr>
<tr><th class="l">modality</th><td class="l">{{ d.modality }}, sample shape {{ d.shape }}</td></tr>
<tr><th class="l">samples</th><td class="l">{% for s, n in d.counts.items() %}{{ s }} {{ n }}{% if not loop.last %}, {% endif %}{% endfor %}</td></tr>
<tr><th class="l">classes</th><td class="l">{{ d.class_names|join(", ") }}</td></tr>
</table>
{% if d.source.synthetic %}<p class="note"><b>Synthetic data.</b> {{ d.source.note }}</p>{% endif %}
{% if d.source.subset %}<p class="note"><b>Subset.</b> {{ d.source.note }}</p>{% endif %}

<h3>Validation</h3>
{% if d.validation %}
<p>Great Expectations:
{% for split, ok in d.validation.items() %}{{ split }} <span class="{{ 'ok' if ok else 'fail' }}">{{ 'passed' if ok else 'FAILED' }}</span>{% if not loop.last %}, {% endif %}{% endfor %}.
<a href="{{ d.links.validation_summary }}">Expectation results</a> ·
<a href="{{ d.links.data_docs }}">Great Expectations data docs</a></p>
{% else %}<p class="fail">No validation results found.</p>{% endif %}

<h3>Corruptions</h3>
{% if d.corruptions %}
<table><tr><th class="l">corruption</th><th class="l">kind</th><th>level</th><th class="l">measured on test</th></tr>
{% for c in d.corruptions %}<tr><td class="l">{{ c.name }}</td><td class="l">{{ c.kind }}</td><td>{{ c.level }}</td><td class="l">{{ c.measured }}</td></tr>{% endfor %}
</table>
{% else %}<p>No corruptions.</p>{% endif %}

{% if d.compare %}
<h3>Reconstruction of clean test samples</h3>
<p class="muted">Test samples: {{ d.n_test }}. Bold: the lowest MSE at each latent size.</p>
<table><tr><th class="l">model</th><th class="l">family</th><th>latent size</th><th>MSE</th><th>PSNR</th><th>SSIM</th></tr>
{% for r in d.compare.reconstruction %}<tr class="{{ 'best' if r.best else '' }}"><td class="l">{{ r.model }}</td><td class="l">{{ r.family }}</td><td>{{ r.latent_size }}</td><td>{{ "%.5f"|format(r.mse) }}</td><td>{{ "%.2f"|format(r.psnr) }}</td><td>{{ "%.3f"|format(r.ssim) }}</td></tr>{% endfor %}
</table>
{% if d.compare.linear_vs_pca %}
<h4>Linear autoencoder against PCA</h4>
<p class="muted">A linear autoencoder trained on squared error spans the principal subspace at its optimum (Baldi &amp; Hornik 1989): its MSE approaches PCA's and the principal angles between its decoder's columns and the leading components approach 0°.</p>
<table><tr><th class="l">model</th><th>latent size</th><th>MSE</th><th>PCA MSE</th><th>ratio</th><th class="l">principal angles (°)</th></tr>
{% for r in d.compare.linear_vs_pca %}<tr><td class="l">{{ r.model }}</td><td>{{ r.latent_size }}</td><td>{{ "%.5f"|format(r.mse) }}</td><td>{{ "%.5f"|format(r.pca_mse) }}</td><td>{{ "%.3f"|format(r.mse_ratio) }}</td><td class="l">{{ r.principal_angles_deg|map("round", 1)|join(", ") }}</td></tr>{% endfor %}
</table>
{% endif %}
{% endif %}

{% for f in d.models %}
<h3>Model: {{ f.name }} <span class="muted">({{ f.family }}{% if f.denoise_from %}, denoising from {{ f.denoise_from }}{% endif %})</span></h3>
{% for img in f.images %}<img src="{{ img }}" alt="{{ img }}">{% endfor %}
{% if f.latent %}
<p>Latent space at k={{ f.latent.latent_size }}: k-means on the test codes against the labels, NMI {{ "%.3f"|format(f.latent.nmi) }}, ARI {{ "%.3f"|format(f.latent.ari) }}.
{% if f.pca3d %}<a href="{{ f.pca3d }}">Interactive 3-D view of the leading principal components</a>.{% endif %}</p>
<div class="maps">{% for img in f.maps %}<img src="{{ img }}" alt="{{ img }}">{% endfor %}</div>
{% endif %}
{% endfor %}

{% if d.compare and d.compare.get("denoising") %}
<h3>Denoising: noisy test samples restored</h3>
{% for name, methods in d.compare.denoising.items() %}
<h4>{{ name }}</h4>
<table><tr><th class="l">method</th><th>PSNR</th><th>SSIM</th>{% if name in d.compare.inpainting %}<th>PSNR inside the hidden region</th>{% endif %}</tr>
{% for method, s in methods.items() %}<tr><td class="l">{{ method }}</td><td>{{ "%.2f"|format(s.psnr) }}</td><td>{{ "%.3f"|format(s.ssim) }}</td>{% if name in d.compare.inpainting %}<td>{{ "%.2f"|format(d.compare.inpainting[name][method].psnr_in_region) }}</td>{% endif %}</tr>{% endfor %}
</table>
{% if d.restore_images[name] %}<img src="{{ d.restore_images[name] }}" alt="restorations of {{ name }}">{% endif %}
{% endfor %}
{% endif %}

{% if d.compare and d.compare.get("speech_cleaning") %}
<h3>Speech cleaning</h3>
<p class="muted">Spectral SNR (dB) between the clean and the estimated mel magnitude spectrograms, averaged over test clips. The Wiener filter (decision-directed) works on the waveform; its noise spectrum comes from each clip's quietest frames for white noise, and for babble, which is silent wherever the clip is, from a noise-only reference (the clip's added noise, averaged over time: an optimistic stationary baseline); its output is turned into the same log-mel spectrogram. Cleaned audio is rebuilt by Griffin-Lim.</p>
{% for name, r in d.compare.speech_cleaning.items() %}
<h4>{{ name }}</h4>
<table><tr><th class="l">method</th><th>SNR (dB)</th><th>gain over noisy (dB)</th><th>gain over Wiener (dB)</th></tr>
{% for method, v in r.snr_db.items() %}<tr><td class="l">{{ method }}</td><td>{{ "%.2f"|format(v) }}</td><td>{% if method in r.improvement_over_noisy_db %}{{ "%+.2f"|format(r.improvement_over_noisy_db[method]) }}{% endif %}</td><td>{% if method in r.improvement_over_wiener_db %}{{ "%+.2f"|format(r.improvement_over_wiener_db[method]) }}{% endif %}</td></tr>{% endfor %}
</table>
{% if d.audio.get(name) %}{{ d.audio[name]|safe }}{% endif %}
{% endfor %}
{% endif %}

{% if d.anomaly %}
<h3>One-class anomaly detection</h3>
<p>For each class, a {{ d.anomaly.model }} model (k={{ d.anomaly.latent_size }}) trained on that class alone scores every test sample by its {{ d.anomaly.get('score', 'reconstruction MSE') }}; the threshold is the {{ d.anomaly.threshold_percentile }}th percentile of the normal validation scores.
Mean AUROC <b>{{ "%.3f"|format(d.anomaly.mean_auroc) }}</b>, mean AUPRC <b>{{ "%.3f"|format(d.anomaly.mean_auprc) }}</b>.</p>
{% set terms = d.anomaly.get('latent_density') %}
{% if terms %}<p class="muted">The score sums two terms, each standardised on the class's normal validation images (Abati et al. 2019); the AUROC of each term alone is shown beside that of the sum.</p>{% endif %}
<table><tr><th class="l">normal class</th><th>AUROC</th>{% if terms %}<th>AUROC, reconstruction term</th><th>AUROC, latent term</th>{% endif %}<th>AUPRC</th><th>AUPRC at chance</th><th>threshold</th><th>precision</th><th>recall</th><th>F1</th></tr>
{% for c, r in d.anomaly.per_class.items() %}<tr><td class="l">{{ c }}</td><td>{{ "%.3f"|format(r.auroc) }}</td>{% if terms %}<td>{{ "%.3f"|format(r.auroc_reconstruction) }}</td><td>{{ "%.3f"|format(r.auroc_latent) }}</td>{% endif %}<td>{{ "%.3f"|format(r.auprc) }}</td><td>{{ "%.3f"|format(r.auprc_chance) }}</td><td>{{ "%.4g"|format(r.threshold) }}</td><td>{{ "%.3f"|format(r.precision) }}</td><td>{{ "%.3f"|format(r.recall) }}</td><td>{{ "%.3f"|format(r.f1) }}</td></tr>{% endfor %}
</table>
{% for img in d.anomaly_images %}<img src="{{ img }}" alt="{{ img }}">{% endfor %}
{% endif %}

{% if d.sparsity %}
<h3>Sparse autoencoder: code activations</h3>
<table><tr><th class="l">setting</th>{% for key in d.sparsity_columns %}<th>{{ key }}</th>{% endfor %}</tr>
{% for setting, r in d.sparsity.items() %}<tr><td class="l">{{ setting }}</td>{% for key in d.sparsity_columns %}<td>{{ "%.4g"|format(r[key]) }}</td>{% endfor %}</tr>{% endfor %}
</table>
{% for img in d.sparsity_images %}<img src="{{ img }}" alt="{{ img }}">{% endfor %}
{% endif %}
{% endif %}
{% endfor %}
{# Each fragment brings its own heading; the anchors are for the navigation line. #}
{% if generative %}<div id="generative"></div>
{{ generative|safe }}{% endif %}
{% if collapse %}<div id="collapse"></div>
{{ collapse|safe }}{% endif %}
</body></html>
"""


def _rel(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target, start)).as_posix()


def _validation_status(folder: Path) -> dict[str, bool]:
    path = folder / "results.json"
    if not path.exists():
        return {}
    results = json.loads(path.read_text(encoding="utf-8"))
    splits = results.get("splits", results)
    return {split: bool(r.get("success")) for split, r in splits.items() if isinstance(r, dict)}


def _measured(entry: dict[str, Any]) -> str:
    stats = entry.get("measured", {}).get("test") or entry.get("stats", {}).get("test") or {}
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items())


def _dataset_section(name: str, params: Params, paths: ProjectPaths) -> dict[str, Any]:
    reports = paths.reports
    try:
        manifest = load_manifest(paths.processed(name))
    except Exception as exc:  # a missing dataset is shown on the page, not fatal
        return {"name": name, "missing": f"not ingested: {exc}"}
    corrupted_manifest = paths.corrupted(name) / "manifest.json"
    corruptions = []
    if corrupted_manifest.exists():
        for entry in json.loads(corrupted_manifest.read_text(encoding="utf-8"))["corruptions"]:
            corruptions.append(
                {
                    "name": entry["name"],
                    "kind": entry.get("kind"),
                    "level": entry.get("level"),
                    "measured": _measured(entry),
                }
            )
    models = [_model_section(name, model, params, paths) for model in params.train.models]
    compare = _read_json(paths.study_metrics("compare", name))
    compare_dir = paths.study_report("compare", name)
    audio: dict[str, str] = {}
    restore_images: dict[str, str] = {}
    n_test = None
    if compare:
        _mark_best(compare["reconstruction"])
        for corruption in compare.get("denoising", {}):
            png = compare_dir / f"restore_{corruption}.png"
            restore_images[corruption] = _rel(png, reports) if png.exists() else ""
        from latentlab.audio_report import audio_table_html

        for corruption, result in compare.get("speech_cleaning", {}).items():
            examples = result.get("audio_examples")
            if examples:
                base = _rel(compare_dir / "audio", reports) + "/"
                audio[corruption] = f"<p>Cleaned by {html.escape(examples['cleaned_by'])}:</p>" + audio_table_html(
                    examples["rows"], base=base
                )
        n_test = next((m["n_test"] for m in models if m.get("n_test")), None)
    anomaly = _read_json(paths.study_metrics("anomaly", name))
    sparsity = _read_json(paths.study_metrics("sparsity", name))
    sparsity_rows = {k: v for k, v in (sparsity or {}).items() if isinstance(v, dict)}
    sparsity_columns = [k for k, v in next(iter(sparsity_rows.values()), {}).items() if isinstance(v, int | float)]
    validation_dir = paths.validation_report(name)
    return {
        "name": name,
        "missing": "",
        "source": manifest.source,
        "modality": manifest.modality,
        "shape": "x".join(str(s) for s in manifest.shape),
        "counts": manifest.counts,
        "class_names": manifest.class_names,
        "validation": _validation_status(validation_dir),
        "links": {
            "validation_summary": _rel(validation_dir / "summary.html", reports),
            "data_docs": _rel(validation_dir / "data_docs" / "index.html", reports),
        },
        "corruptions": corruptions,
        "models": [m for m in models if m],
        "compare": compare,
        "n_test": n_test,
        "restore_images": restore_images,
        "audio": audio,
        "anomaly": anomaly,
        "anomaly_images": _pngs(paths.study_report("anomaly", name), reports),
        "sparsity": sparsity_rows,
        "sparsity_columns": sparsity_columns,
        "sparsity_images": _pngs(paths.study_report("sparsity", name), reports),
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _pngs(folder: Path, reports: Path) -> list[str]:
    return [_rel(p, reports) for p in sorted(folder.glob("*.png"))] if folder.exists() else []


def _mark_best(rows: list[dict[str, Any]]) -> None:
    """Flag the lowest-MSE row of each latent size."""
    best: dict[int, dict[str, Any]] = {}
    for row in rows:
        if row["latent_size"] not in best or row["mse"] < best[row["latent_size"]]["mse"]:
            best[row["latent_size"]] = row
    for row in rows:
        row["best"] = best[row["latent_size"]] is row


def _model_section(dataset: str, model: str, params: Params, paths: ProjectPaths) -> dict[str, Any]:
    """Figures of one model's evaluation (empty when it has not been evaluated)."""
    figures = paths.evaluation_report(dataset, model)
    summary = _read_json(figures / "summary.json")
    if summary is None:
        return {}
    reports = paths.reports
    spec = params.train.spec(model)
    pngs = ("reconstruction.png", "mse_vs_latent.png", "denoising.png")
    return {
        "name": model,
        "family": spec.family,
        "denoise_from": " + ".join(summary.get("denoise_from") or []),
        "n_test": summary.get("n_test"),
        "images": [_rel(figures / f, reports) for f in pngs if (figures / f).exists()],
        "latent": summary.get("latent"),
        "maps": [_rel(p, reports) for p in sorted(figures.glob("latent_*.png"))],
        "pca3d": _rel(figures / "latent_pca3d.html", reports) if (figures / "latent_pca3d.html").exists() else "",
    }


def build_report(params: Params, paths: ProjectPaths) -> Path:
    """Write ``reports/index.html`` and return its path."""
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    page = env.from_string(_TEMPLATE).render(
        title=params.report.title,
        datasets=[_dataset_section(name, params, paths) for name in params.pipeline.datasets],
        generative=_optional_section("latentlab.generative", "generative_report_section", params, paths)
        if params.generate.datasets
        else "",
        collapse=_optional_section("latentlab.collapse", "collapse_report_section", params, paths)
        if params.collapse.datasets
        else "",
    )
    write_text(paths.report_index, page)
    return paths.report_index


def _optional_section(module: str, function: str, params: Params, paths: ProjectPaths) -> str:
    """An HTML fragment written by a study module (its own tables and figures; links relative to reports/)."""
    import importlib

    return getattr(importlib.import_module(module), function)(params, paths)
