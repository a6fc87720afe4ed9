"""A trial with a known learning curve, for the early-stopping e2e test.

eval_loss at step s is final + 1 / (s + 1), where final is a known function of the
parameters (lowest at lr 1e-3, rank 16). It logs every step to its MLflow child run, so the
operator sees the curve while the trial runs, and appends its pid and "end" to --trace only
when it completes: a trial the operator stops never writes "end".
"""

import argparse
import math
import os
import time

from mlflow import MlflowClient
from trial_contract import start_child_run, write_result

from lora_trainer.contract import ENV_TRIAL

STEPS = 12

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, required=True)
parser.add_argument("--rank", type=int, required=True)
parser.add_argument("--trace", required=True)
parser.add_argument("--seconds-per-step", type=float, default=0.4)
args = parser.parse_args()


def final_loss(lr: float, rank: int) -> float:
    return (math.log10(lr) + 3) ** 2 + (math.log2(rank) - 4) ** 2 / 4 + 0.1


trial = os.environ[ENV_TRIAL]
with open(args.trace, "a") as trace:
    trace.write(f"start {trial} {os.getpid()}\n")
mlflow = MlflowClient()
run_id = start_child_run(mlflow)
final = final_loss(args.lr, args.rank)
for step in range(1, STEPS + 1):
    time.sleep(args.seconds_per_step)
    mlflow.log_metric(run_id, "eval_loss", final + 1 / (step + 1), step=step)
mlflow.set_terminated(run_id)
write_result({"eval_loss": final + 1 / (STEPS + 1)})
with open(args.trace, "a") as trace:
    trace.write(f"end {trial} {os.getpid()}\n")
