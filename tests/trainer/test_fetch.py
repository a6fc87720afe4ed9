"""lora_trainer.fetch against a local hub: one download, atomic, skipped when complete."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.local_hub import LocalHub


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "llama"}')
    (root / "sub" / "weights.bin").write_bytes(os.urandom(200_000))
    return root


def fetch(hub: LocalHub, model: str, dest: Path, message: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "LORASWEEP_RESULT_PATH": str(message)}
    argv = [sys.executable, "-m", "lora_trainer.fetch", "--model", model, "--dest", str(dest)]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)


def test_a_model_is_downloaded_once_and_completely(repo, tmp_path):
    dest = tmp_path / "cache" / "lorasweep--tiny"
    message = tmp_path / "message"
    with LocalHub({"lorasweep/tiny": repo}) as hub:
        # A download cut short earlier: its partial directory is not the model.
        partial = tmp_path / "cache" / ".lorasweep--tiny.partial"
        partial.mkdir(parents=True)
        (partial / "config.json").write_text("{}")
        first = fetch(hub, "lorasweep/tiny", dest, message)
        assert first.returncode == 0, first.stderr
        assert "downloaded lorasweep/tiny" in first.stderr
        again = fetch(hub, "lorasweep/tiny", dest, message)
        assert again.returncode == 0, again.stderr
        assert "already complete" in again.stderr
        assert hub.downloads == {
            ("lorasweep/tiny", "config.json"): 1,
            ("lorasweep/tiny", "sub/weights.bin"): 1,
        }
    assert (dest / "sub" / "weights.bin").read_bytes() == (
        repo / "sub" / "weights.bin"
    ).read_bytes()
    assert (dest / "config.json").read_text() == '{"model_type": "llama"}'
    assert not partial.exists()


def test_an_unknown_model_fails_with_exit_code_2_and_says_why(repo, tmp_path):
    dest = tmp_path / "cache" / "lorasweep--nope"
    message = tmp_path / "message"
    with LocalHub({"lorasweep/tiny": repo}) as hub:
        result = fetch(hub, "lorasweep/nope", dest, message)
    assert result.returncode == 2, result.stderr
    assert message.read_text().startswith(f"model 'lorasweep/nope' not found on {hub.url}")
    assert not dest.exists()
