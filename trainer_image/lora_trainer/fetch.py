"""`python -m lora_trainer.fetch --model ORG/NAME --dest DIR`: download a hub model once.

The operator runs this in the Job `<sweep>-model` when a sweep has spec.trainer.modelCache,
before any trial starts; the trials then load the model from DIR on the shared claim.

DIR only ever holds a complete download: the files go to `.<name>.partial` next to it, and
the finished directory is renamed to DIR (a rename is atomic on one file system). When DIR
exists, there is nothing to do. A download cut short (the pod evicted, the network down) leaves
the partial directory, and the next attempt resumes from it. The hub is huggingface_hub's:
HF_ENDPOINT and HF_TOKEN apply.

Exit codes: 0 the model is in DIR, 1 the download failed (a retry may succeed), 2 the model
cannot be had (no such repository or revision, or no access to it). The reason is written to
the termination message (LORASWEEP_RESULT_PATH, default /dev/termination-log).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from lora_trainer.contract import result_path

EXIT_FAILED = 1
EXIT_UNAVAILABLE = 2

log = logging.getLogger("lora_trainer.fetch")


class Unavailable(Exception):
    """The model cannot be downloaded, whatever the retries."""


def partial_dir(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.partial")


def fetch(model: str, dest: Path) -> bool:
    """Make `dest` a complete copy of hub model `model`; False when it already was one."""
    if dest.is_dir():
        return False
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    api = HfApi()
    try:
        info = api.model_info(model)
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        # The hub answers the same for a private or gated repository without a good token.
        raise Unavailable(
            f"model {model!r} not found on {api.endpoint} (HTTP {_status(error)}), or it is "
            "private or gated and HF_TOKEN gives no access to it"
        ) from error
    except HfHubHTTPError as error:
        if _status(error) in (401, 403):
            raise Unavailable(
                f"no access to model {model!r} on {api.endpoint} (HTTP {_status(error)}): "
                "check HF_TOKEN"
            ) from error
        raise
    partial = partial_dir(dest)
    partial.parent.mkdir(parents=True, exist_ok=True)
    # The commit, not the branch: every file comes from the same revision, even if the
    # branch moves during the download.
    snapshot_download(model, revision=info.sha, local_dir=partial)
    # snapshot_download returns a non-empty local_dir as it is when the hub cannot be
    # reached; only a directory with every file of the revision may become `dest`.
    missing = [s.rfilename for s in info.siblings or [] if not (partial / s.rfilename).is_file()]
    if missing:
        raise RuntimeError(f"the download of {model!r} is missing {', '.join(missing[:5])}")
    try:
        partial.rename(dest)
    except OSError:
        if not dest.is_dir():
            raise
        # Another download (a second sweep on the same claim) finished first.
        shutil.rmtree(partial, ignore_errors=True)
        return False
    return True


def _status(error: Exception) -> int | None:
    response = getattr(error, "response", None)
    return response.status_code if response is not None else None


def run(model: str, dest: Path, environ: Mapping[str, str]) -> int:
    started = time.monotonic()
    try:
        downloaded = fetch(model, dest)
    except Unavailable as error:
        return _fail(environ, str(error), EXIT_UNAVAILABLE)
    except Exception as error:
        log.exception("downloading %s failed", model)
        return _fail(environ, f"downloading model {model!r} failed: {error}", EXIT_FAILED)
    if downloaded:
        size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
        log.info(
            "downloaded %s into %s: %.1f MB in %.1f s",
            model,
            dest,
            size / 1e6,
            time.monotonic() - started,
        )
    else:
        log.info("%s is already complete in %s; nothing to download", model, dest)
    return 0


def _fail(environ: Mapping[str, str], message: str, code: int) -> int:
    log.error("%s", message)
    try:
        result_path(environ).write_text(message[-4000:])
    except OSError as error:  # outside a pod there may be no /dev/termination-log
        log.warning("cannot write the termination message: %s", error)
    return code


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lora_trainer.fetch",
        description="Download a hub model once into DEST (atomically; nothing to do when DEST "
        "exists).",
    )
    parser.add_argument("--model", required=True, help="hub model id, name or org/name")
    parser.add_argument("--dest", required=True, type=Path, help="directory to create")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # Progress bars are carriage-return noise in a pod's log.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    sys.exit(run(args.model, args.dest, os.environ))


if __name__ == "__main__":
    main()
