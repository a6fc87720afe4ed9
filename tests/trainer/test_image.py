"""The trainer image cannot be built here; check what it would install and how it runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "trainer_image"
# The image needs only MLflow's client, which ships as mlflow-skinny at the same version.
IMAGE_NAMES = {"mlflow": "mlflow-skinny"}


def pins(requirements: list[str]) -> dict[str, str]:
    result = {}
    for line in requirements:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)", line)
        assert match, f"not pinned exactly: {line!r}"
        result[match[1].lower()] = match[2]
    return result


def test_image_installs_exactly_the_projects_trainer_pins() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = pins(project["dependencies"] + project["optional-dependencies"]["trainer"])
    wanted = {IMAGE_NAMES.get(name, name): version for name, version in wanted.items()}
    image = pins((IMAGE / "requirements.txt").read_text().splitlines())
    assert image == wanted


def dockerfile() -> str:
    return (IMAGE / "Dockerfile").read_text()


def test_base_image_is_a_pinned_cuda_pytorch_with_the_projects_torch() -> None:
    bases = re.findall(r"^FROM\s+(\S+)", dockerfile(), re.MULTILINE)
    assert len(bases) == 1
    torch_version = pins((IMAGE / "requirements.txt").read_text().splitlines())["torch"]
    assert re.fullmatch(
        rf"pytorch/pytorch:{re.escape(torch_version)}-cuda[\d.]+-cudnn\d+-runtime", bases[0]
    )


def test_image_runs_the_trainer_as_non_root_with_caches_under_tmp() -> None:
    text = dockerfile()
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    assert users[-1].split(":")[0].isdigit(), "a numeric user lets runAsNonRoot verify it"
    for variable in ("HOME", "HF_HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR"):
        value = re.search(rf"\b{variable}=(\S+)", text)
        assert value and value[1].startswith("/tmp/"), variable
    assert 'ENTRYPOINT ["python", "-m", "lora_trainer"]' in text


def test_the_entrypoint_runs_from_what_the_image_copies(tmp_path: Path) -> None:
    """The Dockerfile's COPY lines laid out under a scratch root with the image's PYTHONPATH:
    `python -m lora_trainer` runs, and none of the project's code comes from outside them."""
    text = dockerfile()
    root = tmp_path / "image"
    for source, target in re.findall(r"^COPY\s+(\S+)\s+(\S+)$", text, re.MULTILINE):
        destination = root / target.lstrip("/")
        if (IMAGE / source).is_dir():
            shutil.copytree(IMAGE / source, destination)
        else:
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(IMAGE / source, destination)
    path = re.search(r"\bPYTHONPATH=(\S+)", text)
    assert path, "the image puts its code on PYTHONPATH"
    # A module of the project read from the checkout, not the copy, is one the image lacks
    # (the virtual environment, under the checkout here, holds the dependencies).
    probe = f"""
import runpy, sys
sys.argv = ["lora_trainer", "--help-config"]
try:
    runpy.run_module("lora_trainer", run_name="__main__", alter_sys=True)
finally:
    files = {{name: getattr(m, "__file__", None) or "" for name, m in list(sys.modules.items())}}
    outside = sorted(
        name for name, file in files.items()
        if file.startswith({str(ROOT)!r}) and not file.startswith(sys.prefix)
    )
    print("OUTSIDE", outside, file=sys.stderr)
"""
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(root / path[1].lstrip("/"))},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "lora_rank" in result.stdout
    assert "OUTSIDE []" in result.stderr, result.stderr[-2000:]
