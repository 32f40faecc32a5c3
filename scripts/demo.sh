#!/usr/bin/env bash
# Builds Automaton-LN, starts the offline lab world (regtest chain, Lightning peers, scripted model), sets up one
# agent against it, runs a few turns, and shows what the agent did. Everything stays under a temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
# PROFILE=debug reuses a test build (target/debug) instead of building release binaries.
profile=${PROFILE:-release}
if [ "$profile" = release ]; then
  cargo build --release --locked -p automaton -p automaton-lab --bins
else
  cargo build --locked -p automaton -p automaton-lab --bins
fi
bin="target/$profile"

work=$(mktemp -d "${TMPDIR:-/tmp}/automaton-demo.XXXXXX")
lab_pid=""
agent_pid=""
cleanup() {
  if [ -n "$agent_pid" ]; then kill -TERM "$agent_pid" 2>/dev/null || true; wait "$agent_pid" 2>/dev/null || true; fi
  if [ -n "$lab_pid" ]; then kill -TERM "$lab_pid" 2>/dev/null || true; wait "$lab_pid" 2>/dev/null || true; fi
}
trap cleanup EXIT

echo "==> starting the lab in $work/lab (logs: $work/lab.log)" >&2
$bin/automaton-lab up --dir "$work/lab" >"$work/lab.log" 2>&1 &
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
# The genesis prompt asks the lab's scripted model to give itself a heartbeat (lab-scenario: schedule).
genesis="$(cat genesis/prompt.md)
lab-scenario: schedule add lab_pulse 20s wake_agent"
$bin/automaton setup --yes --name demo-agent --lab "$work/lab/lab.json" --genesis-prompt "$genesis"
control=$(jq -r .control_url "$work/lab/lab.json")
echo "==> starting the agent: its node, HTTP face and Lightning address (log: $work/agent.log)" >&2
$bin/automaton run >"$work/agent.log" 2>&1 &
agent_pid=$!
$bin/automaton wallet balance --json >/dev/null   # waits for the node and its LSP
$bin/automaton fund
address=$($bin/automaton fund --json 2>/dev/null | jq -r .lightning_address)
echo "==> the creator pays $address 50,000 sats (LNURL-pay, with a comment)" >&2
curl -fsS -X POST "$control/lab/creator/pay-lnurl" -H 'content-type: application/json' \
  -d "{\"target\": \"$address\", \"sats\": 50000, \"comment\": \"welcome to the world\"}" >&2
echo >&2
for _ in $(seq 1 120); do
  [ "$($bin/automaton wallet balance --json | jq .spendable_lightning_sats)" -gt 0 ] && break
  sleep 0.5
done
echo "==> the creator pays an invoice of the agent's (wallet invoice) 20,000 sats" >&2
invoice=$($bin/automaton wallet invoice 20000 --memo "from the creator" --json | jq -r .bolt11)
curl -fsS -X POST "$control/lab/creator/pay" -H 'content-type: application/json' \
  -d "{\"bolt11\": \"$invoice\"}" >/dev/null
echo "==> the agent pays the lab merchant 5,000 sats (through its budget gate)" >&2
merchant=$(curl -fsS -X POST "$control/lab/merchant/invoice" -H 'content-type: application/json' \
  -d '{"msat": 5000000, "memo": "a lab service"}' | jq -r .bolt11)
$bin/automaton wallet pay "$merchant" --purpose "a lab service"
api=$(jq -r '.l402_api_url // empty' "$work/lab/lab.json")
if [ -n "$api" ]; then
  echo "==> the agent buys an L402 call from $api" >&2
  $bin/automaton l402 fetch "$api" --json
  echo "==> and again: the cached credential is sent, nothing is paid" >&2
  $bin/automaton l402 fetch "$api" --json
fi
face=$($bin/automaton status --json | jq -r .http.public_url)
echo "==> someone buys the agent's own paid service: $face/l402/status (21 sats, L402)" >&2
challenge=$(curl -s -o /dev/null -D - "$face/l402/status?nonce=demo" | tr -d '\r' | grep -i '^www-authenticate: L402 ')
macaroon=$(printf '%s' "$challenge" | sed -E 's/.*macaroon="([^"]+)".*/\1/')
bolt11=$(printf '%s' "$challenge" | sed -E 's/.*invoice="([^"]+)".*/\1/')
preimage=$(curl -fsS -X POST "$control/lab/creator/pay" -H 'content-type: application/json' \
  -d "{\"bolt11\": \"$bolt11\"}" | jq -r .preimage)
