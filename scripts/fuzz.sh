#!/usr/bin/env bash
# Runs every fuzz target in the module, each for FUZZTIME (default 30s).
# Targets are found, not listed: a new Fuzz function is fuzzed without
# touching this script. FUZZJOBS (default 1) targets run at once, each
# with its share of the CPUs. Each target's last progress line is printed
# at the end; the run fails if any target found a crasher.
set -euo pipefail
cd "$(dirname "$0")/.."
fuzztime=${FUZZTIME:-30s}
jobs=${FUZZJOBS:-1}
workers=$(( $(nproc) / jobs ))
workers=$(( workers < 1 ? 1 : workers ))
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
git ls-files -z '*_test.go' | xargs -0 grep -H -n '^func Fuzz[A-Za-z0-9_]*(' | sort |
  sed -E 's|^([^:]*)/[^/:]*:[0-9]+:func (Fuzz[A-Za-z0-9_]*)\(.*|./\1 \2|' >"$logs/targets"
if [[ ! -s $logs/targets ]]; then
  echo "fuzz: no fuzz targets found" >&2
  exit 1
fi
run() {
  local pkg=$1 name=$2 log=$logs/$2.log
  echo "fuzz: $pkg $name for $fuzztime"
  if go test -run '^$' -fuzz "^${name}\$" -fuzztime "$fuzztime" -parallel "$workers" "$pkg" >"$log" 2>&1; then
    echo "fuzz: $name passed: $(grep -o 'elapsed: [^,]*, execs: [0-9]*' "$log" | tail -1)"
  else
    cat "$log"
    echo "fuzz: $name FAILED"
    return 1
  fi
}
export -f run
export fuzztime workers logs
status=0
xargs -P "$jobs" -L 1 bash -c 'run "$@"' _ <"$logs/targets" || status=1
n=$(wc -l <"$logs/targets")
if ((status != 0)); then
  echo "fuzz: a target of $n failed" >&2
  exit 1
fi
echo "fuzz: $n targets, none failed"
