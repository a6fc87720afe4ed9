"""What one look for new trial runs costs the operator at a sweep's size, against the search of
all the sweep's runs that it replaces, in the same run.

Under early stopping the operator looks for the runs of running trials it does not know yet
every poll (2 s), and for those of trials that ended. It used to search all the sweep's runs
each time; it now searches those started since its last search, and reads ended trials' known
runs by id. This bench fills a fresh MLflow store (sqlite, one server worker, as the dev
cluster's) with `--runs` trial runs of one sweep, started over the hours before, and 20 runs
started now, then times, each `--repeat` times: the search of all of them (the baseline), and
a look as the operator now makes it: the runs started in the last CLOCK_SKEW_SECONDS + 2 s
(the 20), and `--ended` older runs by id.

    .venv/bin/python bench/mlflow_search.py [--runs 5000 --ended 20 --repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from devcluster.components import (  # noqa: E402
    mlflow_ready,
    mlflow_server_command,
    mlflow_store_uri,
)
from lora_trainer.contract import TAG_SWEEP, TAG_TRIAL  # noqa: E402
from sweep_operator.mlflow_runs import CLOCK_SKEW_SECONDS  # noqa: E402
from sweep_operator.plan import CURVE_POLL_SECONDS  # noqa: E402
from sweep_operator.tracking import SweepRuns  # noqa: E402
from tests.support import free_port, wait_for  # noqa: E402

# Ending a run prints a link to it, around the one JSON line of the bench.
os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
SWEEP = "bench"
NEW_RUNS = 20  # started just before the look: the running trials it is to find
# Runs started in the last this many seconds are new to the operator's look.
RECENT_SECONDS = CLOCK_SKEW_SECONDS + CURVE_POLL_SECONDS


def add_runs(
    mlflow: MlflowClient, experiment: str, indexes: range, apart: float, ago: float = 0
) -> None:
    """Finished trial runs of the sweep started `apart` seconds one after another, the last
    `ago` seconds ago."""
    now = time.time() - ago
    for i in indexes:
        started = int((now - (indexes.stop - 1 - i) * apart) * 1000)
        run = mlflow.create_run(experiment, start_time=started)
        tags = [RunTag(TAG_SWEEP, SWEEP), RunTag(TAG_TRIAL, f"{SWEEP}-{i:05d}")]
        metrics = [Metric("eval_loss", 0.5 + i / indexes.stop, started, 0)]
        mlflow.log_batch(run.info.run_id, metrics=metrics, tags=tags)
        mlflow.set_terminated(run.info.run_id, end_time=started + 1000)


def timed(call) -> tuple[float, int]:
    started = time.perf_counter()
    found = call()
    return time.perf_counter() - started, len(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5000, help="trial runs in the store")
    parser.add_argument("--ended", type=int, default=20, help="ended trials read by id")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        store = mlflow_store_uri(Path(folder))
        filled = time.perf_counter()
        # Written straight into the store, not through the server: the same, in half the time.
        direct = MlflowClient(tracking_uri=store)
        experiment = direct.create_experiment("bench")
        add_runs(direct, experiment, range(args.runs), apart=3, ago=10 * RECENT_SECONDS)
        filled = time.perf_counter() - filled
        port = free_port()
        server = subprocess.Popen(
            mlflow_server_command(Path(sys.executable).parent, Path(folder), port),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            uri = f"http://127.0.0.1:{port}"
            wait_for(lambda: mlflow_ready(uri), 120, "the MLflow server")
            add_runs(MlflowClient(uri), experiment, range(args.runs, args.runs + NEW_RUNS), 0.01)
            runs = SweepRuns(uri)
            every = runs.trial_results(experiment, SWEEP)
            ended = [every[f"{SWEEP}-{i:05d}"]["run_id"] for i in range(args.ended)]
            full, look = [], []
            for _ in range(args.repeat):
                full.append(timed(lambda: runs.trial_results(experiment, SWEEP)))
                since = time.time() - RECENT_SECONDS

                def new_and_ended(since: float = since) -> dict:
                    return runs.trial_results(experiment, SWEEP, since) | runs.runs_by_id(
                        experiment, ended
                    )

                look.append(timed(new_and_ended))
        finally:
            server.terminate()
            server.wait(30)
    full_s = statistics.median(t for t, _ in full)
    look_s = statistics.median(t for t, _ in look)
    print(
        json.dumps(
            {
                "bench": "mlflow_search",
                "runs": args.runs,
                "fill_seconds": round(filled, 1),
                "full_search_seconds": round(full_s, 3),
                "full_search_runs": full[0][1],
                "look_seconds": round(look_s, 3),
                "look_runs": look[0][1],
                "ratio_full_to_look": round(full_s / look_s, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
