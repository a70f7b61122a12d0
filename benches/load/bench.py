#!/usr/bin/env python3
"""Whole-gateway load benchmark: specter against nginx and haproxy on this machine.

Layout (2 cores): the proxy under test alone on CPU 1, the load generator and the
upstream (nginx answering 200 "ok") on CPU 0. Every proxy gets the same request bytes
(the API key header is sent to all). Targets alternate within each round; ratios are
computed per round and the median is reported, because the machine is shared and noisy.

A round counts only when the proxy under test was busy >= 95% of the wall time (it was
the bottleneck) and other processes took < 10% of the machine; otherwise it is redone
(up to twice) and then reported as noisy.

Run through run.sh, which installs the peers and builds specter in release.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
KEY = "spk_bench_0123456789abcdefghijklmnopqrstu"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def render(template, values):
    text = open(os.path.join(HERE, template)).read()
    for k, v in values.items():
        text = text.replace(f"@{k}@", str(v))
    return text


def cpu_times():
    """Per-CPU (busy, total) jiffies from /proc/stat."""
    out = {}
    for line in open("/proc/stat"):
        m = re.match(r"cpu(\d+) (.*)", line)
        if m:
            f = [int(x) for x in m.group(2).split()]
            idle = f[3] + f[4]
            out[int(m.group(1))] = (sum(f) - idle, sum(f))
    return out


def proc_times(pids):
    """(user, system) CPU seconds summed over processes (all their threads)."""
    user = system = 0
    for pid in pids:
        try:
            f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            user, system = user + int(f[11]), system + int(f[12])
        except OSError:
            pass
    return user / CLK_TCK, system / CLK_TCK


def proc_cpu(pids):
    """utime+stime (seconds) summed over processes and their children threads."""
    return sum(proc_times(pids))


def vm(pid, field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])  # KiB
    return 0


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


class Stack:
    """The upstream and the three proxies, started once for the whole run."""

    def __init__(self, work, specter_bin, floor_bin):
        self.work = work
        self.procs = {}
        p = {name: free_port() for name in [
            "UPSTREAM_PORT", "UPSTREAM_H2C_PORT", "NGINX_PORT", "NGINX_H2C_PORT", "NGINX_TLS_PORT",
            "HAPROXY_PORT", "HAPROXY_H2C_PORT", "HAPROXY_TLS_PORT", "FLOOR_PORT", "FLOOR_H2C_PORT",
            "RAWFLOOR_H2C_PORT", "CONTRACT_H2C_PORT", "SPECTER_PORT", "SPECTER_TLS_PORT", "SPECTER_ADMIN_PORT"]}
        p["WORK"] = work
        p["KEY_SHA256"] = hashlib.sha256(KEY.encode()).hexdigest()
        self.ports = p
        self.bin = specter_bin
        subprocess.run([specter_bin, "certs", "dev", "--out", work], check=True, capture_output=True)
        with open(os.path.join(work, "localhost-combined.pem"), "w") as f:
            f.write(open(os.path.join(work, "localhost.pem")).read())
            f.write(open(os.path.join(work, "localhost.key")).read())
        for d in ["upstream-body", "nginx-body", "nginx-proxy"]:
            os.makedirs(os.path.join(work, d), exist_ok=True)
        for name in ["nginx-upstream.conf", "nginx-proxy.conf", "haproxy.cfg", "specter.toml"]:
            with open(os.path.join(work, name), "w") as f:
                f.write(render(name, p))
        self.start("upstream", ["taskset", "-c", "0", "nginx", "-p", work, "-c", f"{work}/nginx-upstream.conf"])
        self.start("nginx", ["taskset", "-c", "1", "nginx", "-p", work, "-c", f"{work}/nginx-proxy.conf"])
        self.start("haproxy", ["taskset", "-c", "1", "haproxy", "-db", "-f", f"{work}/haproxy.cfg"])
        self.floor_bin = floor_bin
        self.start("floor", ["taskset", "-c", "1", floor_bin, "proxy", f"127.0.0.1:{p['FLOOR_PORT']}",
                             f"127.0.0.1:{p['UPSTREAM_PORT']}"])
        # HTTP/2 floors: hyper's server with hyper's client, with a raw exchange, and
        # with the raw exchange plus the fields specter's contract sends.
        for name, mode, port in (("floor-h2", "h2proxy", "FLOOR_H2C_PORT"),
                                 ("rawfloor-h2", "h2rawproxy", "RAWFLOOR_H2C_PORT"),
                                 ("contract-h2", "h2rawcontract", "CONTRACT_H2C_PORT")):
            self.start(name, ["taskset", "-c", "1", floor_bin, mode, f"127.0.0.1:{p[port]}",
                              f"127.0.0.1:{p['UPSTREAM_PORT']}"])
        self.start_specter(f"{work}/specter.toml")
        for port in ["UPSTREAM_PORT", "NGINX_PORT", "HAPROXY_PORT", "FLOOR_PORT", "FLOOR_H2C_PORT",
                     "RAWFLOOR_H2C_PORT", "CONTRACT_H2C_PORT", "SPECTER_PORT"]:
            wait_port(p[port])

    def start(self, name, cmd, env=None):
        # Logs go to a folder of their own: specter watches its config's folder, and
        # every write to a file there (an access log line) would wake its watcher.
        os.makedirs(os.path.join(self.work, "logs"), exist_ok=True)
        log = open(os.path.join(self.work, "logs", f"{name}.log"), "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)

    def start_specter(self, config, log="warn"):
        env = dict(os.environ, TOKIO_WORKER_THREADS="1", RUST_LOG=log)
        cmd = ["taskset", "-c", "1", self.bin, "--log-format", "json", "run", "--config", config]
        self.start("specter", cmd, env=env)
        wait_port(self.ports["SPECTER_ADMIN_PORT"], timeout=300)

    def start_rung(self, name, text, log, binary):
        """Another specter on CPU 1, on ports of its own, for one ladder rung."""
        for port in ("SPECTER_PORT", "SPECTER_TLS_PORT", "SPECTER_ADMIN_PORT"):
            text = text.replace(f":{self.ports[port]}\"", f":{free_port()}\"")
        port = int(re.search(r'^http\s*=\s*"127.0.0.1:(\d+)"', text, re.M).group(1))
        admin = int(re.search(r'^admin\s*=\s*"127.0.0.1:(\d+)"', text, re.M).group(1))
        path = os.path.join(self.work, f"rung-{name}.toml")
        with open(path, "w") as f:
            f.write(text)
        env = dict(os.environ, TOKIO_WORKER_THREADS="1", RUST_LOG=log)
        self.start(f"rung-{name}", ["taskset", "-c", "1", binary, "--log-format", "json", "run", "--config", path], env=env)
        wait_port(admin, timeout=300)
        wait_port(port)
        return port

    def restart_specter(self, config, log="warn"):
        self.stop("specter")
        self.start_specter(config, log)
        wait_port(self.ports["SPECTER_PORT"])

    def start_redis(self):
        """A redis-server on CPU 0 for fleet mode; returns its URL (None if not installed)."""
        if not shutil.which("redis-server"):
            return None
        port = free_port()
        self.start("redis", ["taskset", "-c", "0", "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no"])
        wait_port(port)
        return f"redis://127.0.0.1:{port}/0"

    def pids(self, name):
        """The processes doing the work: nginx's worker(s), else the process itself."""
        pid = self.procs[name].pid
        if name in ("nginx", "upstream"):
            return children(pid) or [pid]
        if name in ("haproxy",):
            return [pid] + children(pid)
        return [pid]

    def stop(self, name):
        proc = self.procs.pop(name, None)
        if proc and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self):
        for name in list(self.procs):
            self.stop(name)


