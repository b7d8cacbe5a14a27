"""Headless Chromium screenshots of the MLflow UI for a fresh tiny run (docs/tracking.md describes them).

    python scripts/mlflow_screenshots.py [--out runs/screenshots]

Starts a local `mlflow server` on a free port, trains configs/tiny_mor.yaml against it the way `make demo` does
(parallel.tp=2), takes four pictures with Debian's `chromium` (`apt-get install -y chromium`), and stops the
server. The PNGs are written to --out and are not committed.

The MLflow UI keeps a user's choices in the browser's localStorage. A first page served on the UI's own origin
presets the ones a user would make: model-training mode, the assistant panel closed, and on the run's page one
chart holding loss/train and loss/val (MLflow draws one chart per metric until a user adds a second metric).
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

warnings.filterwarnings("ignore", category=UserWarning)  # megatron-core's import notes (no TE, no Apex)
from mor_dist.tracking.experiment import MODEL_TRAINING_VIEW  # noqa: E402
from mor_dist.tracking.metadata import TRAIN_LOSS, VAL_LOSS  # noqa: E402

WINDOW = "1600,1000"
ML_MODE = f"?{MODEL_TRAINING_VIEW}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(port: int, store: Path, options: list[str] | None = None,
                  env: dict[str, str] | None = None) -> Iterator[str]:
    """A local `mlflow server` for the block (default options: sqlite store and artifacts under `store`); its URL."""
    url = f"http://127.0.0.1:{port}"
    log = (store / "server.log").open("a")
    options = options or ["--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
                          "--artifacts-destination", str(store / "artifacts")]
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", *options, "--host", "127.0.0.1", "--port",
                               str(port), "--workers", "1"], stdout=log, stderr=log, env=env)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError(f"mlflow server did not answer on {url}; see {store / 'server.log'}")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def chromium(profile: Path, *args: str) -> None:
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={profile}", f"--window-size={WINDOW}", *args],
                   check=True, capture_output=True, timeout=120)


def seed_page(run_id: str) -> str:
    """JavaScript that stores the UI choices of a user (see the module docstring) in localStorage."""
    chart_state = {
        "isAccordionReordered": False, "isDirty": True, "autoRefreshEnabled": False,
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
        "compareRunSections": [{"uuid": "section-loss", "name": "loss", "display": True, "isReordered": False,
                                "deleted": False, "isGenerated": True}],
        "compareRunCharts": [{"uuid": "chart-loss", "type": "LINE", "runsCountToCompare": 10,
                              "metricSectionId": "section-loss", "deleted": False, "isGenerated": False,
                              "displayName": "loss: training and validation", "metricKey": TRAIN_LOSS,
                              "selectedMetricKeys": [TRAIN_LOSS, VAL_LOSS], "scaleType": "linear",
                              "xAxisKey": "step", "xAxisScaleType": "linear", "selectedXAxisMetricKey": "",
                              "lineSmoothness": 0, "useGlobalLineSmoothing": False, "useGlobalXaxisKey": False}],
    }
    values = {"mlflow.workflowType_v1": json.dumps("machine_learning"),
              "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true", "mlflow.assistant.panelOpen_v1": "false",
              f"MLflowLocalStorage-1.1-RunPage-{run_id}-model-chartUIState": json.dumps(chart_state)}
    lines = [f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)});" for k, v in values.items()]
    return "<html><body><script>" + "".join(lines) + "document.title='seeded'</script></body></html>"


def seed_browser(profile: Path, port: int, run_id: str) -> None:
    """Serve the seed page on the UI's origin once (the MLflow server is stopped meanwhile)."""
    page = seed_page(run_id).encode()

    class Seed(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", port), Seed)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        chromium(profile, "--dump-dom", f"http://127.0.0.1:{port}/")
    finally:
        server.shutdown()
        server.server_close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "screenshots")
    args = parser.parse_args()
    if shutil.which("chromium") is None:
        print("error: chromium is not installed; apt-get update && apt-get install -y chromium", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="mlflow-shots-") as tmp:
        work = Path(tmp)
        with mlflow_server(port, work) as url:
            env = {**os.environ, "MLFLOW_TRACKING_URI": url}
            subprocess.run([sys.executable, "jobs/pretrain.py", "parallel.tp=2", f"run.storage_path={work / 'runs'}"],
                           cwd=ROOT, env=env, check=True)
            from mlflow import MlflowClient

            client = MlflowClient(url)
            experiment = client.get_experiment_by_name("mor-dist").experiment_id
            (run,) = client.search_runs([experiment], max_results=1)
        profile = work / "chromium"
        seed_browser(profile, port, run.info.run_id)
        with mlflow_server(port, work) as url:
            page = f"{url}/#/experiments/{experiment}"
            run_page = f"{page}/runs/{run.info.run_id}"
            shots = {"runs.png": f"{page}/runs{ML_MODE}", "run_overview.png": f"{run_page}{ML_MODE}",
                     "loss_chart.png": f"{run_page}/model-metrics{ML_MODE}",
                     "system_metrics.png": f"{run_page}/system-metrics{ML_MODE}"}
            for name, address in shots.items():
                chromium(profile, "--virtual-time-budget=60000", f"--screenshot={args.out / name}", address)
                print(f"{args.out / name}  <- {address}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
