"""python -m devcluster up | down | status | operator-up | operator-down | logs POD [-n NS]"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from devcluster.operator_process import operator_down, operator_up
from devcluster.paths import pod_log_path
from devcluster.supervisor import Cluster, down, up


def memory_mib(cluster: Cluster) -> dict[str, float]:
    """Resident memory of each of the cluster's processes and their children, in MiB."""
    usage: dict[str, float] = {}
    for name, pid in cluster.pids.items():
        out = subprocess.run(
            ["ps", "-o", "rss=", "-g", str(pid)], capture_output=True, text=True
        ).stdout
        usage[name] = round(sum(int(x) for x in out.split()) / 1024, 1)
    return usage


def status() -> int:
    cluster = Cluster.load()
    if cluster is None:
        print("not running")
        return 1
    dead = cluster.dead_processes()
    print(
        json.dumps(
            {
                "api": cluster.api_url,
                "mlflow": cluster.mlflow_url,
                "healthy": cluster.healthy(),
                "dead": dead,
                "memory_mib": memory_mib(cluster),
            },
            indent=2,
        )
    )
    return 0 if not dead else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devcluster",
        description="The dev cluster: a real control plane on loopback with fake GPU nodes "
        "and MLflow.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start the cluster (no-op when it is already up)")
    sub.add_parser("down", help="stop every process the cluster started and remove its state")
    sub.add_parser("status", help="health and memory of the running cluster")
    sub.add_parser("operator-up", help="apply the CRD and run the operator in the background")
    sub.add_parser("operator-down", help="stop the operator")
    logs = sub.add_parser("logs", help="the log of a pod run by the pod runner")
    logs.add_argument("pod")
    logs.add_argument("-n", "--namespace", default="default")
    logs.add_argument("-c", "--container")
    args = parser.parse_args()
    if args.command == "up":
        up()
    elif args.command == "down":
        down()
    elif args.command == "status":
        return status()
    elif args.command == "operator-up":
        operator_up()
    elif args.command == "operator-down":
        operator_down()
    elif args.command == "logs":
        sys.stdout.write(pod_log_path(args.namespace, args.pod, args.container).read_text())
    return 0
