"""Run the model-collapse study as a Prefect flow.

    python flows/collapse.py            # the first dataset of collapse.datasets in params.yaml
    python flows/collapse.py mnist      # a given dataset

Loop types and seeds run in parallel as task runs, on the task runner of
``sweep.runner`` (a local Dask cluster by default, or the cluster at
``sweep.dask.address`` / ``$LATENTLAB_DASK_ADDRESS``); generations of one loop
run in sequence. Finished generations are saved, so a rerun resumes where it stopped.
"""

from __future__ import annotations

import sys
from pathlib import Path

from latentlab.orchestration import run_collapse

# The guard matters: a local Dask cluster spawns workers that import this file again.
if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    run_collapse(root=str(root), dataset=sys.argv[1] if len(sys.argv) > 1 else None)
