#!/usr/bin/env bash
# Install Debian's PostgreSQL server binaries for the MLflow-on-PostgreSQL test
# (tests/tracking/test_mlflow_postgres.py, marker `postgres`). Called by .ci/run; needs root and
# apt (a bare Debian 12 machine gets PostgreSQL 15). No default cluster is created or started:
# the test initdb's its own in a temp dir on a free port. Does nothing if pg_ctl is present.
set -euo pipefail
if command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  echo "postgresql: already installed"
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "postgresql: not installed and not root with apt-get: the postgres test will skip"
  exit 0
fi
t=$(date +%s)
mkdir -p /etc/postgresql-common
echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold \
  postgresql >/dev/null
echo "postgresql: installed $(ls /usr/lib/postgresql) in $(( $(date +%s) - t ))s"