def wrk(url, conns, duration, script=None, headers=()):
    cmd = ["taskset", "-c", "0", "wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", "-H", f"x-api-key: {KEY}"]
    for h in headers:
        cmd += ["-H", h]
    if script:
        cmd += ["-s", script]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=duration + 60).stdout

    def latency(label):
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)", out, re.M)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": float(rps.group(1)) if rps else 0.0,
        "p50": latency("50"),
        "p99": latency("99"),
        "non2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
    }


def h2load(url, duration, conns=16, streams=16):
    cmd = ["taskset", "-c", "0", "h2load", "-D", str(duration), "-c", str(conns), "-m", str(streams),
           "-t", "1", "-H", f"x-api-key: {KEY}", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60).stdout
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    lat = re.search(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)", out)
    status = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    unit = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    mean = float(lat.group(5)) * unit[lat.group(6)] if lat else float("nan")
    return {
        "rps": float(rps.group(1)) if rps else 0.0,
        "p50": mean,  # h2load reports min/max/mean, not percentiles: mean shown as p50
        "p99": float(lat.group(3)) * unit[lat.group(4)] if lat else float("nan"),  # max
        "non2xx": sum(int(status.group(i)) for i in (2, 3, 4)) if status else 0,
        "socket_errors": "",
    }


def measure(stack, target, run):
    """Runs one load test against `target` and samples CPU around it."""
    proxy = None if target == "direct" else target
    pids = stack.pids(proxy) if proxy else []
    ours = stack.pids("upstream") + pids
    cpu0 = cpu_times()
    user0, sys0 = proc_times(pids)
    ours0 = proc_cpu(ours)
    start = time.time()
    result = run()
    wall = time.time() - start
    cpu1 = cpu_times()
    user1, sys1 = proc_times(pids)
    proxy_cpu = (user1 - user0) + (sys1 - sys0)
    served = result["rps"] * wall
    busy = {c: (cpu1[c][0] - cpu0[c][0]) / max(1, cpu1[c][1] - cpu0[c][1]) for c in cpu1}
    machine_busy = sum(cpu1[c][0] - cpu0[c][0] for c in cpu1) / CLK_TCK
    # wrk's own CPU is not sampled; it runs on CPU 0, so CPU 0's busy time covers it.
    others = machine_busy - (proc_cpu(ours) - ours0) - busy.get(0, 0) * wall
    result.update({
        "target": target,
        "wall": wall,
        "proxy_cpu": proxy_cpu / wall if proxy else None,
        "cpu0_busy": busy.get(0, 0.0),
        "cpu1_busy": busy.get(1, 0.0),
        "others": max(0.0, others) / (wall * len(cpu1)),
        "req_per_cpu_s": served / proxy_cpu if proxy and proxy_cpu > 0 else None,
        # The proxy's CPU per request, split as the kernel accounts it (nanoseconds).
        "user_ns": (user1 - user0) / served * 1e9 if proxy and served else None,
        "sys_ns": (sys1 - sys0) / served * 1e9 if proxy and served else None,
    })
    return result


