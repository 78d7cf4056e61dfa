"""Latency of a running GLUScope server, measured with a real HTTP client.

    python benchmarks/bench_server.py --db data/synthetic.duckdb          # starts `gluscope serve` on a free port
    python benchmarks/bench_server.py --url http://127.0.0.1:8000         # or measures a server already running

For the neuron page, the neuron JSON, the examples fragment (HX-Request) and the examples JSON,
with 1 and with 16 concurrent clients (each with its own keep-alive
connection): p50, p99 and max latency, throughput, the client's own CPU per
request, and the server's resident memory (when this script started it).
Fragments come in two patterns: one section of a random neuron per request
(none served from the server's per-neuron cache), and browsing (4 sections of one neuron in a row).
The distributions' endpoints follow: histograms (JSON and fragment), random and interval lists, the model
page with a layer's §5.1 scatter, its PNG and a click on it (a 303 to the nearest neuron).
With --db, the file is read once first, so that it sits in the OS page
cache, as on a server with memory to spare that has run a while: a cold
file measures the disk instead (`--cold` skips this).
`--only examples` runs just the scenarios whose name contains "examples"; `--only page,examples JSON` those
containing either.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from gluscope.schema import HOOKS, QUADRANT_SLUGS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db: Path, port: int, workers: int | None = None, env: dict[str, str] | None = None,
                 cwd: str | None = None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "gluscope.cli", "serve", str(db), "--port", str(port),
                             *(["--workers", str(workers)] if workers else [])], env=env, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start within 120 s")


def read_through(path: Path) -> float:
    """Read the whole file once (into the OS page cache); the seconds it took."""
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 24):
            pass
    return time.perf_counter() - t


def _tree(pid: int) -> list[int]:
    """pid and its descendants (uvicorn's worker processes)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def memory_kb(pid: int) -> dict[str, int]:
    """Resident and peak memory summed over the server's process tree."""
    out = {"VmRSS": 0, "VmHWM": 0}
    for p in _tree(pid):
        try:
            lines = Path(f"/proc/{p}/status").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith(("VmRSS", "VmHWM")):
                name, value = line.split(":")
                out[name] += int(value.split()[0])
    return out


def percentile(sorted_values: list[float], p: float) -> float:
    i = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[i]


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """One keep-alive HTTP/1.1 GET (uvicorn answers with a Content-Length); the status."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


def run(base: str, sessions: list[list[str]], headers: dict[str, str], clients: int) -> tuple[list[float], float, float]:
    """Latencies, wall time and this client's own CPU time; each client takes the next session (a list of
    URLs, fetched in order) as soon as its previous answer is in (closed loop).

    The clients are coroutines of one thread, each with one keep-alive
    connection, speaking just enough HTTP/1.1. Threads would contend for this
    process's GIL when answers arrive together and add that wait to the
    latencies: a neuron page's p99 at 16 clients read 118 ms with 16
    http.client threads, and 48 ms with wrk (a C client) against the same
    server. And on a 2-core machine a heavier client would take the CPU the
    server is being measured on.
    """
    host = urlsplit(base)
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    latencies: list[float] = []
    errors: list[str] = []
    it = iter(sessions)

    async def client() -> None:
        reader, writer = await asyncio.open_connection(host.hostname, host.port)
        try:
            for session in it:
                for url in session:  # one session's requests in order, on this client's connection
                    request = f"GET {url} HTTP/1.1\r\nHost: {host.netloc}\r\n{extra}\r\n".encode()
                    t = time.perf_counter()
                    status = await _get(reader, writer, request)
                    latencies.append(time.perf_counter() - t)
                    if status not in (200, 303):
                        errors.append(f"{status} {url}")
        finally:
            writer.close()

    async def all_clients() -> None:
        await asyncio.gather(*(client() for _ in range(clients)))

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    asyncio.run(all_clients())
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    if errors:
        raise SystemExit(f"{len(errors)} failed requests, e.g. {errors[:3]}")
    client_cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    return sorted(latencies), wall, client_cpu


SECTIONS = 4


def finding_scenarios(m: str, n_layers: int, d_mlp: int, vocab_size: int, rng: random.Random) -> dict:
    """The requests that find neurons: token search on both sides, suggestions, related neurons.
    Each asks about a random token or neuron, so none is answered from a cache."""
    from urllib.parse import quote

    from gluscope.schema import EXAMPLE_ROLES, WEIGHT_KINDS

    def tokens(n: int) -> list[int]:
        return [rng.randrange(vocab_size) for _ in range(n)]

    def neurons(n: int) -> list[tuple[int, int]]:
        return [(rng.randrange(n_layers), rng.randrange(d_mlp)) for _ in range(n)]

    def examples_query(t: int) -> str:
        extra = rng.choice(["", f"&quadrant={rng.choice(QUADRANT_SLUGS)}", f"&layers={n_layers // 2}-{n_layers - 1}"])
        return f"token_id={t}&side=examples&role={rng.choice(EXAMPLE_ROLES)}{extra}"

    prefix = lambda: rng.choice("bcdfghklmnprstvwz") + rng.choice("aeiouy")  # noqa: E731 - the synthetic vocabulary's syllables
    return {
        "search weights JSON": (lambda n: [[f"/api/models/{m}/search/tokens?token_id={t}&kind={quote(rng.choice(WEIGHT_KINDS))}"]
                                           for t in tokens(n)], {}),
        "search examples JSON": (lambda n: [[f"/api/models/{m}/search/tokens?{examples_query(t)}"] for t in tokens(n)],
                                 {}),
        "search page": (lambda n: [[f"/models/{m}/search?{examples_query(t)}"] for t in tokens(n)], {}),
        "suggest fragment": (lambda n: [[f"/models/{m}/search/suggest?token={prefix()}"] for _ in range(n)],
                             {"HX-Request": "true"}),
        "related JSON": (lambda n: [[f"/api/models/{m}/neurons/{l}/{i}/related"] for l, i in neurons(n)], {}),
        "related fragment": (lambda n: [[f"/models/{m}/neurons/{l}/{i}/related"] for l, i in neurons(n)],
                             {"HX-Request": "true"}),
    }


def report_memory(proc, db: Path | None) -> None:
    """The server's resident and peak memory, if this script started it."""
    if proc:
        mem = memory_kb(proc.pid)
        print(f"\nserver memory: resident {mem['VmRSS'] / 1024:.0f} MB, peak {mem['VmHWM'] / 1024:.0f} MB "
              f"(file {db.stat().st_size / 1e9:.2f} GB)")


