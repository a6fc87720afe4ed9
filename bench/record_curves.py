"""Record a tabular benchmark of real LoRA learning curves from the bundled trainer.

Every configuration of a full-factorial grid over the search's hyperparameters trains for the
whole budget through `lora_trainer.train.train`, the function a sweep's trial runs, on a tiny
random Llama-style model and the toy counting task of `lora_trainer.tiny`, built here once.
Its eval_loss is recorded at every evaluation, so a search benchmark can replay real curves in
seconds: any stopping rule, any sampler, looked up by parameters. Seeds are fixed: the same
settings give the same table.

    nice -n 19 .venv/bin/python bench/record_curves.py      # the full grid, about an hour of CPU
    .venv/bin/python bench/record_curves.py --quick --out /tmp/quick.json.gz   # seconds

Torch runs on one thread, so the recording leaves the machine's other cores alone. Finished
configurations go to a JSONL file in the temp directory as they finish; a run with the same
settings skips them, so an interrupted recording resumes where it stopped. Writes the table
(gzipped JSON, see bench/data/README.md) and prints a summary of the surface as one JSON line.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import itertools
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "data" / "lora_curves.json.gz"

# Rungs at 5, 15, 45 and 135 steps: ASHA's with a reduction factor of 3.
MAX_STEPS = 135
EVAL_EVERY = 5
SEED = 0
MODEL = {"hidden_size": 96, "num_layers": 3, "num_heads": 4}
DATA = {"train_examples": 1500, "eval_examples": 200, "train_seed": 0, "eval_seed": 1}
GRID: dict[str, list[Any]] = {
    # Half-decades: the smallest barely move within the budget, the largest stall on a plateau.
    "learning_rate": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
    "lora_rank": [2, 8, 32],
    "lora_alpha": [8, 32],
    "lora_dropout": [0.0, 0.1],
    "warmup_ratio": [0.0, 0.1],
    "per_device_train_batch_size": [4, 16],
}

QUICK_MAX_STEPS = 12
QUICK_EVAL_EVERY = 4
QUICK_MODEL = {"hidden_size": 64, "num_layers": 2, "num_heads": 4}
QUICK_DATA = {"train_examples": 96, "eval_examples": 16, "train_seed": 0, "eval_seed": 1}
QUICK_GRID: dict[str, list[Any]] = {
    "learning_rate": [1e-3, 1e-2],
    "lora_rank": [8],
    "lora_alpha": [16],
    "lora_dropout": [0.0],
    "warmup_ratio": [0.0, 0.1],
    "per_device_train_batch_size": [8],
}

# The trainer's settings every configuration shares; the grid's parameters override them.
FIXED = {
    "template": "chat",
    "lr_scheduler_type": "cosine",
    "optim": "adamw_torch",
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "packing": True,
    "per_device_eval_batch_size": 64,
}

NON_FINITE = "recorded as null; training goes on and later evaluations are recorded too"


def toy_data(sizes: Mapping[str, int]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and eval examples; eval holds only prompts training never sees, so eval_loss
    measures the counting rule learnt, not examples memorised."""
    from lora_trainer import tiny

    train = tiny.toy_dataset(sizes["train_examples"], seed=sizes["train_seed"])
    seen = {json.dumps(row, sort_keys=True) for row in train}
    evaluation: list[dict[str, str]] = []
    for row in tiny.toy_dataset(20 * sizes["eval_examples"], seed=sizes["eval_seed"]):
        key = json.dumps(row, sort_keys=True)
        if key not in seen:
            seen.add(key)
            evaluation.append(row)
    if len(evaluation) < sizes["eval_examples"]:
        raise SystemExit(f"only {len(evaluation)} toy prompts are not in the training data")
    return train, evaluation[: sizes["eval_examples"]]


