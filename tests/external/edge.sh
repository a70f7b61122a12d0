#!/usr/bin/env bash
# Edge hardening against a real `specter run` with Debian's attack and load tools:
#   1. slowhttptest -H (slow headers, slowloris)
#   2. slowhttptest -B (slow body, R-U-Dead-Yet)
#   3. h2load over HTTP/2 prior knowledge
# Passes when slowhttptest saw the service available throughout both attacks and the
# gateway closed every slow connection itself ("No open connections left"), and h2load
# finished with 0 failed, 0 errored and 0 timed-out requests.
#
# `specter demo` provides the backend (its development echo upstream, found through the
# demo's admin /config); the gateway under test is a separate `specter run` on a config
# written here: the demo gateway's own rate limits would turn a load test into a 429
# test. slowhttptest can add no header but `Cookie` (-j), so that config reads the API
# key from the `cookie` header (`[auth] header`), and h2load sends it there too.
#
# Loopback only; bounded (each tool under `timeout`, about 1 minute in all).
# Usage: tests/external/edge.sh        (SPECTER=path overrides the binary)
# Needs: slowhttptest, h2load (nghttp2-client), curl, jq, sha256sum.

set -uo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
specter="${SPECTER:-}"
if [[ -z "$specter" ]]; then
    if [[ -x "$root/target/release/specter" ]]; then
        specter="$root/target/release/specter"
    else
        specter="$root/target/debug/specter"
    fi
fi
for tool in "$specter" slowhttptest h2load curl jq sha256sum; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "edge.sh: missing $tool" >&2
        exit 2
    fi
done

work="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null
    done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Polls `curl URL` until it answers 200, for at most $2 seconds.
wait_ready() {
    local url="$1" deadline=$((SECONDS + $2))
    while ((SECONDS < deadline)); do
        [[ "$(curl -s -o /dev/null -w '%{http_code}' "$url")" == 200 ]] && return 0
        sleep 0.1
    done
    return 1
}

strip_colours() {
    sed 's/\x1b\[[0-9;]*[A-Za-z]//g'
}

echo "edge.sh: specter binary $specter"

# --- the backend: specter demo's development echo upstream -------------------------
"$specter" demo --port 0 >"$work/demo.out" 2>"$work/demo.err" &
pids+=($!)
demo_admin=""
for _ in $(seq 50); do
    demo_admin="$(grep -oE 'admin on http://[0-9.:]+' "$work/demo.out" | sed 's/admin on //')"
    [[ -n "$demo_admin" ]] && break
    sleep 0.1
done
if [[ -z "$demo_admin" ]]; then
    echo "FAIL: specter demo did not start"
    cat "$work/demo.err"
    exit 1
fi
echo_upstream="$(curl -s "$demo_admin/config" |
    jq -r '.environments[] | select(.name == "development") | .upstreams[0]')"
key="$(grep -oE 'spk_development_[A-Za-z0-9]+' "$work/demo.out" | head -1)"

# --- the gateway under test ----------------------------------------------------------
http_port="$(free_port)"
admin_port="$(free_port)"
gateway="http://127.0.0.1:$http_port"
cat >"$work/specter.toml" <<EOF
[listen]
http  = "127.0.0.1:$http_port"
admin = "127.0.0.1:$admin_port"

[limits]
header_read_timeout = "5s"
body_read_timeout   = "5s"

[auth]
header = "cookie"   # slowhttptest can only add a Cookie header

[environments.development]
upstream = "$echo_upstream"

[[environments.development.keys]]
id     = "edge"
sha256 = "$(printf '%s' "$key" | sha256sum | cut -d' ' -f1)"
EOF
"$specter" run --config "$work/specter.toml" 2>"$work/gateway.err" &
pids+=($!)
gateway_pid=$!
if ! wait_ready "http://127.0.0.1:$admin_port/readyz" 10; then
    echo "FAIL: specter run did not become ready"
    cat "$work/gateway.err"
    exit 1
