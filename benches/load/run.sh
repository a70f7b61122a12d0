#!/usr/bin/env bash
# Whole-gateway load benchmark: specter vs nginx vs haproxy on this machine.
# Installs the peers and load tools when missing, builds specter in release, runs
# bench.py (arguments pass through, e.g. `--rounds 1 --duration 3 --scenarios small`).
#   benches/load/run.sh --ladder --memory-keys 1000000 --write BENCHMARKS.md
set -euo pipefail
cd "$(dirname "$0")/../.."

need=()
for tool in nginx:nginx haproxy:haproxy wrk:wrk h2load:nghttp2-client taskset:util-linux; do
  command -v "${tool%%:*}" >/dev/null || need+=("${tool##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
# The packaged nginx/haproxy services are not the ones measured.
systemctl stop nginx haproxy 2>/dev/null || true

# 10,000-connection scenarios need file descriptors for both ends.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo build --release --quiet --bin specter --example floor
exec python3 benches/load/bench.py "$@"
