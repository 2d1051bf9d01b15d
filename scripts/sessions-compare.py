#!/usr/bin/env python3
"""Every session cure compared on this machine: the figures of docs/sessions.md#every-cure-compared.

Run it through scripts/sessions-compare.sh, which checks the tools, builds nothing, and stops every
process left behind. Python 3.11 standard library only.

For each cure it starts three fulcrum-app servers (A, B, C) with the cure's `--sessions`, the cure's
store (none, Redis, Redis with a replica and three sentinels, or a six-node Redis Cluster), and one
fulcrum whose pool holds the three servers (round robin, an HTTP health check every 200 ms, and the
cure's `[pools.sticky]` for the stickiness cures). Then, in this order:

1. memory: BULK logins sent through fulcrum by wrk; resident memory of the apps and of fulcrum, and
   Redis's `used_memory` summed over every node, before and after, scaled to 100,000 sessions;
2. steady load: USERS users each log in, then send ME `GET /me` each, the users taking turns, one
   request at a time, each user over its own keep-alive connection: latency of every `/me`, the
   server that answered, every answer not 200; then SKEWED more `/me` from users drawn with weights
   1/(n+1) (busy users and idle ones), to see how the servers share an uneven load;
3. a new app server joins: D is started (a cluster member for the cluster cure) and added through the
   admin API; every user sends AFTER more `/me`; a user answered 401 logs in again;
4. an app server dies: B is killed (SIGKILL); every user sends AFTER more `/me` (401: logs in again);
5. the store's primary dies (store cures): the Redis master (for the cluster: the master holding the
   most sessions) is killed; the users take turns sending `/me` until every answer has been 200 for
   2 s, or for STORE_WINDOW seconds; then, for a single Redis, it is started again, empty (no
   persistence), and every user sends one `/me`.

Every round of `/me` through fulcrum is followed by the same round sent straight to the server that
answered each user's login: "added" is a cure's median through fulcrum minus the median straight to
a server with memory sessions (the stickiness rows').

Every process listens on 127.0.0.1. For `source_ip`, each user's connections leave from its own
loopback address (127.0.0.2 …), as distinct clients would; wrk's bulk logins all come from 127.0.0.1.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FULCRUM = ROOT / "target/release/fulcrum"
APP = ROOT / "target/release/fulcrum-app"
CLUSTER_SECRET = "sessions-compare-cluster-secret"
STICKY_SECRET = "sessions-compare-sticky-secret-0123456789"

WRK_LOGIN = """
local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end
function init(args)
  limit = tonumber(args[1])
  sent = 0
  done = 0
end
function request()
  sent = sent + 1
  return wrk.format("POST", "/login", {["Content-Type"] = "application/json"},
    string.format('{"user":"bulk-%d-%d"}', tid, sent))
end
function response(status, headers, body)
  done = done + 1
  if done >= limit then wrk.thread:stop() end
end
"""


def log(*args: object) -> None:
    print(time.strftime("%H:%M:%S"), *args, file=sys.stderr, flush=True)


# --- processes --------------------------------------------------------------------------------------


class Procs:
    """Every process this run starts; each pid is also written to `pidfile` for the shell's trap."""

    def __init__(self, workdir: Path, pidfile: Path):
        self.workdir = workdir
        self.pidfile = pidfile
        self.live: list[subprocess.Popen] = []

    def start(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        out = open(self.workdir / f"{name}.log", "ab")
        full_env = dict(os.environ, RUST_LOG="warn", **(env or {}))
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=full_env, cwd=self.workdir)
        out.close()
        with open(self.pidfile, "a") as f:
            f.write(f"{proc.pid}\n")
        self.live.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)

    def stop_all(self) -> None:
        for proc in self.live:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5
        for proc in self.live:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.live.clear()


_taken: set[int] = set()


def free_port() -> int:
    """A free loopback port whose +10000 (a Redis Cluster bus port) is free too."""
    for _ in range(200):
        port = random.randint(20000, 29999)
        if port in _taken:
            continue
        ok = True
        for p in (port, port + 10000):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
        if ok:
            _taken.add(port)
            return port
    raise RuntimeError("no free port")


