"""The entrypoint that runs on the cluster: ``raydapt submit`` starts ``python -m
raydapt.ops.entrypoint`` as the Ray job. It runs the job YAML shipped (base64) in
``RAYDAPT_JOB_CONFIG_B64`` with ``raydapt run``, then logs the stages' wall times next to the
``plan.*`` estimates on the parent MLflow run. Its own module (not ``submit``), so the driver side
(cli -> cli_cluster -> submit) and the cluster side (entrypoint -> cli) form no import cycle.
"""

from __future__ import annotations

import base64
import os
import sys
import tempfile

from raydapt.cli import main as cli_main
from raydapt.ops.plan import record_actuals
from raydapt.ops.submit import ENV_CONFIG, ENV_PARENT


def main() -> int:
    """``python -m raydapt.ops.entrypoint``: run the job YAML shipped in RAYDAPT_JOB_CONFIG_B64."""
    text = os.environ.get(ENV_CONFIG)
    if text:
        text = base64.b64decode(text).decode()
    if not text:
        print(f"raydapt: error: {ENV_CONFIG} is not set (this entrypoint runs jobs sent by "
              "`raydapt submit`)", file=sys.stderr)
        return 2
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="raydapt-job-",
                                     delete=False) as f:
        f.write(text)
    print(f"raydapt: running submitted job {os.environ.get('RAYDAPT_SUBMISSION_ID', '?')} "
          f"(parent MLflow run {os.environ.get(ENV_PARENT, '-')})", flush=True)
    try:
        rc = cli_main(["run", f.name])
    finally:
        os.unlink(f.name)
    parent, uri = os.environ.get(ENV_PARENT), os.environ.get("MLFLOW_TRACKING_URI")
    if parent and uri:
        try:  # stage wall times next to the plan.* estimates on the parent run
            record_actuals(uri, parent)
        except Exception as exc:
            print(f"raydapt: warning: could not log actual stage seconds: {exc}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
