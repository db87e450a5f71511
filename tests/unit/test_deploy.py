"""Prefect deployments: schedules parse and fire when they should; the deployments carry the settings."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml

from latentlab.config import parse_params
from latentlab.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _params(**schedule):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["schedule"].update(schedule)
    return parse_params(raw)


def test_weekly_schedule_fires_on_sundays_at_two():
    from latentlab.deploy import next_runs

    start = dt.datetime(2026, 11, 22, 0, 0, tzinfo=dt.UTC)  # a Sunday, before 02:00
    runs = next_runs("0 2 * * 0", "UTC", 3, start)
    assert runs == [dt.datetime(2026, 11, d, 2, 0, tzinfo=dt.UTC) for d in (22, 29)] + [
        dt.datetime(2026, 12, 6, 2, 0, tzinfo=dt.UTC)
    ]


def test_time_zone_of_the_schedule_is_honoured():
    from latentlab.deploy import next_runs

    start = dt.datetime(2026, 11, 22, 0, 0, tzinfo=dt.UTC)
    # 02:00 in Berlin is 01:00 UTC in winter (CET, UTC+1).
    first = next_runs("0 2 * * *", "Europe/Berlin", 1, start)[0]
    assert first.astimezone(dt.UTC) == dt.datetime(2026, 11, 22, 1, 0, tzinfo=dt.UTC)


def test_bad_cron_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"schedule\.pipeline\.cron"):
        _params(pipeline={"cron": "0 2 * *"})
    from latentlab.deploy import next_runs

    with pytest.raises(ValueError):
        next_runs("61 2 * * 0", "UTC", 1)


def test_deployments_carry_schedule_parameters_and_names(tmp_path: Path):
    from latentlab.deploy import COLLAPSE_DEPLOYMENT, PIPELINE_DEPLOYMENT, deployments

    params = _params(pipeline={"cron": "30 1 * * *", "set_params": ["train.device=cpu"]})
    pipeline, collapse = deployments(params, tmp_path)
    assert (pipeline.name, collapse.name) == (PIPELINE_DEPLOYMENT, COLLAPSE_DEPLOYMENT)
    assert pipeline.parameters == {"root": str(tmp_path), "targets": [], "set_params": ["train.device=cpu"]}
    assert collapse.parameters["targets"] == ["pipelines/generative/dvc.yaml:collapse"]
    assert pipeline.schedules[0].schedule.cron == "30 1 * * *"
    assert collapse.schedules[0].schedule.cron == "0 4 * * 0"
    on_demand = deployments(_params(collapse={"cron": None}), tmp_path)[1]
    assert not on_demand.schedules
