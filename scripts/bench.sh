#!/usr/bin/env bash
# Benchmark (not a test): what L402 costs in latency, against the offline lab.
#   1. a first paid fetch (`automaton l402 fetch`, credential bought)  vs  plain HTTP to the same URL + a direct
#      payment of the same amount (`automaton wallet pay`);
#   2. a cached-credential fetch                                       vs  plain HTTP to the same URL.
# Both sides go through the same kind of process (a CLI talking to the running agent, or curl), so the ratios say
# what the L402 round trips and checks add. Runs hyperfine (installed with apt when missing); results and the
# hyperfine JSON stay in the printed work dir. RUNS=N sets the runs per measurement (default 10); PROFILE=debug
# measures the debug build instead of the release one.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-10}
profile=${PROFILE:-release}
scripts/deps.sh
if ! command -v hyperfine >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends hyperfine
fi
command -v jq >/dev/null || { echo "bench.sh needs jq" >&2; exit 1; }
if [ "$profile" = release ]; then
  cargo build --release --locked -p automaton -p automaton-lab --bins
else
  cargo build --locked -p automaton -p automaton-lab --bins
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/automaton-bench.XXXXXX")
lab_pid=""; agent_pid=""
cleanup() {
  [ -n "$agent_pid" ] && { kill -TERM "$agent_pid" 2>/dev/null || true; wait "$agent_pid" 2>/dev/null || true; }
  [ -n "$lab_pid" ] && { kill -TERM "$lab_pid" 2>/dev/null || true; wait "$lab_pid" 2>/dev/null || true; }
}
trap cleanup EXIT
bin=$PWD/target/$profile

echo "==> lab in $work/lab" >&2
"$bin/automaton-lab" up --dir "$work/lab" >"$work/lab.log" 2>&1 &
lab_pid=$!
for _ in $(seq 1 480); do
  [ -f "$work/lab/lab.json" ] && break
  kill -0 "$lab_pid" 2>/dev/null || { tail -n 30 "$work/lab.log" >&2; exit 1; }
  sleep 0.5
done
lab=$work/lab/lab.json
control=$(jq -r .control_url "$lab")
api=$(jq -r '.l402_api_url // empty' "$lab")
[ -n "$api" ] || { echo "this lab has no l402_api_url" >&2; exit 1; }

export AUTOMATON_HOME=$work/agent
"$bin/automaton" setup --yes --name bench-agent --lab "$lab" >/dev/null
"$bin/automaton" run >"$work/agent.log" 2>&1 &
agent_pid=$!
"$bin/automaton" wallet balance --json >/dev/null   # waits for the node and the LSP
address=$("$bin/automaton" fund --json 2>/dev/null | jq -r .lightning_address)
echo "==> funding $address" >&2
curl -fsS -X POST "$control/lab/creator/pay-lnurl" -H 'content-type: application/json' \
  -d "{\"target\": \"$address\", \"sats\": 200000, \"comment\": \"bench\"}" >/dev/null
for _ in $(seq 1 120); do
  [ "$("$bin/automaton" wallet balance --json | jq .spendable_lightning_sats)" -gt 0 ] && break
  sleep 0.5
done

# One purchase tells the price; the direct payment pays the merchant the same amount.
"$bin/automaton" l402 forget --all 2>/dev/null
price_msat=$("$bin/automaton" l402 fetch "$api" --json | jq .paid_msat)
price_sats=$(( price_msat / 1000 ))
echo "==> the API costs $price_sats sats per credential" >&2
cat >"$work/pay.sh" <<EOF
#!/usr/bin/env bash
set -euo pipefail
curl -fsS -X POST '$control/lab/merchant/invoice' -H 'content-type: application/json' \
  -d '{"msat": $price_msat, "memo": "bench"}' | jq -r .bolt11 >'$work/invoice'
EOF
chmod +x "$work/pay.sh"

hyperfine --runs "$runs" --warmup 1 --export-json "$work/plain.json" -N \
  "curl -sS -o /dev/null $api"
hyperfine --runs "$runs" --export-json "$work/pay.json" --prepare "$work/pay.sh" \
  "$bin/automaton wallet pay \$(cat $work/invoice) --purpose bench"
hyperfine --runs "$runs" --export-json "$work/paid.json" --prepare "$bin/automaton l402 forget --all" \
  "$bin/automaton l402 fetch $api"
"$bin/automaton" l402 fetch "$api" >/dev/null
hyperfine --runs "$runs" --warmup 1 --export-json "$work/cached.json" -N \
  "$bin/automaton l402 fetch $api"

mean() { jq '.results[0].mean' "$1"; }
plain=$(mean "$work/plain.json"); pay=$(mean "$work/pay.json")
paid=$(mean "$work/paid.json"); cached=$(mean "$work/cached.json")
awk -v plain="$plain" -v pay="$pay" -v paid="$paid" -v cached="$cached" 'BEGIN {
  printf "plain HTTP                      %8.1f ms\n", plain * 1000
  printf "direct payment (wallet pay)     %8.1f ms\n", pay * 1000
  printf "first paid fetch (l402 fetch)   %8.1f ms\n", paid * 1000
  printf "cached-credential fetch         %8.1f ms\n", cached * 1000
  printf "first paid fetch / (plain + payment) = %.2f\n", paid / (plain + pay)
  printf "cached fetch / plain HTTP            = %.2f\n", cached / plain
}'
echo "hyperfine results in $work" >&2
