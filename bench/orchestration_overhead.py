"""How much of a pipeline run is orchestration (DVC, Prefect, MLflow, process launch) and how much is work.

    python bench/orchestration_overhead.py --path dvc --fresh   # `dvc repro` of the default pipeline in a fresh clone
    python bench/orchestration_overhead.py --path dvc           # `dvc repro -f` here (trainings resume from checkpoints)
    python bench/orchestration_overhead.py --path prefect       # the Prefect flow over a fresh clone
    python bench/orchestration_overhead.py --path dvc --root /some/clone --targets report

What is measured, per path (wall-clock seconds; the issue's target is at most
10% of the pipeline's wall time in machinery):

* ``dvc``: ``dvc repro -f`` runs every stage as a process ``latentlab ...``.
  A wrapper named ``latentlab`` put first on PATH times each process, and
  ``LATENTLAB_TIMINGS`` makes each stage append the span of its MLflow run
  and the time it spent in MLflow, import included (see latentlab.tracking).
  Then: DVC = repro wall - union of the stage processes' intervals; launch =
  process wall - stage span (interpreter, imports, params); MLflow = time
  the stages spent in MLflow; warm server start = the time the warm server
  (latentlab.warm, on unless LATENTLAB_WARM=0) spent importing beside the
  stages, after the core imports that the first stage waits for; work = the
  rest.
* ``prefect``: :func:`latentlab.orchestration.pipeline_flow` in this process
  on a fresh ``git clone`` of the repository (nothing resumes). Prefect = flow
  wall - union of its task runs' intervals (read back from the Prefect API);
  MLflow = time spent in MLflow; work = the rest. The temporary Prefect
  server's start (a deployment talks to a running server) is timed apart.

Machines differ: run it on a quiet machine (two torch processes on two cores
slow each other several-fold). Results go to bench/results/orchestration_overhead_{path}.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

WRAPPER = """#!{python}
import json, os, subprocess, sys, time
start = time.time()
code = subprocess.call([{real!r}, *sys.argv[1:]])
with open(os.environ["LATENTLAB_PROCESS_TIMINGS"], "a", encoding="utf-8") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "start": start, "end": time.time(), "rc": code}}) + "\\n")
sys.exit(code)
"""


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping ``(start, end)`` intervals."""
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def fresh_clone(target: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(REPO), str(target)], check=True)
    return target


def bench_dvc(root: Path, targets: list[str], workdir: Path) -> dict:
    real = shutil.which("latentlab", path=str(Path(sys.executable).parent))
    if real is None:
        raise SystemExit("no `latentlab` command next to this Python: install the project (pip install -e .)")
    bin_dir = workdir / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "latentlab"
    wrapper.write_text(WRAPPER.format(python=sys.executable, real=real))
    wrapper.chmod(0o755)
    stage_log, process_log = workdir / "stages.jsonl", workdir / "processes.jsonl"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "LATENTLAB_TIMINGS": str(stage_log),
        "LATENTLAB_PROCESS_TIMINGS": str(process_log),
        # A warm server of this run's own, started by its first stage (see latentlab.warm).
        "LATENTLAB_WARM_DIR": str(workdir / "warm"),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "dvc", "repro", "-f", *targets]
    print("running", " ".join(cmd[2:]), "in", root, flush=True)
    start = time.time()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"dvc repro failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    warm_on = env.get("LATENTLAB_WARM", "1") not in ("0", "false", "no", "off")
    warm_log = "".join(p.read_text() for p in (workdir / "warm").glob("*.log"))
    if warm_on:
        from latentlab import warm

        warm.stop_all(env)
    # The first stage waited for the server's core imports (that is in its launch time); the
    # rest of its imports ran beside the next stages and took a core from them: count all of
    # that as machinery too (and not as those stages' work), the conservative reading.
    warm_start = sum(float(x) for x in re.findall(r"the rest loaded in ([0-9.]+) s", warm_log))
    served = len(re.findall(r"\): (?:exit -?\d+|killed by signal \d+) after", warm_log))
    processes, stages = read_jsonl(process_log), read_jsonl(stage_log)
    process_seconds = sum(p["end"] - p["start"] for p in processes)
    stage_span = sum(s["left"] - s["entered"] for s in stages)
    mlflow = sum(s["mlflow_s"] for s in stages)
    dvc = wall - union_seconds([(p["start"], p["end"]) for p in processes])
    launch = process_seconds - stage_span
    work = stage_span - mlflow - warm_start
    per_stage = []
    for p in sorted(processes, key=lambda p: p["start"]):
        inside = [s for s in stages if p["start"] <= s["entered"] and s["left"] <= p["end"]]
        span = sum(s["left"] - s["entered"] for s in inside)
        in_mlflow = sum(s["mlflow_s"] for s in inside)
        per_stage.append(
            {
                "command": " ".join(p["argv"]),
                "process_s": round(p["end"] - p["start"], 3),
                "launch_s": round(p["end"] - p["start"] - span, 3),
                "mlflow_s": round(in_mlflow, 3),
                "work_s": round(span - in_mlflow, 3),
            }
        )
    return {
        "path": "dvc",
        "command": " ".join(cmd[2:]),
        "stages": len(processes),
        "warm_server": warm_on,
        "stages_run_warm": served,
        "wall_s": wall,
        "work_s": work,
        "overhead_s": {"dvc": dvc, "process_launch": launch, "mlflow": mlflow, "warm_server_start": warm_start},
        "overhead_fraction": (wall - work) / wall,
        "per_stage": per_stage,
        "stage_records": stages,
    }


