#!/usr/bin/env bash
# Builds Automaton-LN, starts the offline lab world (regtest chain, Lightning peers, scripted model), sets up one
# agent against it, runs a few turns, and shows what the agent did. Everything stays under a temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --release --locked --bin automaton --bin automaton-lab

work=$(mktemp -d "${TMPDIR:-/tmp}/automaton-demo.XXXXXX")
lab_pid=""
cleanup() {
  if [ -n "$lab_pid" ]; then kill -TERM "$lab_pid" 2>/dev/null || true; wait "$lab_pid" 2>/dev/null || true; fi
}
trap cleanup EXIT

echo "==> starting the lab in $work/lab (logs: $work/lab.log)" >&2
target/release/automaton-lab up --dir "$work/lab" >"$work/lab.log" 2>&1 &
lab_pid=$!
for _ in $(seq 1 240); do
  [ -f "$work/lab/lab.json" ] && break
  kill -0 "$lab_pid" 2>/dev/null || { echo "the lab exited early:" >&2; tail -n 30 "$work/lab.log" >&2; exit 1; }
  sleep 0.5
done
[ -f "$work/lab/lab.json" ] || { echo "the lab did not become ready" >&2; tail -n 30 "$work/lab.log" >&2; exit 1; }
cat "$work/lab/lab.json" >&2

export AUTOMATON_HOME="$work/agent"
echo "==> setting up an agent in $AUTOMATON_HOME" >&2
target/release/automaton setup --yes --name demo-agent --lab "$work/lab/lab.json"
echo "==> running 5 turns" >&2
target/release/automaton run --turns 5
echo "==> what it did" >&2
target/release/automaton logs
target/release/automaton status
