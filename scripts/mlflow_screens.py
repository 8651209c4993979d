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

docs/img/mlflow-runs-link.png, mlflow-job-metrics.png and mlflow-lambda-curves.png are crops of
runs.png, job.png and curves.png for this tiny SimDA job (the first 120 rows of
amazon/books.jsonl as src.jsonl, the first 160 of kitchen.jsonl as tgt.jsonl; ~18 min on the
loaded 2-core dev machine), run with ``raydapt run job.yaml``::

    method: simda
    run: {name: books-to-kitchen-tiny, output_dir: /tmp/demo/runs, cache_dir: /tmp/demo/cache}
    tracking: {uri: "sqlite:////tmp/demo/mlruns.db", artifact_location: /tmp/demo/art}
    ray: {num_cpus: 2, progress: false}
    data: {root: /tmp/demo, source: {path: src.jsonl}, target: {path: tgt.jsonl}}
    teacher: {text_max_tokens: 48, demo_max_tokens: 24,
              pool: {concurrency: 1, num_cpus: 1, batch_size: 8}}
    annotate: {k: 8, select_on_source: true, k_grid: [4, 8, 16], tau_grid: [0.3, 1.0],
               baselines: [zero_shot, knn]}
    distill: {variants: [kl_sim, source_only], epochs: 2, batch_size: 8, max_length: 48,
              num_workers: 1, cpus_per_worker: 1}

(its experiment is ``raydapt``: a ``tracking`` section without ``experiment``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
    fds 3 and 4, NUL-separated JSON; no extra package). A screenshot is taken once the page
    shows a given text, so a slow machine gets a rendered page, not MLflow's loading
    skeleton."""

    def __init__(self) -> None:
        browser = shutil.which("chromium") or shutil.which("chromium-browser")
        if browser is None:
            raise SystemExit("chromium not found (apt-get install chromium)")
        self._profile = tempfile.TemporaryDirectory(prefix="raydapt-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def fds() -> None:  # the child's fd 3 reads our commands, fd 4 writes its answers
            a, b = os.dup(to_child_r), os.dup(from_child_w)  # (a pipe may already be 3 or 4)
            os.dup2(a, 3)  # dup2 makes them inheritable
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [browser, *FLAGS, f"--user-data-dir={self._profile.name}",
             "--remote-debugging-pipe", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=open(os.environ.get("CHROMIUM_LOG", os.devnull), "w"),
            preexec_fn=fds,
            close_fds=False, start_new_session=True)
        os.close(to_child_r)
        os.close(from_child_w)
        self._id, self._buf = 0, b""

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def shoot(self, url: str, path: Path, *, wait_for: str, width: int = 1600,
              height: int = 1000, timeout: float = 240.0) -> bool:
        """Open ``url`` in a fresh tab, wait until its text contains ``wait_for`` (then 3 s
        for charts), save a PNG. Returns whether the text appeared."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        s = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", s, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)
        self.send("Page.enable", s)
        self.send("Page.navigate", s, url=url)
        t0, seen = time.time(), False
        while time.time() - t0 < timeout:
            r = self.send("Runtime.evaluate", s, returnByValue=True, expression=(
                f"!!document.body && document.body.innerText.includes({json.dumps(wait_for)})"))
            if r.get("result", {}).get("value"):
                seen = True
                break
            time.sleep(1)
        time.sleep(3)
        data = self.send("Page.captureScreenshot", s, format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        self.send("Target.closeTarget", targetId=target)
        return seen

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
        os.close(self._to_child)
        os.close(self._from_child)
        self._profile.cleanup()


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
        # (url, text to wait for, window height): the job and compare pages are tall so that
        # their metrics tables (each method's accuracy) are in the picture
        shots = {"runs": (links["runs"], args.run_name, 900),
                 "bare": (f"{base}/#/experiments/{eid}", "Traces", 900),
                 "job": (links["job"], "acc.", 1900),
                 "compare": (links.get("compare"), "accuracy", 2300)}
        cl = MlflowClient(tracking_uri=uri)
        parent = links["job"].split("?")[0].rsplit("/", 1)[1]
        sel = cl.search_runs([eid], filter_string=f"tags.mlflow.parentRunId = '{parent}' and "
                             "tags.mlflow.runName = 'select-on-source'")
        if sel:
            shots["curves"] = (f"{base}/#/experiments/{eid}/runs/{sel[0].info.run_id}/"
                               "artifacts/select-on-source-curves.png?workflowType=machine_learning",
                               "curves.png", 700)
        browser = Browser()
        try:
            for name, (url, wait_for, height) in shots.items():
                if url:
                    ok = browser.shoot(url, out / f"{name}.png", wait_for=wait_for,
                                       width=1400, height=height)
                    print(f"{out / name}.png  {'' if ok else '(text not seen) '}{url}")
        finally:
            browser.close()
    finally:
        stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