def valid(r):
    """The proxy under test was the bottleneck: busy >= 95% of the time while CPU 0 (wrk
    and the upstream) had headroom, and the rest of the machine stayed quiet."""
    if r["proxy_cpu"] is not None and (r["proxy_cpu"] < 0.95 or r["cpu0_busy"] >= 0.95):
        return False
    return r["others"] < 0.10


def scenarios(stack, work):
    p = stack.ports
    post = os.path.join(work, "post64k.lua")
    with open(post, "w") as f:
        f.write('wrk.method = "POST"\nwrk.body = string.rep("a", 65536)\n'
                'wrk.headers["Content-Type"] = "application/octet-stream"\n')
    plain = {"direct": p["UPSTREAM_PORT"], "floor": p["FLOOR_PORT"], "nginx": p["NGINX_PORT"],
             "haproxy": p["HAPROXY_PORT"], "specter": p["SPECTER_PORT"]}
    tls = {"nginx": p["NGINX_TLS_PORT"], "haproxy": p["HAPROXY_TLS_PORT"], "specter": p["SPECTER_TLS_PORT"]}
    h2c = {"direct": p["UPSTREAM_H2C_PORT"], "floor-h2": p["FLOOR_H2C_PORT"],
           "rawfloor-h2": p["RAWFLOOR_H2C_PORT"], "contract-h2": p["CONTRACT_H2C_PORT"],
           "nginx": p["NGINX_H2C_PORT"],
           "haproxy": p["HAPROXY_H2C_PORT"], "specter": p["SPECTER_PORT"]}
    return {
        "small": ("small GET, HTTP/1.1 keep-alive, 64 connections", plain,
                  lambda port, d: wrk(f"http://127.0.0.1:{port}/", 64, d)),
        "post64k": ("64 KiB POST bodies, 64 connections", plain,
                    lambda port, d: wrk(f"http://127.0.0.1:{port}/", 64, d, script=post)),
        "conns1000": ("small GET, 1,000 keep-alive connections", plain,
                      lambda port, d: wrk(f"http://127.0.0.1:{port}/", 1000, d)),
        "https": ("HTTPS keep-alive, 64 connections", tls,
                  lambda port, d: wrk(f"https://127.0.0.1:{port}/", 64, d)),
        "handshakes": ("new TLS connection per request, 32 connections", tls,
                       lambda port, d: wrk(f"https://127.0.0.1:{port}/", 32, d, headers=["Connection: close"])),
        "h2": ("HTTP/2 prior knowledge, 16 connections x 16 streams (h2load)", h2c,
               lambda port, d: h2load(f"http://127.0.0.1:{port}/", d)),
    }


def run_scenario(stack, name, desc, targets, runner, rounds, duration):
    per_round = []
    for r in range(rounds):
        order = list(targets)
        order = order[r % len(order):] + order[:r % len(order)]
        for attempt in range(3):
            results = {t: measure(stack, t, lambda: runner(targets[t], duration)) for t in order}
            if all(valid(x) for x in results.values()) or attempt == 2:
                break
            print(f"  round {r + 1}: noisy or proxy not saturated, redoing", file=sys.stderr)
        for x in results.values():
            x["valid"] = valid(x)
        per_round.append(results)
        line = "  ".join(f"{t} {x['rps']:.0f}/s{'' if x['valid'] else '*'}" for t, x in results.items())
        print(f"  [{name}] round {r + 1}: {line}", file=sys.stderr)
    return summarize(name, desc, per_round)


def median(values):
    values = [v for v in values if v is not None and v == v]
    return statistics.median(values) if values else float("nan")


