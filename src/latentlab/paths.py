"""Every path the pipeline reads or writes, defined once.

Data flows one way: raw -> processed -> corrupted -> models -> metrics -> reports.
``dvc.yaml`` spells the same layout for DVC; a test checks that the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProjectPaths:
    """The layout of a latentlab project rooted at ``root`` (the folder of dvc.yaml)."""

    root: Path = Path(".")

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def raw(self) -> Path:
        """Downloads and synthesized raw data (the FSDD zip, espeak-ng WAVs, torchvision files)."""
        return self.root / "data" / "raw"

    def raw_dataset(self, dataset: str) -> Path:
        return self.raw / dataset

    def processed(self, dataset: str) -> Path:
        """Folder with ``{split}.npz`` per split and ``manifest.json``."""
        return self.root / "data" / "processed" / dataset

    def corrupted(self, dataset: str) -> Path:
        """Folder with one ``{corruption}.npz`` per corruption and level, and ``manifest.json``."""
        return self.root / "data" / "corrupted" / dataset

    def model(self, dataset: str, family: str) -> Path:
        """Folder with the trained model of ``family`` on ``dataset``."""
        return self.root / "models" / dataset / family

    def checkpoint(self, dataset: str, model: str, latent_size: int) -> Path:
        """Resumable training state (not a DVC output: DVC deletes outputs before a stage reruns)."""
        return self.root / "checkpoints" / dataset / model / f"k{latent_size}.pt"

    def anomaly_checkpoint(self, dataset: str, label: int) -> Path:
        """Resumable training state of the one-class model of class ``label`` (anomaly stage)."""
        return self.root / "checkpoints" / dataset / "anomaly" / f"class{label}.pt"

    def sparsity_checkpoint(self, dataset: str, rho: float, beta: float) -> Path:
        """Resumable training state of one setting of the sparse-autoencoder sweep."""
        return self.root / "checkpoints" / dataset / "sparsity" / f"rho{rho:g}_beta{beta:g}.pt"

    def classifier(self, dataset: str) -> Path:
        """Folder with the domain classifier of ``dataset`` (``classifier.pt``), used by the quality metrics."""
        # Not under models/{dataset}/: the compare stage depends on that whole folder.
        return self.root / "models" / "classifier" / dataset

    def classifier_checkpoint(self, dataset: str) -> Path:
        return self.root / "checkpoints" / dataset / "classifier.pt"

    def generative_model(self, dataset: str, model: str) -> Path:
        """Folder with the trained generative model ``model`` (a key of generate.zoo) on ``dataset``."""
        return self.root / "models" / "generate" / dataset / model

    def generative_checkpoint(self, dataset: str, model: str, tag: str) -> Path:
        """Resumable training state of one network of ``model`` (``tag`` e.g. ``k16`` or ``gan``)."""
        return self.root / "checkpoints" / dataset / "generate" / model / f"{tag}.pt"

    def generative_metrics(self, dataset: str, model: str) -> Path:
        """Metrics JSON of a generative model (a DVC metrics file)."""
        return self.root / "metrics" / "generate" / dataset / f"{model}.json"

    def generative_report(self, dataset: str, model: str) -> Path:
        """Figures of a generative model: sample grids, interpolations, manifold, quality curves."""
        return self.reports / "generate" / dataset / model

    def collapse_state(self, dataset: str) -> Path:
        """Finished generations of the collapse study (results and samples), so a rerun resumes."""
        return self.root / "checkpoints" / dataset / "collapse"

    def metrics(self, dataset: str, family: str) -> Path:
        """Metrics JSON of ``family`` on ``dataset`` (a DVC metrics file)."""
        return self.root / "metrics" / dataset / f"{family}.json"

    def reconstruction_curve(self, dataset: str, family: str) -> Path:
        """CSV of test reconstruction error against latent size (a DVC plot)."""
        return self.root / "metrics" / dataset / f"{family}_reconstruction.csv"

    def study_metrics(self, study: str, dataset: str) -> Path:
        """Metrics JSON of a cross-model study (compare, anomaly, sparsity) on ``dataset``.

        Kept apart from ``metrics/{dataset}/`` because a study reads that folder.
        """
        return self.root / "metrics" / study / f"{dataset}.json"

    def study_table(self, study: str, dataset: str) -> Path:
        """CSV table of a study (a DVC plot)."""
        return self.root / "metrics" / study / f"{dataset}.csv"

    def study_report(self, study: str, dataset: str) -> Path:
        """Figures and summary of a study on ``dataset``."""
        return self.root / "reports" / study / dataset

    def sweep_state(self, dataset: str, model: str) -> Path:
        """Per-point state of the sweep of ``model`` on ``dataset``: one folder per point id, holding
        the resumable ``checkpoint.pt``, the best weights ``model.pt`` and the finished ``result.json``.

        Under checkpoints/ (not versioned): the sweep is a Prefect flow, not a DVC stage.
        """
        return self.root / "checkpoints" / dataset / "sweep" / model

    def sweep_point(self, dataset: str, model: str, point_id: str) -> Path:
        return self.sweep_state(dataset, model) / point_id

    def sweep_report(self, dataset: str, model: str) -> Path:
        """The sweep's results table (JSON and CSV) and figure.

        Not under metrics/: the report stage depends on that whole folder, so a
        sweep writing there would make DVC rerun the report.
        """
        return self.reports / "sweep" / f"{dataset}-{model}"

    def sweep_metrics(self, dataset: str, model: str) -> Path:
        """The sweep's results, one row per point (JSON)."""
        return self.sweep_report(dataset, model) / "results.json"

    def sweep_table(self, dataset: str, model: str) -> Path:
        """The same rows as CSV."""
        return self.sweep_report(dataset, model) / "results.csv"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def validation_report(self, dataset: str) -> Path:
        """Folder with the Great Expectations results and data docs of ``dataset``."""
        return self.reports / "validation" / dataset

    def evaluation_report(self, dataset: str, family: str) -> Path:
        """Folder with the figures and tables of ``family`` on ``dataset``."""
        return self.reports / "evaluation" / dataset / family

    @property
    def report_index(self) -> Path:
        return self.reports / "index.html"

    @property
    def mlruns(self) -> Path:
        return self.root / "mlruns"