def wait_until(what: str, limit: float, check) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, http.client.HTTPException, ValueError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {limit} s waiting for {what}")


def get(port: int, path: str, headers: dict | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        conn.close()


def rss_kib(proc: subprocess.Popen) -> int:
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {proc.pid}")


def redis_cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                          timeout=10).stdout


def redis_used_memory(port: int) -> int:
    m = re.search(r"^used_memory:(\d+)", redis_cli(port, "info", "memory"), re.M)
    if not m:
        raise RuntimeError(f"no used_memory from redis on {port}")
    return int(m.group(1))


# --- stores ------------------------------------------------------------------------------------------


@dataclass
class Store:
    """A running store: `url` for `--sessions`, `nodes` port → process, `primaries` to kill."""

    url: str
    nodes: dict[int, subprocess.Popen] = field(default_factory=dict)
    data_ports: list[int] = field(default_factory=list)  # masters and replicas: memory is summed
    kind: str = "redis"

    def used_memory(self) -> int:
        return sum(redis_used_memory(p) for p in self.data_ports)


def redis_argv(port: int, *extra: str) -> list[str]:
    return ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
            "no", "--dbfilename", f"dump-{port}.rdb", *extra]


def start_redis(procs: Procs, port: int, *extra: str) -> subprocess.Popen:
    proc = procs.start(f"redis-{port}", redis_argv(port, *extra))
    wait_until(f"redis on {port}", 10, lambda: redis_cli(port, "ping").strip() == "PONG")
    return proc


def start_single(procs: Procs) -> Store:
    port = free_port()
    return Store(f"redis://127.0.0.1:{port}", {port: start_redis(procs, port)}, [port])


def start_sentinel(procs: Procs) -> Store:
    master, replica = free_port(), free_port()
    store = Store("", kind="sentinel")
    store.nodes[master] = start_redis(procs, master)
    store.nodes[replica] = start_redis(procs, replica, "--replicaof", "127.0.0.1", str(master))
    store.data_ports = [master, replica]
    for _ in range(3):
        port = free_port()
        conf = procs.workdir / f"sentinel-{port}.conf"
        conf.write_text(f"port {port}\nbind 127.0.0.1\n"
                        f"sentinel monitor mymaster 127.0.0.1 {master} 2\n"
                        "sentinel down-after-milliseconds mymaster 1000\n"
                        "sentinel failover-timeout mymaster 5000\n")
        store.nodes[port] = procs.start(f"sentinel-{port}", ["redis-server", str(conf), "--sentinel"])
    sentinels = [p for p in store.nodes if p not in store.data_ports]
    # The apps ask the sentinels for the master (fulcrum-app's redis-sentinel:// store).
    store.url = ("redis-sentinel://" + ",".join(f"127.0.0.1:{p}" for p in sentinels)
                 + "/mymaster")
    wait_until("the replica in sync", 10,
               lambda: "master_link_status:up" in redis_cli(replica, "info", "replication"))
    return store


def start_redis_cluster(procs: Procs) -> Store:
    ports = [free_port() for _ in range(6)]
    store = Store("redis-cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports[:3]), kind="cluster")
    for p in ports:
        store.nodes[p] = start_redis(procs, p, "--cluster-enabled", "yes", "--cluster-config-file",
                                     f"nodes-{p}.conf", "--cluster-node-timeout", "1000")
    subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
                    "--cluster-replicas", "1", "--cluster-yes"], capture_output=True, timeout=30,
                   check=True)
    wait_until("the cluster ok", 20,
               lambda: all("cluster_state:ok" in redis_cli(p, "cluster", "info") for p in ports))
    store.data_ports = ports
    wait_until("every replica in sync", 20, lambda: sum(
        "master_link_status:up" in redis_cli(p, "info", "replication") for p in ports) == 3)
    return store


def cluster_masters(store: Store) -> list[int]:
    alive = [p for p, proc in store.nodes.items() if proc.poll() is None]
    out = redis_cli(alive[0], "cluster", "nodes")
    masters = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) > 2 and "master" in parts[2] and "fail" not in parts[2]:
            masters.append(int(parts[1].split("@")[0].rsplit(":", 1)[1]))
    return masters