def summarize(name, desc, per_round):
    targets = list(per_round[0])
    rows = {}
    for t in targets:
        rs = [r[t] for r in per_round]
        rows[t] = {
            "rps": median(x["rps"] for x in rs),
            "p50": median(x["p50"] for x in rs),
            "p99": median(x["p99"] for x in rs),
            "req_per_cpu_s": median(x["req_per_cpu_s"] for x in rs),
            "user_ns": median(x["user_ns"] for x in rs),
            "sys_ns": median(x["sys_ns"] for x in rs),
            "non2xx": sum(x["non2xx"] for x in rs),
            "valid_rounds": sum(1 for x in rs if x["valid"]),
        }
    ratios = {}
    for peer in ("nginx", "haproxy"):
        if peer in targets and "specter" in targets:
            ratios[f"specter/{peer} throughput"] = median(r["specter"]["rps"] / r[peer]["rps"] for r in per_round if r[peer]["rps"])
            ratios[f"specter/{peer} p99"] = median(r["specter"]["p99"] / r[peer]["p99"] for r in per_round if r[peer]["p99"])
            # Requests per CPU-second of the proxy: its efficiency, which still compares
            # when CPU 0 caps the throughput of the fastest proxies.
            ratios[f"specter/{peer} requests per CPU-second"] = median(
                r["specter"]["req_per_cpu_s"] / r[peer]["req_per_cpu_s"] for r in per_round
                if r["specter"]["req_per_cpu_s"] and r[peer]["req_per_cpu_s"])
    for floor in (t for t in targets if "floor" in t or "contract" in t):
        # The floor is a hyper proxy with nothing else: specter's own cost over hyper,
        # and what hyper alone reaches against the other proxies.
        if "specter" in targets:
            ratios[f"specter/{floor} CPU per request"] = median(
                r[floor]["req_per_cpu_s"] / r["specter"]["req_per_cpu_s"] for r in per_round
                if r["specter"]["req_per_cpu_s"] and r[floor]["req_per_cpu_s"])
        for peer in (t for t in ("nginx", "haproxy") if t in targets):
            ratios[f"{floor}/{peer} requests per CPU-second"] = median(
                r[floor]["req_per_cpu_s"] / r[peer]["req_per_cpu_s"] for r in per_round
                if r[floor]["req_per_cpu_s"] and r[peer]["req_per_cpu_s"])
    if "direct" in targets:
        for t in targets:
            if t != "direct":
                ratios[f"{t}/direct throughput"] = median(r[t]["rps"] / r["direct"]["rps"] for r in per_round if r["direct"]["rps"])
    return {"name": name, "desc": desc, "rounds": len(per_round), "rows": rows, "ratios": ratios}


def redis_calls(url):
    """Round trips the gateway made to Redis (scripts, script loads, connection set-up),
    from INFO commandstats; the commands a script runs inside Redis are no round trips."""
    port = url.rsplit(":", 1)[1].split("/")[0]
    out = subprocess.run(["redis-cli", "-p", port, "INFO", "commandstats"], capture_output=True, text=True).stdout
    sent = ("cmdstat_eval", "cmdstat_script", "cmdstat_client", "cmdstat_hello")
    return sum(int(m.group(1)) for line in out.splitlines() if line.startswith(sent)
               for m in [re.search(r"calls=(\d+)", line)] if m)


def ladder_rungs(stack, work, baseline_bin=None):
    """(key, label, config text, RUST_LOG, binary) per rung: the floor, then specter
    adding one feature at a time, then the variants measured against the full path."""
    base = open(os.path.join(work, "specter.toml")).read()
    head, _, _ = base.partition("[environments.bench.rate_limit]")
    key_block = base[base.index("[[environments.bench.keys]]"):]
    limits = base[base.index("[environments.bench.rate_limit]"):base.index("[environments.bench.policy]")]
    policy = base[base.index("[environments.bench.policy]"):base.index("[[environments.bench.keys]]")]
    tiny = "[environments.bench.rate_limit]\nper_key = { requests = 1, per = \"1h\" }\n\n"
    full = head + limits + policy + key_block
    # The trace collector is the nginx upstream (it answers POST /v1/traces with 405),
    # so every batch is still encoded and sent.
    collector = f'http://127.0.0.1:{stack.ports["UPSTREAM_PORT"]}'
    tracing = lambda ratio: f'[tracing]\notlp = "{collector}"\nsample_ratio = {ratio}\n\n'
    rungs = [
        ("floor", "floor: hyper server + hyper client, no gateway logic", None, None, None),
        ("rawfloor", "floor, its upstream exchange in the request's own task (floor rawproxy)", None, None,
         "rawproxy"),
        ("contract", "raw floor + the fields specter's contract sends (floor rawcontract)", None, None,
         "rawcontract"),
        ("key", "specter: one key, no limits, no policy", head + key_block, "warn", stack.bin),
        ("limits", "+ rate limits, per key and total (never triggered)", head + limits + key_block, "warn", stack.bin),
        ("policy", "+ policy (the full hot path; trace context on, export off)", full, "warn", stack.bin),
        ("log", "+ JSON access log (RUST_LOG=info, to a file)", full, "info", stack.bin),
    ]
    redis = stack.start_redis()
    if redis:
        store = f'[rate_limit_store]\nredis = "{redis}"\ntimeout = "20ms"\n'
        rungs.append(("fleet", "full hot path + fleet mode, exact (limits in Redis)", store + 'mode = "exact"\n\n' + full, "warn", stack.bin))
        rungs.append(("lease", "full hot path + fleet mode, lease (5% batches)", store + 'mode = "lease"\n\n' + full, "warn", stack.bin))
    rungs += [
        ("otlp0", "full hot path + [tracing] otlp, sample_ratio = 0.0", tracing("0.0") + full, "warn", stack.bin),
        ("otlp1", "full hot path + [tracing] otlp, sample_ratio = 1.0", tracing("1.0") + full, "warn", stack.bin),
        ("429", "429 path (every request rate-limited)", head + tiny + key_block, "warn", stack.bin),
    ]
    if baseline_bin:
        rungs.append(("baseline", f"full hot path, baseline binary {baseline_bin}", full, "warn", baseline_bin))
    return rungs, redis


