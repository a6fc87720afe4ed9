"""bench/record_curves.py: the table of learning curves it records, and its resuming."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "record_curves.py"


def load_script():
    spec = importlib.util.spec_from_file_location("record_curves", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_recording_writes_a_table_a_replay_can_look_up(tmp_path: Path) -> None:
    record_curves = load_script()
    out, partial = tmp_path / "curves.json.gz", tmp_path / "partial.jsonl"
    # A configuration an interrupted run had finished already: it must be kept, not retrained.
    earlier = {
        "parameters": record_curves.configurations(record_curves.QUICK_GRID)[1],
        "curve": [[4, 9.0], [8, None], [12, 7.0]],
        "final": 7.0,
        "seconds": 0.0,
        "cpu_seconds": 0.0,
    }
    partial.write_text(json.dumps(earlier) + "\n")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--partial", str(partial)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "mlruns").exists()

    table = json.loads(gzip.decompress(out.read_bytes()))
    meta, configs = table["meta"], table["configs"]
    grid = record_curves.QUICK_GRID
    assert meta["grid"] == grid and meta["configurations"] == len(configs) == 4
    assert meta["max_steps"] == 12 and meta["eval_every"] == 4 and meta["seed"] == 0
    assert meta["model"]["hidden_size"] == 64 and meta["data"]["eval_examples"] == 16
    assert meta["seconds"] > 0 and meta["untrained_eval_loss"] > 5
    assert 0 < meta["context_free_eval_loss"] < meta["untrained_eval_loss"]

    assert [c["parameters"] for c in configs] == record_curves.configurations(grid)
    for config in configs:
        for name, value in config["parameters"].items():
            assert value in grid[name] and type(value) is type(grid[name][0])
    assert configs[1] == earlier
    trained = [c for i, c in enumerate(configs) if i != 1]
    assert len(partial.read_text().splitlines()) == 4
    for config in trained:
        steps = [step for step, _ in config["curve"]]
        assert steps == [4, 8, 12]
        assert all(math.isfinite(loss) for _, loss in config["curve"])
        assert config["final"] == config["curve"][-1][1] and config["cpu_seconds"] > 0
    # learning_rate 1e-2 learns within 12 steps; 1e-3 barely moves.
    slow, fast = (c["final"] for c in trained if c["parameters"]["warmup_ratio"] == 0.0)
    assert fast < slow - 0.3 and fast < meta["untrained_eval_loss"] - 0.5

    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["configurations"] == 4 and summary["best_final"] == round(
        min(c["final"] for c in trained), 4
    )


def test_spearman_shares_ranks_between_ties() -> None:
    record_curves = load_script()
    assert record_curves.ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert record_curves.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert record_curves.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert record_curves.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486833)