# --- apps and fulcrum ------------------------------------------------------------------------------


@dataclass
class Cure:
    name: str
    sessions: str  # memory, cluster, redis, sentinel, redis-cluster
    sticky: str | None = None  # TOML lines of [pools.sticky]


CURES = [
    Cure("sticky `cookie`", "memory", 'kind = "cookie"\nsecret = "' + STICKY_SECRET + '"'),
    Cure("sticky `app_cookie`", "memory", 'kind = "app_cookie"\ncookie = "SESSIONID"'),
    Cure("sticky `source_ip`", "memory", 'kind = "source_ip"'),
    Cure("session clustering", "cluster"),
    Cure("Redis", "redis"),
    Cure("Redis Sentinel", "sentinel"),
    Cure("Redis Cluster", "redis-cluster"),
]


def start_app(procs: Procs, name: str, port: int, sessions: str, peers: list[int]) -> subprocess.Popen:
    argv = [str(APP), "--listen", f"127.0.0.1:{port}", "--name", name, "--sessions", sessions]
    if sessions == "cluster" and peers:
        argv += ["--peers", ",".join(f"127.0.0.1:{p}" for p in peers)]
    proc = procs.start(f"app-{name}", argv, {"FULCRUM_APP_CLUSTER_SECRET": CLUSTER_SECRET})
    wait_until(f"app {name}", 10, lambda: get(port, "/health")[0] == 200)
    return proc


def app_metric(port: int, name: str) -> float:
    _, text = get(port, "/metrics")
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def fulcrum_config(web: int, admin: int, apps: dict[str, int], sticky: str | None) -> str:
    servers = ", ".join(f'{{ address = "127.0.0.1:{p}", name = "{n}" }}' for n, p in apps.items())
    text = f"""[admin]
bind = "127.0.0.1:{admin}"

[[listeners]]
name = "web"
bind = "127.0.0.1:{web}"
protocol = "http"
pool = "app"

[[pools]]
name = "app"
algorithm = "round_robin"
retries = 2
servers = [{servers}]

  [pools.health_check]
  kind = "http"
  path = "/health"
  interval = "200ms"
  timeout = "150ms"
  rise = 1
  fall = 2
"""
    if sticky:
        text += "\n  [pools.sticky]\n" + "".join(f"  {line}\n" for line in sticky.splitlines())
    return text


# --- the client ----------------------------------------------------------------------------------------


@dataclass
class User:
    n: int
    source: str
    cookies: dict[str, str] = field(default_factory=dict)
    server: str = ""  # the server that answered the login


@dataclass
class Answer:
    status: int
    server: str
    seconds: float


