#!/usr/bin/env bash
# Runs every fuzz target in the module, each for FUZZTIME (default 30s).
# Targets are found, not listed: a new Fuzz function is fuzzed without
# touching this script. Fails on the first target that finds a crasher.
set -euo pipefail
cd "$(dirname "$0")/.."
fuzztime=${FUZZTIME:-30s}
found=0
while IFS=: read -r file _ line; do
  name=$(sed -E 's/^func (Fuzz[A-Za-z0-9_]*)\(.*/\1/' <<<"$line")
  pkg=./$(dirname "$file")
  found=$((found + 1))
  echo "fuzz: $pkg $name for $fuzztime"
  go test -run '^$' -fuzz "^${name}\$" -fuzztime "$fuzztime" "$pkg"
done < <(git ls-files -z '*_test.go' | xargs -0 grep -H -n '^func Fuzz[A-Za-z0-9_]*(' | sort)
if ((found == 0)); then
  echo "fuzz: no fuzz targets found" >&2
  exit 1
fi
echo "fuzz: $found targets, none failed"