def ladder(stack, work, rounds, duration, only=None, baseline_bin=None):
    """Every rung runs at once as its own process on CPU 1 (an idle one costs nothing);
    rounds alternate over them, rotated each round, so the host's drift hits every rung
    alike. Reports CPU per request (user and system, from /proc) as medians of rounds."""
    rungs, redis = ladder_rungs(stack, work, baseline_bin)
    if only:
        rungs = [r for r in rungs if r[0] in only]
    ports = {}
    for key, _, text, log, binary in rungs:
        if binary in ("rawproxy", "rawcontract"):
            ports[key] = free_port()
            stack.start(f"rung-{key}", ["taskset", "-c", "1", stack.floor_bin, binary,
                                        f"127.0.0.1:{ports[key]}", f"127.0.0.1:{stack.ports['UPSTREAM_PORT']}"])
            wait_port(ports[key])
            continue
        if text is None:
            ports[key] = stack.ports["FLOOR_PORT"]
            continue
        ports[key] = stack.start_rung(key, text, log, binary)
    per = {key: [] for key, *_ in rungs}
    calls = {}
    for r in range(rounds):
        order = rungs[r % len(rungs):] + rungs[:r % len(rungs)]
        for key, label, text, *_ in order:
            fleet = text is not None and "[rate_limit_store]" in text
            calls0 = redis_calls(redis) if fleet else None
            url = f"http://127.0.0.1:{ports[key]}/"
            x = measure(stack, "floor" if key == "floor" else f"rung-{key}", lambda: wrk(url, 64, duration))
            x["valid"] = valid(x)
            per[key].append(x)
            if fleet:
                calls.setdefault(key, []).append((redis_calls(redis) - calls0) / max(x["rps"] * x["wall"], 1))
            print(f"  [ladder] round {r + 1} {key}: {x['rps']:.0f}/s, "
                  f"{x['user_ns'] or 0:.0f} + {x['sys_ns'] or 0:.0f} ns/request{'' if x['valid'] else ' *'}",
                  file=sys.stderr)
    for key, *_ in rungs:
        if key != "floor":
            stack.stop(f"rung-{key}")
    out, previous, floor, contract = [], None, None, None
    for key, label, *_ in rungs:
        rs = per[key]
        row = {"key": key, "rung": label, "rps": median(x["rps"] for x in rs),
               "p99": median(x["p99"] for x in rs), "req_per_cpu_s": median(x["req_per_cpu_s"] for x in rs),
               "user_ns": median(x["user_ns"] for x in rs), "sys_ns": median(x["sys_ns"] for x in rs),
               "total_ns": median(x["user_ns"] + x["sys_ns"] for x in rs if x["user_ns"] is not None),
               "valid_rounds": sum(1 for x in rs if x["valid"]), "rounds": len(rs)}
        if key in calls:
            row["rung"] += f" ({median(calls[key]):.3f} Redis calls/request)"
        if key == "floor":
            floor = row
        if key == "contract":
            contract = row
        # "Added" is against the rung above for the feature steps, against the full
        # hot path for the variants listed after it.
        ref = previous if key in ("key", "limits", "policy", "log") else out_row(out, "policy")
        if ref:
            row["added_user_ns"] = row["user_ns"] - ref["user_ns"]
            row["added_sys_ns"] = row["sys_ns"] - ref["sys_ns"]
        if floor and key != "floor":
            row["x_floor"] = row["total_ns"] / floor["total_ns"]
        # specter over the contract floor: what its own checks and plumbing cost.
        if contract and key not in ("floor", "rawfloor", "contract"):
            row["x_contract"] = row["total_ns"] / contract["total_ns"]
        out.append(row)
        previous = row
    return out