def bench_prefect(root: Path, datasets: list[str] | None, workdir: Path) -> dict:
    stage_log = workdir / "stages.jsonl"
    os.environ["LATENTLAB_TIMINGS"] = str(stage_log)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort

    from latentlab.orchestration import pipeline_flow

    @flow(name="warm-up")
    def warm_up() -> None:
        return None

    start = time.time()
    warm_up()  # starts the temporary server unless PREFECT_API_URL points at one
    server_start = time.time() - start

    start = time.time()
    state = pipeline_flow(root=str(root), datasets=datasets, return_state=True)
    wall = time.time() - start
    if not state.is_completed():
        raise SystemExit(f"the flow did not complete: {state}")
    flow_run_id = state.state_details.flow_run_id
    intervals = []
    with get_client(sync_client=True) as client:
        flow_runs = [flow_run_id]
        # Subflows (the collapse study) are flow runs whose parent task belongs to this flow.
        subflows = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])),
            sort=FlowRunSort.START_TIME_ASC,
            limit=200,
        )
        flow_runs += [f.id for f in subflows]
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_runs)),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
            limit=200,
        )
    timed = [run for run in task_runs if run.start_time is not None and run.end_time is not None]
    for run in timed:
        intervals.append((run.start_time.timestamp(), run.end_time.timestamp()))
    stages = read_jsonl(stage_log)
    in_tasks = union_seconds(intervals)
    mlflow = sum(s["mlflow_s"] for s in stages)
    # Subflow runs appear both as a flow run and as the tasks inside it: the union counts them once.
    work = in_tasks - mlflow
    return {
        "path": "prefect",
        "datasets": datasets or "params.yaml pipeline.datasets",
        "task_runs": len(task_runs),
        "stage_runs": len(stages),
        "temporary_server_start_s": server_start,
        "wall_s": wall,
        "work_s": work,
        "overhead_s": {"prefect": wall - in_tasks, "mlflow": mlflow},
        "overhead_fraction": (wall - work) / wall,
        # Raw figures, to look into where the time outside task runs went.
        "task_run_intervals": sorted(
            (run.name, start, end) for run, (start, end) in zip(timed, intervals, strict=True)
        ),
        "stage_records": stages,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", choices=["dvc", "prefect"], default="dvc")
    parser.add_argument("--root", type=Path, default=None, help="project to run in (dvc: default this repo)")
    parser.add_argument("--fresh", action="store_true", help="dvc: run in a fresh git clone (nothing to resume)")
    parser.add_argument("--targets", nargs="*", default=[], help="dvc: stages to reproduce (default all)")
    parser.add_argument("--datasets", nargs="*", default=None, help="prefect: datasets (default params.yaml)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="latentlab-overhead-") as tmp:
        workdir = Path(tmp)
        if args.path == "dvc":
            root = fresh_clone(workdir / "clone") if args.fresh else (args.root or REPO).resolve()
            result = bench_dvc(root, args.targets, workdir)
            result["fresh_clone"] = args.fresh
        else:
            root = args.root.resolve() if args.root else fresh_clone(workdir / "clone")
            result = bench_prefect(root, args.datasets, workdir)
    result["cpus"] = os.cpu_count()
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"{args.path}_fresh" if args.path == "dvc" and args.fresh else args.path
    out = RESULTS / f"orchestration_overhead_{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    if "stages_run_warm" in result:
        print(f"{result['stages_run_warm']} of {result['stages']} stage processes ran in the warm server")
    print(f"wall {result['wall_s']:.1f} s, work {result['work_s']:.1f} s")
    for name, seconds in result["overhead_s"].items():
        print(f"  {name:18s} {seconds:8.1f} s  ({seconds / result['wall_s']:.1%})")
    print(f"overhead {result['overhead_fraction']:.1%} of the wall time (target <= 10%); written to {out}")


if __name__ == "__main__":
    main()
