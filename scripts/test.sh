#!/usr/bin/env bash
# Runs every test of the workspace: the lab (chain, Lightning peers, scripted model) and the agent runtime.
# Lab-heavy test binaries share one lab world between their threads, so this uses `cargo test`, not nextest
# (which would start a world per test).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo test --workspace --locked --no-fail-fast "$@"