def configurations(grid: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def config_key(parameters: Mapping[str, Any]) -> str:
    return json.dumps(parameters, sort_keys=True)


def finite_or_none(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None


def curve_run() -> Any:
    """A TrialRun without MLflow that keeps every eval_loss as logged, non-finite ones too (the
    MLflow record drops those)."""
    from lora_trainer.tracking import TrialRun

    class CurveRun(TrialRun):
        def __init__(self) -> None:
            super().__init__({})
            self.curve: list[tuple[int, float]] = []

        def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
            if "eval_loss" in metrics:
                self.curve.append((step, float(metrics["eval_loss"])))
            super().log_metrics(metrics, step)

    return CurveRun()


def record_one(base: Mapping[str, Any], parameters: Mapping[str, Any]) -> dict[str, Any]:
    from lora_trainer.config import TrainConfig
    from lora_trainer.stopping import StopFlag
    from lora_trainer.train import train

    cfg = TrainConfig(**base, **parameters)
    trial_run = curve_run()
    start, cpu_start = time.perf_counter(), time.process_time()
    train(cfg, trial_run, StopFlag())
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    curve = [[step, finite_or_none(loss)] for step, loss in trial_run.curve]
    if not curve or curve[-1][0] != cfg.max_steps:
        raise RuntimeError(f"{dict(parameters)}: no evaluation at step {cfg.max_steps}: {curve}")
    return {
        "parameters": dict(parameters),
        "curve": curve,
        "final": curve[-1][1],
        "seconds": round(seconds, 3),
        # On a shared machine wall time counts the other programs too; CPU time does not.
        "cpu_seconds": round(cpu_seconds, 3),
    }


def untrained_eval_loss(base: Mapping[str, Any], folder: Path) -> float:
    """The eval_loss at step 0, the same for every configuration: LoRA starts as a no-op."""
    from lora_trainer.config import TrainConfig
    from lora_trainer.train import evaluate_adapter, load_model

    cfg = TrainConfig(**base)
    load_model(cfg).save_pretrained(folder)
    return evaluate_adapter(cfg, folder)


def context_free_eval_loss(base: Mapping[str, Any]) -> float:
    """The lowest eval_loss of a model that ignores every input: the entropy of the eval
    set's target tokens. A configuration that ends above it has learnt less than how often
    each token occurs."""
    from lora_trainer.config import TrainConfig
    from lora_trainer.data import IGNORE_INDEX
    from lora_trainer.train import load_tokenizer, prepare_data

    cfg = TrainConfig(**base)
    examples = prepare_data(cfg, load_tokenizer(cfg)).eval.examples
    # As the eval loss counts them: an example's first token is never a target.
    counts = Counter(
        label for example in examples for label in example["labels"][1:] if label != IGNORE_INDEX
    )
    total = sum(counts.values())
    return -sum(n / total * math.log(n / total) for n in counts.values())


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            result[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return result


def spearman(xs: list[float], ys: list[float]) -> float:
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    spread = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / spread if spread else float("nan")


def summarize(table: Mapping[str, Any]) -> dict[str, Any]:
    """The surface in figures: how spread out it is, and how early its ranking shows."""
    meta, configs = table["meta"], table["configs"]
    finals = [c["final"] for c in configs if c["final"] is not None]
    best = min(finals)
    untrained, context_free = meta["untrained_eval_loss"], meta["context_free_eval_loss"]
    rungs = []
    step = meta["eval_every"]
    while step < meta["max_steps"]:
        pairs = [
            (dict(c["curve"])[step], c["final"])
            for c in configs
            if dict(c["curve"]).get(step) is not None and c["final"] is not None
        ]
        rho = spearman([a for a, _ in pairs], [b for _, b in pairs]) if len(pairs) > 1 else None
        rungs.append({"step": step, "spearman_with_final": None if rho is None else round(rho, 3)})
        step *= 3
    return {
        "configurations": len(configs),
        "untrained_eval_loss": round(untrained, 4),
        "context_free_eval_loss": round(context_free, 4),
        "best_final": round(best, 4),
        "median_final": round(statistics.median(finals), 4),
        "worst_final": round(max(finals), 4),
        **{
            f"within_{pct}pct_of_best": round(
                sum(f <= (1 + pct / 100) * best for f in finals) / len(configs), 4
            )
            for pct in (1, 5, 10)
        },
        "non_finite_final": len(configs) - len(finals),
        "final_worse_than_untrained": sum(f >= untrained for f in finals),
        "final_worse_than_context_free": sum(f >= context_free for f in finals),
        "rank_correlation_by_rung": rungs,
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few configurations, few steps")
    parser.add_argument("--out", type=Path, help=f"the table (default {DEFAULT_OUT})")
    parser.add_argument(
        "--partial", type=Path, help="finished configurations (default: in the temp directory)"
    )
    args = parser.parse_args(argv)
    if args.quick and args.out is None:
        parser.error("--quick needs --out: it must not replace the recorded table")
    out = args.out or DEFAULT_OUT

    # Before torch spreads its thread pool over every core.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import peft
    import torch
    import transformers

    from lora_trainer import tiny

    torch.set_num_threads(1)
    grid = QUICK_GRID if args.quick else GRID
    model_size = QUICK_MODEL if args.quick else MODEL
    data_sizes = QUICK_DATA if args.quick else DATA
    max_steps = QUICK_MAX_STEPS if args.quick else MAX_STEPS
    eval_every = QUICK_EVAL_EVERY if args.quick else EVAL_EVERY
    settings = {
        "model": model_size,
        "data": data_sizes,
        "grid": grid,
        "fixed": FIXED,
        "seed": SEED,
        "max_steps": max_steps,
        "eval_every": eval_every,
        "versions": [torch.__version__, transformers.__version__, peft.__version__],
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    partial = args.partial or Path(tempfile.gettempdir()) / f"lora_curves-{digest}.jsonl"

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lora_curves-") as tmp:
        folder = Path(tmp)
        model_dir = tiny.build_model(folder / "model", **model_size, seed=SEED)
        train_rows, eval_rows = toy_data(data_sizes)
        base = {
            "model_name_or_path": str(model_dir),
            "train_file": str(tiny.write_jsonl(folder / "train.jsonl", train_rows)),
            "eval_file": str(tiny.write_jsonl(folder / "eval.jsonl", eval_rows)),
            "output_dir": str(folder / "out"),
            "save_adapter": False,
            "seed": SEED,
            "max_steps": max_steps,
            "eval_steps": eval_every,
            "logging_steps": max_steps,
            **FIXED,
        }
        untrained = untrained_eval_loss(base, folder / "untrained")
        context_free = context_free_eval_loss(base)
        model_config = json.loads((model_dir / "config.json").read_text())

        done: dict[str, dict[str, Any]] = {}
        if partial.exists():
            for line in partial.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    done[config_key(record["parameters"])] = record
        setup_seconds = time.perf_counter() - started
        todo = [p for p in configurations(grid) if config_key(p) not in done]
        print(
            f"{len(done)} configurations already in {partial}, {len(todo)} to train",
            file=sys.stderr,
            flush=True,
        )
        for index, parameters in enumerate(todo, start=1):
            record = record_one(base, parameters)
            with partial.open("a") as handle:
                handle.write(json.dumps(record, allow_nan=False) + "\n")
            done[config_key(parameters)] = record
            print(
                f"[{index}/{len(todo)}] {config_key(parameters)} final={record['final']} "
                f"{record['seconds']:.1f}s",
                file=sys.stderr,
                flush=True,
            )

    configs = [done[config_key(p)] for p in configurations(grid)]
    table = {
        "meta": {
            "script": "bench/record_curves.py",
            "command": shlex.join(["python", "bench/record_curves.py", *argv]),
            "model": {
                "architecture": model_config["architectures"][0],
                "hidden_size": model_config["hidden_size"],
                "num_hidden_layers": model_config["num_hidden_layers"],
                "num_attention_heads": model_config["num_attention_heads"],
                "num_key_value_heads": model_config["num_key_value_heads"],
                "intermediate_size": model_config["intermediate_size"],
                "vocab_size": model_config["vocab_size"],
                "initializer_range": model_config["initializer_range"],
                "seed": SEED,
            },
            "data": {
                "task": "toy counting task of lora_trainer.tiny, eval prompts unseen in training",
                **data_sizes,
            },
            "fixed": FIXED,
            "seed": SEED,
            "max_steps": max_steps,
            "eval_every": eval_every,
            "grid": grid,
            "configurations": len(configs),
            "untrained_eval_loss": round(untrained, 6),
            "context_free_eval_loss": round(context_free, 6),
            "non_finite_eval_loss": NON_FINITE,
            # The configurations' own, whichever session trained them, and this session's setup.
            "seconds": round(setup_seconds + sum(c["seconds"] for c in configs), 1),
            "cpu_seconds": round(sum(c["cpu_seconds"] for c in configs), 1),
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "recorded": datetime.now(UTC).date().isoformat(),
        },
        "configs": configs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    # mtime 0: the same table compresses to the same bytes.
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(json.dumps(table, allow_nan=False, separators=(",", ":")).encode())
    print(json.dumps(summarize(table)))


if __name__ == "__main__":
    main()
