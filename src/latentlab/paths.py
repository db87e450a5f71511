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

    def metrics(self, dataset: str, family: str) -> Path:
        """Metrics JSON of ``family`` on ``dataset`` (a DVC metrics file)."""
        return self.root / "metrics" / dataset / f"{family}.json"

    def reconstruction_curve(self, dataset: str, family: str) -> Path:
        """CSV of test reconstruction error against latent size (a DVC plot)."""
        return self.root / "metrics" / dataset / f"{family}_reconstruction.csv"

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
