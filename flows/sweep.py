"""Run the sweep of params.yaml (section ``sweep``) as a Prefect flow, one task run per grid point.

    python flows/sweep.py                   # on sweep.runner: a local Dask cluster by default
    python flows/sweep.py serial            # one point at a time in this process
    LATENTLAB_DASK_ADDRESS=tcp://scheduler:8786 python flows/sweep.py   # on a running Dask cluster

Finished points are kept, so a rerun trains only what is missing. Needs the
processed and corrupted data of the dataset (``dvc repro corrupt@mnist``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from latentlab.orchestration import run_sweep

# The guard matters: a local Dask cluster starts its workers by spawning fresh
# interpreters that import this file again.
if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    runner = sys.argv[1] if len(sys.argv) > 1 else None
    if runner not in (None, "dask", "serial"):
        sys.exit(f"usage: python flows/sweep.py [dask|serial] (got {runner!r})")
    print(run_sweep(root=str(root), runner=runner))
