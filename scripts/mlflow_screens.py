"""Screenshots of what a user sees in the MLflow UI, taken by headless Chromium on a real
``mlflow ui`` (started by ``raydapt ui``'s :func:`~raydapt.ops.ui.serve`, stopped at the end).

    python scripts/mlflow_screens.py --tracking-uri sqlite:////tmp/demo/mlruns.db \\
        --experiment simda --run-name books-to-kitchen-tiny --out /tmp/screens

For the job's newest parent run it opens, each in a fresh browser profile (empty local
storage, as a first visit):

- ``runs.png``: the runs link a job prints (``workflowType=machine_learning``);
- ``bare.png``: the experiment link without it (MLflow 3's GenAI overview, for contrast);
- ``job.png``: the job's parent run (its metrics: every method's accuracy);
- ``compare.png``: the compare view of its method runs;
- ``curves.png``: the select-on-source lam curves (artifact viewer), if that run exists.

Needs ``chromium`` (Debian: ``apt-get install chromium``). Prints each file and its URL.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]


def shoot(url: str, path: Path, *, size: str = "1600,1000", wait_ms: int = 25000) -> None:
    """One screenshot of ``url`` in a fresh profile, after ``wait_ms`` of virtual time."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium not found (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="raydapt-chromium-") as profile:
        subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={path}",
                        f"--window-size={size}", f"--virtual-time-budget={wait_ms}", url],
                       check=True, capture_output=True, timeout=300)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--experiment", required=True)
    ap.add_argument("--run-name", required=True, help="the job's run.name")
    ap.add_argument("--out", default="screens")
    ap.add_argument("--port", type=int, default=0, help="0: a free port")
    args = ap.parse_args()

    from mlflow.tracking import MlflowClient

    from raydapt.core.tracking import absolute_tracking_uri, job_links
    from raydapt.ops.ui import serve, stop

    uri = absolute_tracking_uri(args.tracking_uri)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    proc, base = serve(uri, port=args.port)
    try:
        links = job_links(uri, args.experiment, args.run_name, base=base)
        if "job" not in links:
            raise SystemExit(f"no run {args.run_name!r} in experiment {args.experiment!r}")
        eid = links["runs"].split("/experiments/")[1].split("/")[0]
        shots = {"runs": links["runs"], "bare": f"{base}/#/experiments/{eid}",
                 "job": links["job"], "compare": links.get("compare")}
        cl = MlflowClient(tracking_uri=uri)
        parent = links["job"].rsplit("/", 1)[1]
        sel = cl.search_runs([eid], filter_string=f"tags.mlflow.parentRunId = '{parent}' and "
                             "tags.mlflow.runName = 'select-on-source'")
        if sel:
            shots["curves"] = (f"{base}/#/experiments/{eid}/runs/{sel[0].info.run_id}/"
                               "artifacts/select-on-source-curves.png")
        for name, url in shots.items():
            if url:
                shoot(url, out / f"{name}.png")
                print(f"{out / name}.png  {url}")
    finally:
        stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
