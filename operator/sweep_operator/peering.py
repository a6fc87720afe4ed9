"""Standby replicas: load with `kopf run ... -m sweep_operator.peering --peering=NAME`.

kopf's peering lets only the highest-priority operator of a peering object work; the others
pause until it leaves or stops renewing its entry (kopf's peering lifetime, 60 s). But peers of
*equal* priority all pause, each waiting for the others, and the replicas of one Deployment
share their arguments. So every process takes a random priority at startup: exactly one
replica handles sweeps, and when it goes, the next-highest takes over. The Helm chart loads
this module when replicas > 1.
"""

from __future__ import annotations

import secrets
from typing import Any

import kopf

# kopf compares priorities as integers; a wide range makes a tie (which pauses both) unlikely.
PRIORITY_RANGE = 1 << 30


@kopf.on.startup()
def distinct_priority(settings: kopf.OperatorSettings, logger: Any, **_: Any) -> None:
    settings.peering.priority = 1 + secrets.randbelow(PRIORITY_RANGE)
    logger.info("peering priority %d", settings.peering.priority)