def stop(proc) -> None:
    if proc:
        proc.terminate()
        proc.wait(10)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--db", type=Path, help="start `gluscope serve` on this file")
    g.add_argument("--url", help="measure a server already running here")
    p.add_argument("--requests", type=int, default=400, help="requests per scenario and client count (default: 400)")
    p.add_argument("--clients", default="1,16", help="concurrent clients to try (default: 1,16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None,
                   help="reader processes, with --db (default: gluscope serve's, one per usable CPU)")
    p.add_argument("--cold", action="store_true", help="with --db: do not read the file into the page cache first")
    p.add_argument("--only", default=None, help="run only the scenarios whose name contains this (or one of these, comma-separated), "
                        "e.g. examples")
    args = p.parse_args(argv)

    proc = None
    if args.db:
        if not args.cold:
            print(f"read {args.db} once into the OS page cache in {read_through(args.db):.1f} s")
        port = free_port()
        t = time.perf_counter()
        proc = start_server(args.db, port, args.workers)
        print(f"server ({args.workers or 'default'} reader(s)) started in {time.perf_counter() - t:.1f} s on {args.db} "
              f"({args.db.stat().st_size / 1e9:.2f} GB)")
        base = f"http://127.0.0.1:{port}"
    else:
        base = args.url.rstrip("/")
    try:
        model = httpx.get(f"{base}/api/models").json()["models"][0]
        m, n_layers, d_mlp = model["id"], model["n_layers"], model["d_mlp"]
        print(f"model {m}: {n_layers} layers x {d_mlp} neurons; {os.cpu_count()} CPUs on this machine")
        rng = random.Random(args.seed)

        def neurons(n: int) -> list[tuple[int, int]]:
            return [(rng.randrange(n_layers), rng.randrange(d_mlp)) for _ in range(n)]

        lists = [(q, h) for q in QUADRANT_SLUGS for h in HOOKS]

        def sections(layer: int, neuron: int, n: int, prefix: str = "") -> list[str]:
            return [f"{prefix}/models/{m}/neurons/{layer}/{neuron}/examples?quadrant={q}&hook={h}"
                    for q, h in rng.sample(lists, n)]

        # name -> (sessions for n requests, headers). "random" asks each
        # fragment of another random neuron: every request is a cold lookup.
        # "browsing" is what a researcher does: open SECTIONS sections of one
        # neuron, one after the other, on one connection.
        scenarios = {
            "neuron JSON": (lambda n: [[f"/api/models/{m}/neurons/{l}/{i}"] for l, i in neurons(n)], {}),
            "neuron page": (lambda n: [[f"/models/{m}/neurons/{l}/{i}"] for l, i in neurons(n)], {}),
            "examples, random": (lambda n: [sections(l, i, 1) for l, i in neurons(n)], {"HX-Request": "true"}),
            "examples, browsing": (lambda n: [sections(l, i, SECTIONS) for l, i in neurons(n // SECTIONS)],
                                   {"HX-Request": "true"}),
            "examples JSON": (lambda n: [sections(l, i, 1, "/api") for l, i in neurons(n)], {}),
            **finding_scenarios(m, n_layers, d_mlp, model["vocab_size"], rng),
            # Distributions: a neuron's distributions (JSON, and the fragment the neuron page loads), its random and
            # interval lists, and the model page's §5.1 scatter of a layer.
            "histograms JSON": (lambda n: [[f"/api/models/{m}/neurons/{l}/{i}/histograms"] for l, i in neurons(n)], {}),
            "histograms fragment": (lambda n: [[f"/models/{m}/neurons/{l}/{i}/histograms"] for l, i in neurons(n)],
                                    {"HX-Request": "true"}),
            "examples random": (lambda n: [[f"/models/{m}/neurons/{l}/{i}/examples?quadrant={rng.choice(QUADRANT_SLUGS)}"
                                            f"&hook=hook_post&kind=random"] for l, i in neurons(n)], {"HX-Request": "true"}),
            "examples interval": (lambda n: [[f"/models/{m}/neurons/{l}/{i}/examples?quadrant={rng.choice(QUADRANT_SLUGS)}"
                                              f"&hook=hook_post&kind=interval"] for l, i in neurons(n)],
                                  {"HX-Request": "true"}),
            "examples interval JSON": (lambda n: [[f"/api/models/{m}/neurons/{l}/{i}/examples?quadrant="
                                                   f"{rng.choice(QUADRANT_SLUGS)}&hook=hook_post&kind=interval"]
                                                  for l, i in neurons(n)], {}),
            "model page": (lambda n: [[f"/models/{m}?scatter={rng.randrange(n_layers)}"] for _ in range(n)], {}),
            "scatter PNG": (lambda n: [[f"/models/{m}/layers/{rng.randrange(n_layers)}/scatter.png"] for _ in range(n)],
                            {}),
            "scatter click": (lambda n: [[f"/models/{m}/layers/{rng.randrange(n_layers)}/scatter/click?x="
                                          f"{rng.randrange(640)}&y={rng.randrange(400)}"] for _ in range(n)], {}),
        }
        print(f"\n{'scenario':<22}{'clients':>8}{'requests':>10}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'req/s':>8}{'client ms/req':>14}")
        for name, (make_sessions, headers) in scenarios.items():
            if args.only and not any(part in name for part in args.only.split(",")):
                continue
            for clients in (int(c) for c in args.clients.split(",")):
                run(base, make_sessions(20), headers, clients)  # warm up the connections
                lat, wall, client_cpu = run(base, make_sessions(args.requests), headers, clients)
                print(f"{name:<22}{clients:>8}{len(lat):>10}{1000 * percentile(lat, 50):>9.1f}"
                      f"{1000 * percentile(lat, 99):>9.1f}{1000 * lat[-1]:>9.1f}{len(lat) / wall:>8.0f}"
                      f"{1000 * client_cpu / len(lat):>14.2f}")
        report_memory(proc, args.db)
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
