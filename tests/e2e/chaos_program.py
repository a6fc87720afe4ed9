"""A trial for the chaos tests, run by the pod runner: it lives through an MLflow outage as the
bundled trainer does, and can leave a worker process behind.

Its objective is known: eval_loss = (rank - 3) ** 2 / 10 + 0.1, lowest at rank 3. MLflow is
best effort (one try per call, as lora_trainer.tracking does after its retries): a trial that
cannot reach the tracking server still trains and reports its result in the termination
message. It appends "start TRIAL PID" (and "worker TRIAL PID" for its worker) to --trace.
With --worker it first starts a child process that ignores SIGTERM, as a data-loader worker
stuck in I/O would: ending the trial must end that process too. With --start-after FILE it
waits for FILE before it starts its MLflow run (a test's cue).
"""

import argparse
import os
import subprocess
import sys
import time

from mlflow import MlflowClient
from trial_contract import start_child_run, write_result

from lora_trainer.contract import ENV_MLFLOW_TRACKING_URI, ENV_TRIAL

# Fail at once while the server is down (MLflow reads these per request): the trial must not
# wait for it.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")

DEAF_WORKER = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"

parser = argparse.ArgumentParser()
parser.add_argument("--rank", type=int, required=True)
parser.add_argument("--seconds", type=float, required=True)
parser.add_argument("--trace", required=True)
parser.add_argument("--worker", action="store_true")
parser.add_argument("--start-after", default="")
args = parser.parse_args()

trial = os.environ[ENV_TRIAL]
lines = [f"start {trial} {os.getpid()}"]
if args.worker:
    worker = subprocess.Popen([sys.executable, "-c", DEAF_WORKER])
    lines.append(f"worker {trial} {worker.pid}")
with open(args.trace, "a") as trace:
    trace.write("".join(f"{line}\n" for line in lines))

while args.start_after and not os.path.exists(args.start_after):
    time.sleep(0.1)
loss = (args.rank - 3) ** 2 / 10 + 0.1
run_id = None
if os.environ.get(ENV_MLFLOW_TRACKING_URI):
    mlflow = MlflowClient()
    try:
        run_id = start_child_run(mlflow)
    except Exception as error:  # the tracking server is down: train without a run
        print(f"no MLflow run: {error}", flush=True)
time.sleep(args.seconds)
if run_id is not None:
    try:
        mlflow.log_metric(run_id, "eval_loss", loss, step=1)
        mlflow.set_terminated(run_id)
    except Exception as error:
        print(f"cannot log to MLflow: {error}", flush=True)
write_result({"eval_loss": loss})
