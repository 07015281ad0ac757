#!/usr/bin/env bash
# Set up and run the whole test suite. Fails when no test ran.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Free space the run takes from the temp dir's file system at its peak: 5.5 GiB measured (README, Tests),
# bundles in pytest's base dir plus AOTInductor libraries that stay mapped after their files are deleted.
NEED_GIB=10
tmp=${TMPDIR:-/tmp}
free_gib() { df -Pk "$1" | awk 'NR==2 {printf "%.1f", $4 / 1048576}'; }
free=$(free_gib "$tmp")
echo "test.sh: free disk before the run: $free GiB in $tmp (a run takes about 6 GiB there at its peak; warning below $NEED_GIB)"
if awk -v f="$free" -v n="$NEED_GIB" 'BEGIN {exit !(f < n)}'; then
  echo "test.sh: WARNING: less than $NEED_GIB GiB free in $tmp: tests that write bundles will fail with" \
       "'No space left on device'. Free space there or point TMPDIR at a bigger disk." >&2
fi
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" != 0 ]; then
  echo "test.sh: pytest exited $rc; free disk now: $(free_gib "$tmp") GiB in $tmp, $(free_gib .) GiB in $(pwd)" >&2
fi
if [ "$rc" = 5 ]; then
  echo "test.sh: pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
