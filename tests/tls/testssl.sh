#!/usr/bin/env bash
# Offline TLS scan of a running specter https listener with Debian's `testssl`
# (package testssl.sh). Fails on any finding of severity LOW or above, except the
# cert_* findings a self-signed certificate is expected to raise.
set -euo pipefail
cd "$(dirname "$0")/../.."

command -v testssl >/dev/null || { echo "testssl not installed (apt-get install testssl.sh)"; exit 1; }
bin=${SPECTER_BIN:-target/debug/specter}
[ -x "$bin" ] || cargo build --quiet

work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$bin" certs dev --out "$work" >/dev/null
cat > "$work/specter.toml" <<TOML
[listen]
https = "127.0.0.1:$port"

[tls]
[[tls.certificates]]
cert = "$work/localhost.pem"
key  = "$work/localhost.key"

[environments.scan]
upstream = "http://127.0.0.1:9"
TOML
"$bin" run --config "$work/specter.toml" 2>"$work/specter.log" &
pid=$!
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done

timeout 300 testssl --quiet --warnings off --nodns none --color 0 -p -s -U \
  --jsonfile "$work/scan.json" "127.0.0.1:$port" >"$work/scan.txt" 2>&1 || true

python3 - "$work/scan.json" <<'PY'
import json, sys
findings = json.load(open(sys.argv[1]))
bad = [f for f in findings
       if f.get("severity") in ("LOW", "MEDIUM", "HIGH", "CRITICAL")
       and not f.get("id", "").startswith("cert_")]
for f in bad:
    print(f"FINDING {f['severity']}: {f['id']}: {f.get('finding')}")
print(f"testssl: {len(findings)} checks, {len(bad)} findings of severity LOW or above (cert_* excluded)")
sys.exit(1 if bad else 0)
PY
