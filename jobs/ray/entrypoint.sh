#!/bin/sh
# Ray job entrypoint for fer-batch: runs as the job's driver on the cluster (Ray sets
# RAY_ADDRESS for it, so `fer-batch process` joins that cluster instead of starting its own).
# Every argument is passed to `fer-batch process`; the Ray runner is forced on.
#
#   ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/ray/runtime_env.yaml \
#       -- sh jobs/ray/entrypoint.sh /data/videos --out s3://bucket/run1/report.parquet
#
# Exit codes are those of `fer-batch process`: 0 all inputs ok, 1 some input failed (see the
# .sources.parquet table), 2 usage or output error. Ray marks the job FAILED on non-zero.
set -eu
if [ -z "${RAY_ADDRESS:-}" ]; then
    echo "entrypoint.sh: RAY_ADDRESS is not set; submit this with 'ray job submit'" >&2
    exit 2
fi
# The job's working_dir (this repository) is the current directory: prefer its fer_batch.
if command -v fer-batch >/dev/null 2>&1; then
    exec fer-batch process "$@" --runner ray --quiet
fi
exec python -m fer_batch.cli process "$@" --runner ray --quiet
