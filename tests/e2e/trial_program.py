"""A trial program for the e2e tests, run by the pod runner under the real Job controller.

Its objective is a known function of its parameters, lowest (0.1) at rank 8 and lr 2e-4. It
follows the trial contract: an MLflow child run under the sweep's parent run, tagged with its
trial, and the final metrics as JSON in the file named by LORASWEEP_RESULT_PATH. It appends its
start and end times to --trace, so a test can see how many trials ran at once. With
--out-of-memory-from-rank it runs out of GPU memory as the bundled trainer reports it (its
error as the result, exit code 4) from that rank up.
"""

import argparse
import math
import os
import sys
import time

from mlflow import MlflowClient
from trial_contract import start_child_run, write_result

from lora_trainer.contract import ENV_TRIAL, EXIT_OUT_OF_MEMORY

parser = argparse.ArgumentParser()
parser.add_argument("--rank", type=int, required=True)
parser.add_argument("--lr", type=float, required=True)
parser.add_argument("--trace", required=True)
parser.add_argument("--seconds", type=float, default=1.0)
parser.add_argument("--out-of-memory-from-rank", type=int)
args = parser.parse_args()

trial = os.environ[ENV_TRIAL]
with open(args.trace, "a") as trace:
    trace.write(f"start {trial} {time.time()}\n")

loss = (math.log2(args.rank) - 3) ** 2 + (args.lr * 1e4 - 2) ** 2 + 0.1
mlflow = MlflowClient()
run_id = start_child_run(mlflow)
mlflow.log_param(run_id, "lora_rank", args.rank)
mlflow.log_param(run_id, "learning_rate", args.lr)
if args.out_of_memory_from_rank is not None and args.rank >= args.out_of_memory_from_rank:
    mlflow.set_terminated(run_id, "FAILED")
    write_result({}, "out of GPU memory")
    sys.exit(EXIT_OUT_OF_MEMORY)
for step in range(3):
    time.sleep(args.seconds / 3)
    mlflow.log_metric(run_id, "eval_loss", loss * (3 - step), step=step)
mlflow.log_metric(run_id, "eval_loss", loss, step=3)
mlflow.set_terminated(run_id)

write_result({"eval_loss": loss, "train_loss": loss * 1.1})
with open(args.trace, "a") as trace:
    trace.write(f"end {trial} {time.time()}\n")
