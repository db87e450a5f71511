"""The ``report`` stage: ``reports/index.html``, the page a person reads.

It gathers what the other stages wrote (manifests, validation results,
corruption statistics, metrics and figures) and links to it with relative
paths, so the ``reports/`` folder can be copied or served as it is.
"""

from __future__ import annotations

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
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 2.5rem; border-bottom: 1px solid #bbb; }
table { border-collapse: collapse; margin: .6rem 0 1.2rem; font-size: .9rem; }
th, td { border: 1px solid #ccc; padding: .25rem .6rem; text-align: right; }
th { background: #f1f1f1; } td.l, th.l { text-align: left; }
.ok { color: #176f2c; font-weight: 600; } .fail { color: #b3261e; font-weight: 600; }
.note { background: #fff7e0; border-left: 4px solid #e0a800; padding: .4rem .8rem; }
img { max-width: 100%; border: 1px solid #ddd; margin: .3rem 0; }
nav a { margin-right: 1rem; }
</style></head><body>
<h1>{{ title }}</h1>
<p>Datasets: <nav style="display:inline">{% for d in datasets %}<a href="#{{ d.name }}">{{ d.name }}</a>{% endfor %}</nav></p>
<p>Every figure below comes from the pipeline's last run (<code>dvc repro</code> or the Prefect flow);
the MLflow UI holds every run's parameters, metrics and artifacts.</p>
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

{% for f in d.families %}
<h3>{{ f.title }}</h3>
<table><tr><th>latent size</th><th>test MSE</th><th>test PSNR (dB)</th><th>explained variance</th></tr>
{% for row in f.reconstruction %}<tr><td>{{ row.k }}</td><td>{{ "%.5f"|format(row.mse) }}</td><td>{{ "%.2f"|format(row.psnr) }}</td><td>{{ "%.3f"|format(row.explained_variance_ratio) }}</td></tr>{% endfor %}
</table>
<p>Test samples: {{ f.n_test }}. MSE is the mean squared error per pixel with pixels in [0, 1]; PSNR is the mean over images of 10·log10(1/MSE<sub>i</sub>).</p>
{% for img in f.images %}<img src="{{ img }}" alt="{{ img }}">{% endfor %}
{% if f.denoising %}
<h4>Restoring corrupted test samples (PSNR, dB)</h4>
<table><tr><th class="l">corruption</th><th>noisy input</th>{% for k in f.sizes %}<th>PCA k={{ k }}</th>{% endfor %}</tr>
{% for name, s in f.denoising.items() %}<tr><td class="l">{{ name }}</td><td>{{ "%.2f"|format(s.noisy_psnr) }}</td>{% for k in f.sizes %}<td>{{ "%.2f"|format(s["pca%d_psnr"|format(k)]) }}</td>{% endfor %}</tr>{% endfor %}
</table>
{% for img in f.denoising_images %}<img src="{{ img }}" alt="{{ img }}">{% endfor %}
{% endif %}
{% endfor %}
{% endif %}
{% endfor %}
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
    families = []
    for family in params.train.models:
        summary_path = paths.evaluation_report(name, family) / "summary.json"
        if not summary_path.exists():
            continue
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        sizes = sorted(int(k) for k in summary["reconstruction"])
        figures = paths.evaluation_report(name, family)
        images = [figures / f for f in ("reconstruction.png", "mse_vs_latent.png") if (figures / f).exists()]
        denoising_images = [figures / "denoising.png"] if (figures / "denoising.png").exists() else []
        families.append(
            {
                "title": family.upper() if family == "pca" else family,
                "n_test": summary["n_test"],
                "sizes": sizes,
                "reconstruction": [{"k": k, **summary["reconstruction"][str(k)]} for k in sizes],
                "denoising": summary.get("denoising", {}),
                "images": [_rel(p, reports) for p in images],
                "denoising_images": [_rel(p, reports) for p in denoising_images],
            }
        )
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
        "families": families,
    }


def build_report(params: Params, paths: ProjectPaths) -> Path:
    """Write ``reports/index.html`` and return its path."""
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    html = env.from_string(_TEMPLATE).render(
        title=params.report.title,
        datasets=[_dataset_section(name, params, paths) for name in params.pipeline.datasets],
    )
    write_text(paths.report_index, html)
    return paths.report_index