class Client:
    """Users' requests to one port, each user over its own keep-alive connection."""

    def __init__(self, port: int):
        self.port = port
        self.conns: dict[int, http.client.HTTPConnection] = {}

    def connect(self, user: User) -> http.client.HTTPConnection:
        if user.n not in self.conns:
            self.conns[user.n] = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5,
                                                            source_address=(user.source, 0))
        return self.conns[user.n]

    def close(self, user: User) -> None:
        conn = self.conns.pop(user.n, None)
        if conn is not None:
            conn.close()

    def call(self, user: User, method: str, path: str, body: bytes | None = None) -> Answer:
        headers = {}
        if user.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in user.cookies.items())
        if body is not None:
            headers["Content-Type"] = "application/json"
        for attempt in range(2):
            conn = self.connect(user)
            start = time.perf_counter()
            try:
                conn.request(method, path, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
            except (OSError, http.client.HTTPException):
                self.close(user)
                if attempt == 0:
                    continue  # a keep-alive connection closed under us: one new connection
                return Answer(0, "", time.perf_counter() - start)
            seconds = time.perf_counter() - start
            for value in r.headers.get_all("Set-Cookie") or []:
                pair = value.split(";", 1)[0]
                if "=" in pair:
                    k, v = pair.split("=", 1)
                    user.cookies[k.strip()] = v.strip()
            if r.will_close:
                self.close(user)
            try:
                server = json.loads(data).get("server", "")
            except (ValueError, AttributeError):
                server = ""
            return Answer(r.status, server, seconds)
        raise AssertionError("unreachable")

    def login(self, user: User) -> Answer:
        a = self.call(user, "POST", "/login", json.dumps({"user": f"u{user.n}"}).encode())
        user.server = a.server
        return a

    def me(self, user: User) -> Answer:
        return self.call(user, "GET", "/me")


def users_for(count: int, distinct_sources: bool, first: int = 0) -> list[User]:
    users = []
    for n in range(first, first + count):
        source = f"127.0.{1 + n // 250}.{2 + n % 250}" if distinct_sources else "127.0.0.1"
        users.append(User(n, source))
    return users


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def codes(answers: list[Answer]) -> dict[int, int]:
    out: dict[int, int] = {}
    for a in answers:
        out[a.status] = out.get(a.status, 0) + 1
    return out


def codes_text(counts: dict[int, int]) -> str:
    bad = {k: v for k, v in sorted(counts.items()) if k != 200}
    if not bad:
        return "none"
    return ", ".join(f"{v} × {'no answer' if k == 0 else k}" for k, v in bad.items())


def close_all(client: Client, users: list[User]) -> None:
    for user in users:
        client.close(user)


def round_of_me(client: Client, users: list[User], per_user: int) -> tuple[list[Answer], int]:
    """`per_user` rounds in which every user, in turn, sends one /me; a 401 makes the user log in
    again. Returns the answers and the number of users who were logged out."""
    answers, out = [], set()
    for _ in range(per_user):
        for user in users:
            a = client.me(user)
            answers.append(a)
            if a.status == 401:
                out.add(user.n)
                client.login(user)
    close_all(client, users)
    return answers, len(out)


# --- one cure ------------------------------------------------------------------------------------------


def requests_seen(admin: int) -> int:
    _, text = get(admin, "/metrics")
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("fulcrum_server_requests_total{"))


