"""Screenshots of the demo sweep in the MLflow UI, for the README: docs/mlflow-runs.png (the runs
table, trials nested under the sweep's parent run) and docs/mlflow-chart.png (Chart view).

    make demo                           # leaves the cluster and MLflow running
    .venv/bin/python -m docs.screenshots

Drives headless Chromium (Debian's `chromium`, installed with apt-get when missing) over the
DevTools protocol: the UI is a single-page app that fetches its data after load, so the
script waits for the runs to appear and clicks where a user would, instead of taking a blind
`--screenshot` of whatever has rendered by then.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import websocket

import devcluster
from tests.support import free_port, wait_for

DOCS = Path(__file__).resolve().parent
CHROMIUM = "chromium"
# No sandbox (we may be root), no GPU, and nothing that phones home: the machine is offline.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]
WIDTH, HEIGHT = 1440, 860


def ensure_chromium() -> str:
    path = shutil.which(CHROMIUM)
    if path is None:
        subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", CHROMIUM], check=True
        )
        path = shutil.which(CHROMIUM)
    if path is None:
        raise SystemExit("chromium is not installed and apt-get could not install it")
    return path


class Page:
    """One Chromium tab over the DevTools protocol: just the calls the screenshots need."""

    def __init__(self, ws_url: str) -> None:
        self.socket = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        self.socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:  # skip events until our answer arrives
            message = json.loads(self.socket.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}...: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def wait_for_text(self, text: str, timeout: float = 30) -> None:
        wait_for(
            lambda: self.evaluate(f"!!document.body?.innerText.includes({json.dumps(text)})"),
            timeout,
            f"{text!r} on the page",
            interval=0.3,
        )

    def wait_for_selector(self, selector: str, timeout: float = 30) -> None:
        wait_for(
            lambda: self.evaluate(f"!!document.querySelector({json.dumps(selector)})"),
            timeout,
            f"{selector} on the page",
            interval=0.3,
        )

    def click_text(self, text: str, selector: str = "button, [role=button], a, span") -> bool:
        """Click the innermost element matching `selector` whose text is exactly `text`."""
        return bool(
            self.evaluate(
                f"""(() => {{
                const hits = [...document.querySelectorAll({json.dumps(selector)})]
                    .filter(e => e.innerText && e.innerText.trim() === {json.dumps(text)});
                if (!hits.length) return false;
                hits[hits.length - 1].click();
                return true;
            }})()"""
            )
        )

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        print(f"wrote {path.relative_to(DOCS.parent)}")


@contextlib.contextmanager
def browser() -> Iterator[Page]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="lorasweep-chromium-") as profile:
        process = subprocess.Popen(
            [
                ensure_chromium(),
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--remote-debugging-port={port}",
                f"--window-size={WIDTH},{HEIGHT}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:

            def page_socket() -> str | None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as r:
                        pages = [t for t in json.load(r) if t["type"] == "page"]
                except OSError:
                    return None
                return pages[0]["webSocketDebuggerUrl"] if pages else None

            page = Page(wait_for(page_socket, 30, "Chromium's DevTools endpoint"))
            page.call(
                "Emulation.setDeviceMetricsOverride",
                width=WIDTH,
                height=HEIGHT,
                deviceScaleFactor=1,
                mobile=False,
            )
            yield page
        finally:
            process.terminate()
            process.wait(timeout=10)


def open_experiment(page: Page, url: str, parent: str) -> None:
    """The experiment's runs with the sweep's parent run expanded to show its trials."""
    page.open(url)
    page.wait_for_text(parent)
    time.sleep(1)  # the experiment-type hint pops up a moment after the runs
    page.click_text("Confirm")  # that hint would cover the table; it asks once per experiment
    page.evaluate(
        "document.querySelector('button[data-component-id*=runnamecellrenderer]').click()"
    )
    page.wait_for_text(f"{parent}-0000")


def runs_table(page: Page, url: str, parent: str, out: Path) -> None:
    open_experiment(page, url, parent)
    page.click_text("Columns")
    # Attributes that say nothing here off, the objective and the swept parameters on. The
    # last match wins: `learning_rate` is a metric too, and the parameters are listed last.
    for column in ["Dataset", "Source", "Models", "eval_loss", "train_loss", "lora_rank"]:
        page.click_text(column, "*")
    page.click_text("learning_rate", "*")
    page.click_text("Columns")
    page.wait_for_text("lora_rank")
    time.sleep(1)
    page.screenshot(out)


def chart(page: Page, parent: str, out: Path) -> None:
    """Chart view of the runs that runs_table left open."""
    page.evaluate("document.querySelector('input[name=runs-view-mode][value=CHART]').click()")
    search = 'input[placeholder="Search metric charts"]'
    page.wait_for_selector(search)
    page.evaluate(f"document.querySelector({json.dumps(search)}).focus()")
    page.call("Input.insertText", text="loss")  # only the loss charts: eval_loss, loss, ...
    page.wait_for_text(f"{parent}-0000 (eval_loss)")
    page.call("Input.dispatchMouseEvent", type="mouseMoved", x=0, y=0)  # no hover toolbars
    time.sleep(2)
    page.screenshot(out)


def main() -> int:
    from mlflow import MlflowClient

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="lorasweep-demo")
    parser.add_argument("--sweep", default="rank-lr", help="the parent run's name")
    args = parser.parse_args()
    cluster = devcluster.Cluster.load()
    if cluster is None or not cluster.healthy():
        raise SystemExit("the dev cluster is not up: run `make demo` first")
    experiment = MlflowClient(cluster.mlflow_url).get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"no MLflow experiment {args.experiment!r}: run `make demo` first")
    url = f"{cluster.mlflow_url}/#/experiments/{experiment.experiment_id}"
    with browser() as page:
        runs_table(page, url, args.sweep, DOCS / "mlflow-runs.png")
        chart(page, args.sweep, DOCS / "mlflow-chart.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