curl -fsS -H "Authorization: L402 $macaroon:$preimage" "$face/l402/status?nonce=demo" | jq '{signed_by, attestation: (.attestation | {name, tier, status, balance_sats, nonce})}'
$bin/automaton l402 sold
relay=$(jq -r '.relay_url // empty' "$work/lab/lab.json")
if [ -n "$relay" ]; then
  echo "==> its card on the lab's Nostr relay (NIP-89), and a second agent discovering it" >&2
  $bin/automaton card publish
  $bin/automaton card show
  AUTOMATON_HOME="$work/other" $bin/automaton setup --yes --name other-agent --lab "$work/lab/lab.json" >/dev/null
  AUTOMATON_HOME="$work/other" $bin/automaton discover
fi
if [ -n "$(jq -r '.lnvps_url // empty' "$work/lab/lab.json")" ]; then
  echo "==> the agent rents a VPS from the lab's LNVPS, paid over Lightning, and works on it" >&2
  $bin/automaton vps templates
  vm=$($bin/automaton vps create --json | jq -r .id)
  $bin/automaton vps list
  $bin/automaton exec --vps "$vm" -- 'echo "hello from $(hostname) as $(whoami) in $PWD"'
fi
echo "==> its receipts: every sat in and out, signed by its node key" >&2
$bin/automaton wallet receipts
$bin/automaton wallet receipts --json --limit 1 | jq '.[0]' >"$work/receipt.json"
$bin/automaton wallet verify-receipt "$work/receipt.json"
echo "==> its schedule: the agent added lab_pulse itself, a heartbeat that wakes it every 20 s" >&2
for _ in $(seq 1 90); do
  $bin/automaton logs --json --limit 50 | jq -e 'any(.[]; .input_source == "heartbeat")' >/dev/null && break
  sleep 1
done
$bin/automaton heartbeat list
echo "==> turns the heartbeat woke it for" >&2
$bin/automaton logs --json --limit 50 |
  jq -r '.[] | select(.input_source == "heartbeat") | "\(.started_at)  \(.input | gsub("\n"; " "))"'
echo "==> the change log: every change to its definition, by whom (revert any with automaton revert ID)" >&2
$bin/automaton logs --changes
kill -TERM "$agent_pid"; wait "$agent_pid" || true; agent_pid=""
echo "==> running 5 turns" >&2
$bin/automaton run --turns 5
model=$(jq -r '.l402_model_url // empty' "$work/lab/lab.json")
if [ -n "$model" ]; then
  echo "==> 2 more turns thinking on the lab's L402-paid model: each model call is paid over Lightning" >&2
  $bin/automaton -c "inference.base_url=$model" -c inference.auth=l402 run --turns 2
  $bin/automaton wallet receipts --json --limit 100 | jq -r '[.[] | select(.purpose // "" | startswith("inference"))] | "\(length) paid inference calls"'
fi
echo "==> what it did" >&2
$bin/automaton logs
$bin/automaton status
if [ -n "$(jq -r '.lnvps_url // empty' "$work/lab/lab.json")" ]; then
  echo "==> the agent spawns a child: it rents a VPS, installs itself there, funds the child with 15,000 sats" >&2
  # Funding a child is one payment above the default per-payment limit: this run allows it.
  $bin/automaton -c limits.per_payment_sats=30000 -c limits.hourly_sats=100000 run >>"$work/agent.log" 2>&1 &
  agent_pid=$!
  $bin/automaton wallet balance --json >/dev/null
  $bin/automaton -c limits.per_payment_sats=30000 spawn --name demo-child --fund-sats 15000 \
    --specialization "Answer questions about the lab world, for sats."
  echo "==> the family: the child runs on its own VPS with its own node and wallet" >&2
  $bin/automaton children
  $bin/automaton child show demo-child --cached
  child_home="$($bin/automaton children --json | jq -r '.[0].base_dir')/home"
  AUTOMATON_HOME="$child_home" $bin/automaton status
fi