def wrk_logins(web: int, admin: int, count: int, script: Path) -> int:
    """`count` logins through fulcrum by wrk; returns the 2xx answers. wrk runs for a duration, so it
    is interrupted once fulcrum has counted the logins (each wrk thread also stops at its share)."""
    threads, conns = 2, 32
    start = requests_seen(admin)
    wrk = subprocess.Popen(["wrk", "-t", str(threads), "-c", str(conns), "-d", "60s", "--timeout", "5s",
                            "-s", str(script), f"http://127.0.0.1:{web}/login", "--",
                            str(count // threads)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while wrk.poll() is None and time.monotonic() < deadline:
        if requests_seen(admin) - start >= count:
            break
        time.sleep(0.1)
    wrk.send_signal(signal.SIGINT)
    out = wrk.communicate(timeout=10)[0]
    total = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: .*", out)
    if bad or errors:
        log("wrk:", bad.group(0) if bad else "", errors.group(0) if errors else "")
    return total - (int(bad.group(1)) if bad else 0)


def measure(cure: Cure, procs: Procs, args) -> dict:
    log(f"== {cure.name}")
    store = None
    if cure.sessions == "redis":
        store = start_single(procs)
    elif cure.sessions == "sentinel":
        store = start_sentinel(procs)
    elif cure.sessions == "redis-cluster":
        store = start_redis_cluster(procs)
    sessions = store.url if store else cure.sessions

    ports = {n: free_port() for n in "ABC"}
    apps: dict[str, subprocess.Popen] = {}
    for i, (name, port) in enumerate(ports.items()):
        apps[name] = start_app(procs, name, port, sessions, list(ports.values())[:i])
    if sessions == "cluster":
        for port in ports.values():
            wait_until("cluster peers up", 10,
                       lambda: app_metric(port, "fulcrum_app_cluster_peers_up") >= 2)
    web, admin = free_port(), free_port()
    config = procs.workdir / f"fulcrum-{cure.sessions}-{len(procs.live)}.toml"
    config.write_text(fulcrum_config(web, admin, ports, cure.sticky))
    lb = procs.start("fulcrum", [str(FULCRUM), "run", "--config", str(config)])
    wait_until("fulcrum", 10, lambda: get(web, "/")[0] == 200)
    result: dict = {"cure": cure.name, "sessions": cure.sessions}

    # 1. memory per 100k sessions
    before_apps = sum(rss_kib(p) for p in apps.values())
    before_lb = rss_kib(lb)
    before_store = store.used_memory() if store else 0
    made = wrk_logins(web, admin, args.bulk, procs.workdir / "login.lua")
    if sessions in ("memory", "cluster"):
        want = made if sessions == "memory" else 3 * min(made, 100_000)
        wait_until("sessions held", 60, lambda: sum(
            app_metric(p, "fulcrum_app_sessions_held") for p in ports.values()) >= want * 0.99)
    time.sleep(0.5)
    scale = 100_000 / made / 1024  # KiB → MiB per 100k sessions
    result["made"] = made
    result["apps_mib"] = (sum(rss_kib(p) for p in apps.values()) - before_apps) * scale
    result["lb_mib"] = (rss_kib(lb) - before_lb) * scale
    result["store_mib"] = (store.used_memory() - before_store) * 100_000 / made / 2**20 if store else None
    result["held"] = [int(app_metric(p, "fulcrum_app_sessions_held")) for p in ports.values()] \
        if sessions in ("memory", "cluster") else None

    # 2. steady load
    client = Client(web)
    users = users_for(args.users, cure.sticky == 'kind = "source_ip"')
    # Users take turns, as concurrent users would: every user logs in, then each sends one /me per
    # round, over its own keep-alive connection; every round through fulcrum is followed by one sent
    # straight to the server that answered the user's login, so both see the machine in the same state.
    straight = {name: Client(port) for name, port in ports.items()}
    logins = [client.login(user) for user in users]
    me, direct = [], []
    for _ in range(args.me):
        me += [client.me(user) for user in users]
        direct += [straight[user.server].me(user) for user in users]
    close_all(client, users)
    for c in straight.values():
        close_all(c, users)
    result["login_bad"] = codes_text(codes(logins))
    result["direct_p50"] = percentile([a.seconds for a in direct if a.status == 200], 0.5) * 1e3
    result["direct_bad"] = codes_text(codes(direct))
    ok = [a.seconds for a in me if a.status == 200]
    result["p50"] = percentile(ok, 0.50) * 1e3 if ok else None
    result["p99"] = percentile(ok, 0.99) * 1e3 if ok else None
    result["mean"] = statistics.fmean(ok) * 1e3 if ok else None
    result["steady_bad"] = codes_text(codes(me))
    share = {n: 0 for n in ports}
    for a in me:
        if a.server in share:
            share[a.server] += 1
    result["share"] = share
    # Some users busier than others: SKEWED /me from users drawn with Zipf weights (user n: 1/(n+1)),
    # the same seeded draw for every cure.
    draw = random.Random(1).choices(users, weights=[1 / (u.n + 1) for u in users], k=args.skewed)
    skew = {n: 0 for n in ports}
    for user in draw:
        a = client.me(user)
        if a.status == 200 and a.server in skew:
            skew[a.server] += 1
    close_all(client, users)
    result["skew"] = skew

    # 3. a new app server joins
    port_d = free_port()
    peers = list(ports.values()) if sessions == "cluster" else []
    apps["D"] = start_app(procs, "D", port_d, sessions, peers)
    conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=5)
    conn.request("POST", "/api/v1/pools/app/servers",
                 body=json.dumps({"address": f"127.0.0.1:{port_d}", "name": "D"}),
                 headers={"Content-Type": "application/json"})
    assert conn.getresponse().status == 201, "adding D through the admin API"
    conn.close()
    time.sleep(0.5)
    joined, out = round_of_me(client, users, args.after)
    result["join_out"] = out
    result["join_bad"] = codes_text({k: v for k, v in codes(joined).items() if k != 401})
    result["join_d"] = sum(a.server == "D" for a in joined) / len(joined)
    newcomers = users_for(30, cure.sticky == 'kind = "source_ip"', first=10_000)
    for user in newcomers:
        client.login(user)
    result["join_new_d"] = sum(client.me(u).server == "D" for u in newcomers) / len(newcomers)
    close_all(client, newcomers)

    # 4. an app server dies
    procs.kill(apps["B"])
    died, out = round_of_me(client, users, args.after)
    result["die_out"] = out
    result["die_bad"] = codes_text({k: v for k, v in codes(died).items() if k != 401})

    # 5. the store's primary dies
    if store:
        if store.kind == "cluster":
            masters = cluster_masters(store)
            victim = max(masters, key=lambda p: int(redis_cli(p, "dbsize").strip() or 0))
        else:
            victim = store.data_ports[0]
        killed_at = time.monotonic()
        procs.kill(store.nodes[victim])
        # The users take turns until every answer has been 200 for two seconds, or for the window.
        seen: list[tuple[float, int]] = []
        last_bad = 0.0
        i = 0
        while True:
            now = time.monotonic() - killed_at
            if now >= args.store_window or (seen and now - last_bad >= 2.0):
                break
            a = client.me(users[i % len(users)])
            seen.append((time.monotonic() - killed_at, a.status))
            if a.status != 200:
                last_bad = seen[-1][0]
            i += 1
        close_all(client, users)
        result["store_counts"] = codes([Answer(s, "", 0) for _, s in seen])
        result["store_last_bad"] = last_bad if any(s != 200 for _, s in seen) else None
        result["store_n"] = len(seen)
        result["store_seconds"] = seen[-1][0] if seen else 0.0
        if store.kind == "sentinel":
            sentinels = [p for p in store.nodes if p not in store.data_ports]
            answer = redis_cli(sentinels[0], "sentinel", "get-master-addr-by-name", "mymaster").split()
            result["sentinel_promoted"] = len(answer) == 2 and int(answer[1]) == store.data_ports[1]
        if store.kind == "redis":
            store.nodes[victim] = start_redis(procs, victim)
            probe = User(20_000, "127.0.0.1")
            wait_until("the apps reconnected to Redis", 10,
                       lambda: client.login(probe).status == 200)
            close_all(client, [probe])
            back = [client.me(u) for u in users]
            close_all(client, users)
            result["store_back"] = codes(back)
    procs.stop_all()
    log(json.dumps(result, default=str))
    return result


# --- the table -----------------------------------------------------------------------------------------


def mib(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{max(v, 0.0):.1f} MiB"


def store_text(r: dict, users: int) -> str:
    if "store_counts" not in r:
        return "no store"
    c = r["store_counts"]
    parts = [f"{v} × {'no answer' if k == 0 else k}" for k, v in sorted(c.items())]
    text = f"{r['store_n']} `/me` in {r['store_seconds']:.1f} s: " + ", ".join(parts)
    if r["store_last_bad"] is not None and r["store_last_bad"] + 2.0 <= r["store_seconds"] + 0.01:
        text += f"; the last error {r['store_last_bad']:.1f} s after the kill"
    elif r["store_last_bad"] is not None:
        text += "; still failing at the end"
    if "sentinel_promoted" in r:
        text += ("; the sentinels had promoted the replica" if r["sentinel_promoted"]
                 else "; the sentinels had not promoted the replica")
    if "store_back" in r:
        back = r["store_back"]
        text += f"; then Redis restarted (empty): {back.get(401, 0)} of {users} users logged out"
    return text


def percentages(share: dict[str, int]) -> str:
    total = sum(share.values()) or 1
    return " / ".join(f"{100 * v / total:.0f}%" for v in share.values())


def table(results: list[dict], args) -> str:
    memory = [r["direct_p50"] for r in results if r["sessions"] == "memory"]
    reference = statistics.fmean(memory) if memory else None
    lines = [
        f"Steady load: {args.users} users × (1 login + {args.me} `GET /me`), the users taking turns, "
        "one request at a time, through fulcrum over three servers; after each round through "
        "fulcrum, the same round straight to the server that answered each user's login. Latency "
        "of the `/me` answered 200, in ms. Added: the median through fulcrum minus the median "
        "straight to a server with memory sessions"
        + (f" ({reference:.3f} ms, the mean of the stickiness rows)" if reference else
           " (not measured in this run: no stickiness row)")
        + f". Memory: growth per 100,000 sessions ({args.bulk:,} logins by wrk through fulcrum), "
        "resident memory of the apps (summed) and of fulcrum, Redis `used_memory` summed over "
        "masters and replicas. Spread: the share of the `/me` answered by A, B and C; busy users: "
        f"then {args.skewed:,} more `/me` from users drawn with weights 1/(n+1), user 0 the busiest "
        "(the same draw for every cure).",
        "",
        "| cure | `/me` median through fulcrum (added) | straight to the server | p99 through "
        "fulcrum | memory per 100k: apps | store | balancer | spread A / B / C | spread, busy "
        "users | not 200 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        spread, skew = percentages(r["share"]), percentages(r["skew"])
        added = f" ({r['p50'] - reference:+.3f})" if reference else ""
        bad = [r["steady_bad"]] if r["steady_bad"] != "none" else []
        if r["direct_bad"] != "none":
            bad.append(f"straight: {r['direct_bad']}")
        lines.append(
            f"| {r['cure']} | {r['p50']:.3f}{added} | {r['direct_p50']:.3f} | {r['p99']:.3f} | "
            f"{mib(r['apps_mib'])} | "
            f"{mib(r['store_mib'])} | {mib(r['lb_mib'])} | {spread} | {skew} | "
            f"{'; '.join(bad) if bad else 'none'} |")
    held = [f"{r['cure']}: {' / '.join(f'{h:,}' for h in r['held'])}" for r in results if r["held"]]
    if held:
        lines += ["", "Sessions held by A / B / C after the bulk logins (wrk's connections all come "
                  "from 127.0.0.1, so `source_ip` put them all on one server and its stick table "
                  "held one address; a clustered server holds every session): "
                  + "; ".join(held) + "."]
    lines += [
        "",
        f"What the users saw, in order: D joins (started, added through the admin API), then every "
        f"user sends {args.after} `/me`; B is killed (SIGKILL), then every user sends {args.after} "
        "`/me`; a user answered 401 logs in again. Then the store's primary is killed (Redis Cluster: "
        "the master holding the most sessions) and the users send `/me` in turn until every answer "
        f"has been 200 for 2 s or for {args.store_window:.0f} s.",
        "",
        "| cure | D joins: users logged out | D's share (old users / new logins) | "
        "B dies: users logged out | other errors | store primary dies |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        other = [x for x in (r["join_bad"], r["die_bad"]) if x != "none"]
        lines.append(
            f"| {r['cure']} | {r['join_out']} of {args.users} | {100 * r['join_d']:.0f}% / "
            f"{100 * r['join_new_d']:.0f}% | {r['die_out']} of {args.users} | "
            f"{'; '.join(other) if other else 'none'} | {store_text(r, args.users)} |")
    # Prose lines wrapped as the docs are; table rows kept whole.
    wrap = textwrap.TextWrapper(100, break_on_hyphens=False)
    return "\n".join(line if line.startswith("|") else wrap.fill(line) for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--pidfile", type=Path, required=True)
    parser.add_argument("--users", type=int, default=300, help="users of the steady load")
    parser.add_argument("--me", type=int, default=20, help="GET /me per user in the steady load")
    parser.add_argument("--after", type=int, default=5,
                        help="GET /me per user after a server joins, and after one dies")
    parser.add_argument("--skewed", type=int, default=3000, help="GET /me from busy and idle users")
    parser.add_argument("--bulk", type=int, default=100_000, help="logins for the memory figures")
    parser.add_argument("--store-window", type=float, default=8.0,
                        help="seconds at most of GET /me after the store's primary dies")
    parser.add_argument("--only", help="comma-separated cure sessions kinds to run (memory, cluster, "
                        "redis, sentinel, redis-cluster)")
    args = parser.parse_args()
    random.seed(os.getpid())
    (args.workdir / "login.lua").write_text(WRK_LOGIN)
    procs = Procs(args.workdir, args.pidfile)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        results = []
        for cure in CURES:
            if args.only and cure.sessions not in args.only.split(","):
                continue
            r = measure(cure, procs, args)
            results.append(r)
    finally:
        procs.stop_all()
    print(table(results, args))


if __name__ == "__main__":
    main()