def paired(stack, work, names, rounds, duration, h2=False, baseline_bin=None):
    """Two targets loaded at once, each by its own client on CPU 0, both proxies on CPU 1,
    for `rounds` rounds: the host's drift then hits both alike, which alternating rounds
    cannot promise on a shared machine. Sharing the CPU adds the same cache traffic to
    both, which pulls ratios towards 1. Returns the text to print: CPU per request of
    each (from /proc) and the second's over the first's per round."""
    if len(names) != 2:
        sys.exit("--paired takes two targets: A,B")
    full = open(os.path.join(work, "specter.toml")).read()
    # Targets the stack runs already, and the HTTP/1 floors started for this A/B only.
    running = {"floor": "FLOOR_PORT", "floor-h2": "FLOOR_H2C_PORT", "rawfloor-h2": "RAWFLOOR_H2C_PORT",
               "contract-h2": "CONTRACT_H2C_PORT", "specter": "SPECTER_PORT",
               "nginx": "NGINX_H2C_PORT" if h2 else "NGINX_PORT",
               "haproxy": "HAPROXY_H2C_PORT" if h2 else "HAPROXY_PORT"}
    started = {"rawfloor": "rawproxy", "contract": "rawcontract"}
    targets = []
    for name in names:
        if name in ("floor", *started) and h2:
            sys.exit(f"--paired: {name} is an HTTP/1 floor: with --h2, use {name}-h2")
        if name.endswith("-h2") and not h2:
            sys.exit(f"--paired: {name} is an HTTP/2 floor: add --h2")
        if name in running:
            targets.append((name, name, stack.ports[running[name]]))
        elif name in started:
            port = free_port()
            stack.start(f"paired-{name}", ["taskset", "-c", "1", stack.floor_bin, started[name],
                                           f"127.0.0.1:{port}", f"127.0.0.1:{stack.ports['UPSTREAM_PORT']}"])
            wait_port(port)
            targets.append((name, f"paired-{name}", port))
        elif name == "baseline" and baseline_bin:
            targets.append((name, "rung-paired", stack.start_rung("paired", full, "warn", baseline_bin)))
        else:
            sys.exit(f"--paired: unknown target {name} (HTTP/1: floor, rawfloor, contract; HTTP/2: floor-h2, "
                     f"rawfloor-h2, contract-h2; both: specter, nginx, haproxy, baseline with --baseline-bin)")
    load = (lambda port, d: h2load(f"http://127.0.0.1:{port}/", d)) if h2 else \
        (lambda port, d: wrk(f"http://127.0.0.1:{port}/", 64, d))

    def together(d):
        out, cpu0 = {}, {t[0]: proc_times(stack.pids(t[1])) for t in targets}
        start = time.time()
        threads = [threading.Thread(target=lambda t=t: out.__setitem__(t[0], load(t[2], d))) for t in targets]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.time() - start
        per = {}
        for name, proc, _ in targets:
            user, system = (b - a for a, b in zip(cpu0[name], proc_times(stack.pids(proc))))
            requests = max(out[name]["rps"] * wall, 1)
            per[name] = (user * 1e9 / requests, system * 1e9 / requests, out[name]["non2xx"])
        return per

    together(1)  # warm-up: connections open, pools filled
    (a, _, _), (b, _, _) = targets
    lines, ratios = [], []
    for r in range(rounds):
        per = together(duration)
        ratios.append(sum(per[b][:2]) / sum(per[a][:2]))
        lines.append(f"round {r + 1}: " + "  ".join(f"{n} {u:.0f} + {s:.0f} ns/request" + (f" ({e} non-2xx)" if e else "")
                                                  for n, (u, s, e) in per.items()) + f"  {b}/{a} {ratios[-1]:.3f}")
    spread = statistics.stdev(ratios) if len(ratios) > 1 else float("nan")
    lines.append(f"{b}/{a} CPU per request, paired ({'h2load -c16 -m16' if h2 else 'wrk -c64'}, {rounds} rounds "
                 f"of {duration} s): median {median(ratios):.3f}, sd {spread:.3f}")
    return "\n".join(lines)


def out_row(rows, key):
    return next((r for r in rows if r["key"] == key), None)


def reload_bench(stack, work, keys, reloads=5):
    """Time from a config write to the swap, with `keys` keys; and request latency
    while reloading once a second vs without reloads."""
    import threading
    import urllib.request
    base = open(os.path.join(work, "specter.toml")).read()
    blocks = "".join(
        f'[[environments.bench.keys]]\nid = "k{i}"\nsha256 = "{hashlib.sha256(f"spk_bench_{i:012d}".encode()).hexdigest()}"\n'
        for i in range(keys))
    path = os.path.join(work, "reload.toml")
    with open(path, "w") as f:
        f.write(base + blocks)
    stack.restart_specter(path)
    admin = f"http://127.0.0.1:{stack.ports['SPECTER_ADMIN_PORT']}/config"

    def version():
        return json.load(urllib.request.urlopen(admin))["version"]

    def rewrite(n):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(base + blocks + f"# rewrite {n}\n")
        os.rename(tmp, path)

    swaps = []
    for n in range(reloads):
        before = version()
        start = time.time()
        rewrite(n)
        while version() == before:
            time.sleep(0.005)
        swaps.append((time.time() - start) * 1000)
    port = stack.ports["SPECTER_PORT"]
    quiet = wrk(f"http://127.0.0.1:{port}/", 64, 10)
    stop = threading.Event()

    def reloader():
        n = 100
        while not stop.wait(1.0):
            rewrite(n)
            n += 1
    t = threading.Thread(target=reloader)
    t.start()
    busy = wrk(f"http://127.0.0.1:{port}/", 64, 10)
    stop.set()
    t.join()
    stack.restart_specter(os.path.join(work, "specter.toml"))
    return {"keys": keys, "swap_ms": swaps, "debounce_ms": 200,
            "without": quiet, "with_reload_every_second": busy}


