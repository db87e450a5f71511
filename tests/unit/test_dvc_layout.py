"""The DVC pipeline, read by DVC itself from every dvc.yaml, agrees with src/latentlab/paths.py,
and each stage lives in the dvc.yaml (and its entry in the dvc.lock) the README names."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from latentlab.paths import ProjectPaths
from tests.conftest import DVC_FILES

REPO = Path(__file__).resolve().parents[2]


def expected_outs(name: str) -> set[str]:
    """Every output (outs, metrics, plots) of stage ``name``, as ProjectPaths places it."""
    p = ProjectPaths(Path("."))
    group, _, item = name.partition("@")
    dataset, _, model = item.partition("-")
    paths = {
        "ingest": lambda: [p.processed(dataset)],
        "validate": lambda: [p.validation_report(dataset)],
        "corrupt": lambda: [p.corrupted(dataset)],
        "train": lambda: [p.model(dataset, model)],
        "evaluate": lambda: [
            p.evaluation_report(dataset, model),
            p.metrics(dataset, model),
            p.reconstruction_curve(dataset, model),
        ],
        "compare": lambda: [p.study_report("compare", dataset), p.study_metrics("compare", dataset)],
        "anomaly": lambda: [
            p.study_report("anomaly", dataset),
            p.study_metrics("anomaly", dataset),
            p.study_table("anomaly", dataset),
        ],
        "sparsity": lambda: [p.study_report("sparsity", dataset), p.study_metrics("sparsity", dataset)],
        "classifier": lambda: [p.classifier(dataset), p.study_metrics("classifier", dataset)],
        "generate": lambda: [
            p.generative_model(dataset, model),
            p.generative_report(dataset, model),
            p.generative_metrics(dataset, model),
        ],
        "collapse": lambda: [p.study_report("collapse", dataset), p.study_metrics("collapse", dataset)],
        "report": lambda: [p.report_index],
    }[group]()
    return {path.as_posix() for path in paths}


@pytest.fixture(scope="module")
def stages():
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        return list(repo.index.stages)


def test_every_dvc_yaml_agrees_with_project_paths(stages):
    assert {s.name.partition("@")[0] for s in stages} == set(DVC_FILES)
    for stage in stages:
        assert stage.dvcfile.relpath == DVC_FILES[stage.name.partition("@")[0]], stage.addressing
        # Every stage runs in the repository root, so its paths and params read as in the root dvc.yaml.
        assert Path(stage.wdir) == REPO, stage.addressing
        assert {o.def_path for o in stage.params} == {"params.yaml"}, stage.addressing
        assert {o.def_path for o in stage.outs} == expected_outs(stage.name), stage.addressing


def test_each_dvc_lock_holds_the_stages_of_its_own_dvc_yaml():
    for dvc_yaml in sorted(set(DVC_FILES.values())):
        lock = REPO / Path(dvc_yaml).with_name("dvc.lock")
        entries = yaml.safe_load(lock.read_text())["stages"]
        assert entries, lock
        assert {DVC_FILES[name.partition("@")[0]] for name in entries} == {dvc_yaml}, lock
