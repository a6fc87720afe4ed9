"""`python -m lora_trainer [--config config.yaml] --set key=value ...`

Exit codes: 0 done, 1 unexpected error, 2 bad configuration or model, 3 bad data,
4 out of GPU memory, 128+N stopped by signal N (143 for SIGTERM).

Under torchrun (`python -m torch.distributed.run ... -m lora_trainer ...`), every process
trains; process 0 (RANK=0) alone keeps the MLflow run and writes the result.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Mapping, Sequence

from lora_trainer.config import ConfigError, describe_fields, load_config
from lora_trainer.contract import ENV_PARAMS, EXIT_OUT_OF_MEMORY, result_path
from lora_trainer.stopping import StopFlag, Stopped
from lora_trainer.tracking import TrialRun, write_result

EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_DATA = 3

log = logging.getLogger("lora_trainer")


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lora-trainer",
        description="Fine-tune a LoRA adapter on a causal language model, logging to MLflow.",
        epilog="Settings come from the YAML config file, then the JSON object in "
        f"{ENV_PARAMS}, then --set, later ones winning. --help-config lists them all.",
    )
    parser.add_argument("--config", help="YAML file with settings (flat keys)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting; VALUE is read as YAML (e.g. --set lora_rank=16)",
    )
    parser.add_argument("--help-config", action="store_true", help="list every setting and exit")
    return parser.parse_args(argv)


def _oom_message(cfg: object) -> str:
    batch = getattr(cfg, "per_device_train_batch_size", "?")
    cutoff = getattr(cfg, "cutoff_len", "?")
    return (
        f"out of GPU memory with per_device_train_batch_size={batch} and cutoff_len={cutoff}: "
        "lower per_device_train_batch_size (raise gradient_accumulation_steps to keep the "
        "effective batch), lower cutoff_len, or set gradient_checkpointing=true"
    )


def stop_message(stop: StopFlag) -> str:
    return f"stopped by signal {stop.signal_number or 'SIGTERM'}"


def is_main_process(environ: Mapping[str, str]) -> bool:
    return int(environ.get("RANK") or 0) == 0


def run(
    config_path: str | None, overrides: Sequence[str], environ: Mapping[str, str], stop: StopFlag
) -> int:
    main_process = is_main_process(environ)
    out = result_path(environ)

    def report(metrics: Mapping[str, float] | None = None, error: str | None = None) -> None:
        if main_process:
            write_result(out, metrics, error)

    def refuse(error: ConfigError) -> int:
        # Every rank finds the same configuration error, and the first to exit has torchrun
        # end the others: rank 0 may be killed before it writes. So every rank writes it; the
        # same text written at once by several processes still reads whole.
        log.error("%s", error)
        write_result(out, error=str(error))
        return EXIT_CONFIG

    try:
        cfg = load_config(config_path, overrides, environ)
    except ConfigError as exc:
        return refuse(exc)

    # Heavy imports only once the configuration is known to be good.
    import torch

    from lora_trainer.data import DataError
    from lora_trainer.train import ModelLoadError, check_this_machine, environment_tags, train

    try:
        cfg = check_this_machine(cfg)
    except ConfigError as exc:
        return refuse(exc)

    trial_run = TrialRun(environ if main_process else {})
    trial_run.start(
        tags={
            "lorasweep.params": environ.get(ENV_PARAMS, "")[:5000],
            "env.world_size": environ.get("WORLD_SIZE", "1"),
            **environment_tags(),
        },
    )
    world_size = int(environ.get("WORLD_SIZE") or 1)
    batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size
    trial_run.log_params({**cfg.model_dump(), "effective_batch_size": batch})

    def stopping() -> None:
        # The result as known now, before anything can block on MLflow; the end of the stop
        # rewrites it with the final figures if it gets there before SIGKILL.
        trial_run.hold()
        report(trial_run.latest, stop_message(stop))

    stop.on_signal = stopping

    status, code, metrics, error = "FAILED", EXIT_ERROR, {}, None
    try:
        metrics = train(cfg, trial_run, stop)
        status, code = "FINISHED", 0
    except Stopped as exc:
        metrics = exc.metrics
        status, code = "KILLED", stop.exit_code
        error = stop_message(stop)
        log.warning("%s", error)
    except torch.OutOfMemoryError:
        code, error = EXIT_OUT_OF_MEMORY, _oom_message(cfg)
        log.error("%s", error)
    except DataError as exc:
        code, error = EXIT_DATA, str(exc)
        log.error("%s", error)
    except (ModelLoadError, ConfigError) as exc:
        code, error = EXIT_CONFIG, str(exc)
        log.error("%s", error)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        log.error("training failed:\n%s", traceback.format_exc())
    finally:
        stop.finishing()
        # The result first: MLflow may hang, and the kubelet reads the termination message
        # however the process ends, even by SIGKILL at the end of the grace period.
        report(metrics, error)
        trial_run.end(status)
    if code == 0:
        log.info("done: %s", json.dumps(metrics))
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = _arguments(argv)
    if args.help_config:
        print(describe_fields())
        return 0
    # Under torchrun, the other processes would repeat process 0's log line for line.
    default_level = "INFO" if is_main_process(os.environ) else "WARNING"
    level = os.environ.get("LORA_TRAINER_LOG_LEVEL", default_level)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # MLflow's sqlite store reconfigures the root logger (to WARNING); ours keeps its level.
    log.setLevel(level)
    # Progress bars (transformers 5 has one for loading the weights) are carriage-return noise
    # in a pod's log; the step lines say how far training is.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    stop = StopFlag()
    stop.install()
    return run(args.config, args.overrides, os.environ, stop)


if __name__ == "__main__":
    sys.exit(main())
