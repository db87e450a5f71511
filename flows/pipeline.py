"""Run the latentlab pipeline as a Prefect flow.

    python flows/pipeline.py            # all datasets of params.yaml
    python flows/pipeline.py mnist      # only some datasets

Each stage is a task run (with its logs) in the Prefect UI; without
PREFECT_API_URL, Prefect starts a temporary local server for the run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from latentlab.orchestration import pipeline_flow

if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    pipeline_flow(root=str(root), datasets=sys.argv[1:] or None)