fi
status="$(curl -s -o /dev/null -w '%{http_code}' -H "cookie: $key" "$gateway/hello")"
echo "edge.sh: gateway $gateway (upstream $echo_upstream) answers $status with the key"

failures=()

# --- slowhttptest ------------------------------------------------------------------------
# -c connections, -r per second, -i seconds between follow-ups (longer than the
# gateway's 5 s timeouts), -l test length, -p probe timeout.
slow() {
    local mode="$1" name="$2" log="$work/slow$1.log"
    timeout 45 slowhttptest "$mode" -c 500 -r 100 -i 8 -l 20 -p 3 -s 4096 \
        -j "$key" -u "$gateway/slow" >"$log" 2>&1
    local rc=$?
    local report
    report="$(strip_colours <"$log")"
    local yes no exit_status
    yes="$(grep -c 'service available:.*YES' <<<"$report")"
    no="$(grep -c 'service available:.*NO' <<<"$report")"
    exit_status="$(grep -A1 '^Exit status' <<<"$report" | tr -d '\n' | sed 's/Exit status: *//')"
    exit_status="${exit_status:-$(grep -oE 'Exit status:.*' <<<"$report" | sed 's/Exit status: *//')}"
    local ended
    ended="$(grep -oE 'Test ended on [0-9]+(st|nd|rd|th) second' <<<"$report" | tail -1)"
    echo "slowhttptest $mode ($name): rc=$rc, $ended, exit status: ${exit_status:-?}," \
        "service available YES in $yes reports, NO in $no"
    if ((rc != 0)) || ((no > 0)) || ((yes == 0)) ||
        ! grep -q 'No open connections left' <<<"$exit_status"; then
        failures+=("slowhttptest $mode ($name)")
        tail -25 <<<"$report"
    fi
}
slow -H "slow headers"
slow -B "slow body"

# What the gateway answered during the attacks (408 = slow body cut off, 401 would mean
# the key did not arrive and the attack tested nothing).
answered="$(curl -s "http://127.0.0.1:$admin_port/metrics" |
    grep -E '^specter_requests_total' | sed -E 's/.*status="([0-9]+)".* ([0-9.e+]+)$/\1: \2/' |
    tr '\n' ' ')"
echo "edge.sh: gateway answers so far by status: ${answered:-none}"
grep -q '408: ' <<<"$answered" || failures+=("no 408 for the slow bodies")

if ! kill -0 "$gateway_pid" 2>/dev/null; then
    failures+=("the gateway process died")
fi

# --- h2load ------------------------------------------------------------------------------
timeout 60 h2load -n 20000 -c 20 -m 10 -H "cookie: $key" "$gateway/hello" >"$work/h2load.log" 2>&1
rc=$?
requests="$(grep -E '^requests:' "$work/h2load.log")"
codes="$(grep -E '^status codes:' "$work/h2load.log")"
rate="$(grep -E '^finished in' "$work/h2load.log")"
echo "h2load: rc=$rc; $rate"
echo "h2load: $requests"
echo "h2load: $codes"
read -r succeeded failed errored timed_out < <(
    sed -E 's/.* ([0-9]+) succeeded, ([0-9]+) failed, ([0-9]+) errored, ([0-9]+) timeout.*/\1 \2 \3 \4/' <<<"$requests"
)
if ((rc != 0)) || [[ "${succeeded:-0}" != 20000 || "${failed:-1}" != 0 ||
    "${errored:-1}" != 0 || "${timed_out:-1}" != 0 ]]; then
    failures+=("h2load")
    tail -20 "$work/h2load.log"
fi

status="$(curl -s -o /dev/null -w '%{http_code}' -H "cookie: $key" "$gateway/hello")"
[[ "$status" == 200 ]] || failures+=("a request after everything answered $status")

if ((${#failures[@]} == 0)); then
    echo "PASS: slow headers, slow body and h2load (20000 requests, 0 failed)"
    exit 0
fi
echo "FAIL: ${failures[*]}"
echo "--- gateway log (last 20 lines)"
tail -20 "$work/gateway.err"
exit 1
