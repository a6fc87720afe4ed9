"""Trial defaults of an installation: what a sweep inherits where its spec is silent.

A platform team sets these once (the Helm chart's `trialDefaults`, passed to the operator as
environment variables) so that users need not repeat the trainer image or the GPU nodes'
selector and tolerations in every sweep:

    LORASWEEP_DEFAULT_TRAINER_IMAGE    spec.trainer.image
    LORASWEEP_DEFAULT_NODE_SELECTOR    spec.trainer.nodeSelector (a JSON object)
    LORASWEEP_DEFAULT_TOLERATIONS      spec.trainer.tolerations (a JSON list)
    LORASWEEP_DEFAULT_QUEUE_NAME       spec.trainer.queueName (a Kueue LocalQueue)

(The default MLflow tracking URI, LORASWEEP_MLFLOW_TRACKING_URI, is read by the handlers.)
A default applies only where the sweep leaves the field out: an explicit `nodeSelector: {}`,
`tolerations: []` or `queueName: ""` keeps the trials off the defaults.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sweep_operator.semantic import Problem, SweepInvalid

ENV_IMAGE = "LORASWEEP_DEFAULT_TRAINER_IMAGE"
ENV_NODE_SELECTOR = "LORASWEEP_DEFAULT_NODE_SELECTOR"
ENV_TOLERATIONS = "LORASWEEP_DEFAULT_TOLERATIONS"
ENV_QUEUE_NAME = "LORASWEEP_DEFAULT_QUEUE_NAME"


class DefaultsError(ValueError):
    """An environment variable holds a value the operator cannot use; names the variable."""


@dataclass(frozen=True)
class TrialDefaults:
    image: str | None = None
    node_selector: dict[str, str] | None = None
    tolerations: list[dict[str, Any]] | None = None
    queue_name: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TrialDefaults:
        env = os.environ if environ is None else environ
        node_selector = _json(env, ENV_NODE_SELECTOR, dict, "a JSON object of label: value")
        if node_selector is not None and not all(
            isinstance(v, str) for v in node_selector.values()
        ):
            raise DefaultsError(f"{ENV_NODE_SELECTOR}: label values must be strings")
        tolerations = _json(env, ENV_TOLERATIONS, list, "a JSON list of tolerations")
        if tolerations is not None and not all(isinstance(t, dict) for t in tolerations):
            raise DefaultsError(f"{ENV_TOLERATIONS}: each toleration must be a JSON object")
        return cls(
            image=env.get(ENV_IMAGE) or None,
            node_selector=node_selector,
            tolerations=tolerations,
            queue_name=env.get(ENV_QUEUE_NAME) or None,
        )

    def apply(self, raw_spec: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of a sweep's raw spec (camelCase, as stored) with the defaults filled in.

        Raises SweepInvalid when the sweep names no image and there is no default image to
        give it (a custom jobTemplate brings its own containers and needs none).
        """
        spec = copy.deepcopy(dict(raw_spec))
        trainer = spec.get("trainer")
        if not isinstance(trainer, dict):
            return spec  # missing or malformed: parse_spec reports it
        for key, default in (
            ("image", self.image),
            ("nodeSelector", self.node_selector),
            ("tolerations", self.tolerations),
            ("queueName", self.queue_name),
        ):
            if key not in trainer and default is not None:
                trainer[key] = copy.deepcopy(default)
        if trainer.get("image") is None and trainer.get("jobTemplate") is None:
            raise SweepInvalid(
                "InvalidSpec",
                [
                    Problem(
                        "spec.trainer.image",
                        f"required: this operator has no default trainer image ({ENV_IMAGE}, "
                        "the Helm chart's trialDefaults.image)",
                    )
                ],
            )
        return spec


def _json(env: Mapping[str, str], name: str, kind: type, expected: str) -> Any:
    text = env.get(name, "").strip()
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise DefaultsError(f"{name}: not valid JSON ({error}); expected {expected}") from None
    if not isinstance(value, kind):
        raise DefaultsError(f"{name}: got {text!r}; expected {expected}")
    return value


@functools.cache
def trial_defaults() -> TrialDefaults:
    """The operator's defaults, read once from its environment (it does not change)."""
    return TrialDefaults.from_env()