def memory(stack, work, keys):
    """RSS of specter idle, with `keys` keys loaded, and with 10,000 idle connections."""
    out = {}
    stack.restart_specter(os.path.join(work, "specter.toml"))
    out["specter idle (1 key)"] = vm(stack.procs["specter"].pid, "VmRSS")
    if keys:
        path = os.path.join(work, "many-keys.toml")
        base = open(os.path.join(work, "specter.toml")).read()
        with open(path, "w") as f:
            f.write(base)
            for i in range(keys):
                k = f"spk_bench_{i:012d}"
                f.write(f'[[environments.bench.keys]]\nid = "k{i}"\nsha256 = "{hashlib.sha256(k.encode()).hexdigest()}"\n')
        started = time.time()
        stack.restart_specter(path)
        out[f"specter with {keys:,} keys"] = vm(stack.procs["specter"].pid, "VmRSS")
        out[f"(load time for {keys:,} keys, s)"] = round(time.time() - started, 1)
        stack.restart_specter(os.path.join(work, "specter.toml"))
    out.update(idle_connections(stack, 3000))
    return out


def idle_connections(stack, n):
    """RSS growth per idle keep-alive connection after one request on each: hyper's own
    server (the floor's `serve`), the floor proxy, specter and nginx."""
    port = free_port()
    stack.start("floor-serve", ["taskset", "-c", "1", stack.floor_bin, "serve", f"127.0.0.1:{port}"])
    wait_port(port)
    out = {}
    request = f"GET / HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\n\r\n".encode()
    for name, label, port in (("floor-serve", "hyper's own server (floor serve)", port),
                              ("floor", "floor proxy", stack.ports["FLOOR_PORT"]),
                              ("specter", "specter", stack.ports["SPECTER_PORT"]),
                              ("nginx", "nginx", stack.ports["NGINX_PORT"])):
        pids = stack.pids(name)
        before = sum(vm(pid, "VmRSS") for pid in pids)
        socks = []
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(request)
            socks.append(s)
        for s in socks:
            s.recv(4096)
        time.sleep(1)  # settle: responses written, upstream connections back in their pools
        after = sum(vm(pid, "VmRSS") for pid in pids)
        out[f"{label}: RSS growth per idle keep-alive connection ({n:,}), KiB"] = round((after - before) / n, 1)
        for s in socks:
            s.close()
    stack.stop("floor-serve")
    return out


def cpu_split(stack, duration):
    """User and system CPU per request of each proxy (small GET, 64 connections)."""
    def times(pids):
        u = s = 0
        for pid in pids:
            f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            u, s = u + int(f[11]), s + int(f[12])
        return u / CLK_TCK, s / CLK_TCK
    lines = ["| proxy | req/s | user µs/request | system µs/request |", "|---|---:|---:|---:|"]
    for name, port in (("floor", "FLOOR_PORT"), ("nginx", "NGINX_PORT"), ("haproxy", "HAPROXY_PORT"),
                       ("specter", "SPECTER_PORT")):
        pids = stack.pids(name)
        u0, s0 = times(pids)
        r = wrk(f"http://127.0.0.1:{stack.ports[port]}/", 64, duration)
        u1, s1 = times(pids)
        n = r["rps"] * duration
        lines.append(f"| {name} | {r['rps']:.0f} | {(u1 - u0) / n * 1e6:.2f} | {(s1 - s0) / n * 1e6:.2f} |")
    return "\n".join(lines)


def num(v, sign="", digits=0):
    """A table cell: '-' for a missing figure."""
    if v is None or v != v:
        return "-"
    return f"{v:{sign}.{digits}f}"


