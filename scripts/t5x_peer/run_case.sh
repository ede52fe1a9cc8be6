#!/bin/bash
# Usage: ./run_case.sh CASE [CASE...]  -- runs each case in its own process, sequentially; logs to logs/CASE.log
cd "$(dirname "$0")" && mkdir -p logs
export JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 ALLOW_MULTIPLE_LIBTPU_LOAD=1
for c in "$@"; do
  /usr/bin/time -v python aot_t5x.py "$c" > "logs/$c.log" 2>&1
  grep -E "^RESULT|^ERROR|Maximum resident" "logs/$c.log"
done