def markdown(results, ladder_rows, mem, args, reload=None):
    lines = [f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {args.rounds} rounds x {args.duration} s per target, "
             f"`nproc` = {os.cpu_count()}. Medians over rounds; `*` = fewer valid rounds than run.", ""]
    for s in results:
        lines += [f"### {s['desc']}", "", "| target | req/s | p50 ms | p99 ms | req per CPU-second | user ns/req | "
                  "system ns/req | non-2xx | valid rounds |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for t, r in s["rows"].items():
            lines.append(f"| {t} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {num(r['req_per_cpu_s'])} | "
                         f"{num(r['user_ns'])} | {num(r['sys_ns'])} | {r['non2xx']} | {r['valid_rounds']}/{s['rounds']} |")
        lines.append("")
        lines += [f"- {k}: **{v:.2f}**" for k, v in s["ratios"].items()]
        lines.append("")
    if ladder_rows:
        lines += ["### Feature-cost ladder (small GET, 64 connections; rungs alternate in each round)", "",
                  "CPU per request of the proxy process from `/proc/PID/stat`, in nanoseconds, medians of rounds. "
                  "*Added* is against the rung above for the feature steps, against the full hot path (\"+ policy\") "
                  "for the rows after it. *× contract* is against the contract floor (the raw floor sending the "
                  "fields specter's contract sends): what specter's own checks and plumbing cost.", "",
                  "| rung | req/s | p99 ms | req per CPU-second | user ns | system ns | added user ns | added system ns "
                  "| × floor | × contract | valid rounds |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in ladder_rows:
            lines.append(f"| {r['rung']} | {r['rps']:.0f} | {r['p99']:.2f} | {num(r['req_per_cpu_s'])} | {num(r['user_ns'])} | "
                         f"{num(r['sys_ns'])} | {num(r.get('added_user_ns'), '+')} | {num(r.get('added_sys_ns'), '+')} | "
                         f"{num(r.get('x_floor'), digits=2)} | {num(r.get('x_contract'), digits=2)} | "
                         f"{r['valid_rounds']}/{r['rounds']} |")
        lines.append("")
    if reload:
        sw = reload["swap_ms"]
        lines += [f"### Hot reload with {reload['keys']:,} keys", "",
                  f"- file write to swap (includes the {reload['debounce_ms']} ms debounce): median "
                  f"{statistics.median(sw):.0f} ms, max {max(sw):.0f} ms over {len(sw)} reloads",
                  "", "| | req/s | p50 ms | p99 ms | non-2xx |", "|---|---:|---:|---:|---:|"]
        for label, key in (("no reloads", "without"), ("a reload every second", "with_reload_every_second")):
            r = reload[key]
            lines.append(f"| {label} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['non2xx']} |")
        lines.append("")
    if mem:
        lines += ["### Memory", "", "| what | KiB |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in mem.items()]
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--scenarios", default="small,post64k,conns1000,https,handshakes,h2")
    ap.add_argument("--ladder", action="store_true", help="the feature-cost ladder from the floor")
    ap.add_argument("--rungs", help="only these ladder rungs, comma-separated (floor,rawfloor,contract,key,limits,"
                    "policy,log,fleet,lease,otlp0,otlp1,429,baseline)")
    ap.add_argument("--trace-ladder", action="store_true", help="the ladder's tracing rungs only")
    ap.add_argument("--baseline-bin", help="add a ladder rung: this specter binary on the full hot path (A/B)")
    ap.add_argument("--idle", type=int, default=0, help="only measure RSS per idle connection, with this many")
    ap.add_argument("--floor-bin", help="the floor proxy (default: target/release/examples/floor)")
    ap.add_argument("--memory-keys", type=int, default=0, help="also measure RSS with this many keys")
    ap.add_argument("--reload-keys", type=int, default=0, help="also time reloads of a config with this many keys")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "specter"))
    ap.add_argument("--write", help="rewrite the results section of this markdown file")
    ap.add_argument("--cpu-split", action="store_true", help="only print user/system CPU per request")
    ap.add_argument("--paired", help="only an A/B of two targets loaded at once, robust to a noisy host: A,B "
                    "from floor, rawfloor, contract (HTTP/1), floor-h2, rawfloor-h2, contract-h2 (with --h2), "
                    "specter, nginx, haproxy, baseline (with --baseline-bin)")
    ap.add_argument("--h2", action="store_true", help="--paired loads with h2load -c16 -m16")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="specter-bench-")
    try:
        floor = args.floor_bin or os.path.join(ROOT, "target", "release", "examples", "floor")
        if not os.path.exists(floor):
            sys.exit(f"no floor binary at {floor}: cargo build --release --example floor (run.sh does)")
        stack = Stack(work, args.bin, floor)
    except Exception:
        print(f"could not start the stack; logs are in {work}", file=sys.stderr)
        raise
    if args.cpu_split or args.idle or args.paired:
        try:
            if args.paired:
                print(paired(stack, work, args.paired.split(","), args.rounds, args.duration, args.h2,
                             args.baseline_bin))
            if args.cpu_split:
                print(cpu_split(stack, args.duration))
            if args.idle:
                for k, v in idle_connections(stack, args.idle).items():
                    print(f"{k}: {v}")
        finally:
            stack.stop_all()
        return
    try:
        results = []
        all_scenarios = scenarios(stack, work)
        for name in [n for n in args.scenarios.split(",") if n]:
            desc, targets, runner = all_scenarios[name]
            print(f"scenario {name}: {desc}", file=sys.stderr)
            results.append(run_scenario(stack, name, desc, targets, runner, args.rounds, args.duration))
        only = set(args.rungs.split(",")) if args.rungs else None
        if args.trace_ladder:
            only = {"floor", "policy", "otlp0", "otlp1", "baseline"}
        ladder_rows = []
        if args.ladder or args.trace_ladder or args.rungs or args.baseline_bin:
            ladder_rows = ladder(stack, work, args.rounds, args.duration, only, args.baseline_bin)
        reload = reload_bench(stack, work, args.reload_keys) if args.reload_keys else None
        mem = memory(stack, work, args.memory_keys) if args.memory_keys else {}
        for name in ("specter", "nginx", "haproxy"):
            if name in stack.procs:
                mem[f"{name} peak RSS over the run (VmHWM)"] = sum(vm(p, "VmHWM") for p in stack.pids(name))
    finally:
        stack.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    text = markdown(results, ladder_rows, mem, args, reload)
    print(text)
    json.dump({"results": results, "ladder": ladder_rows, "memory": mem, "reload": reload},
              open(os.path.join(HERE, "last-run.json"), "w"), indent=1, default=str)
    if args.write:
        doc = open(args.write).read()
        start, end = "<!-- results:start -->", "<!-- results:end -->"
        before, _, rest = doc.partition(start)
        _, _, after = rest.partition(end)
        open(args.write, "w").write(f"{before}{start}\n{text}\n{end}{after}")
    failures = [s["name"] for s in results for t, r in s["rows"].items() if r["rps"] == 0]
    if failures:
        print(f"FAILED: no throughput in {failures}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
