"""This checkout's server against an earlier commit's, both running, measured in alternating rounds.

    python benchmarks/bench_server_ab.py --db /tmp/small.duckdb --baseline 50637f4

This machine's speed drifts by up to a third over minutes, and other work
on it makes that worse, so two runs of bench_server.py minutes apart compare
the machine as much as the code. Here both servers run at once (on the same
file, with the same reader count) and each scenario alternates short rounds
between them, so both see the machine at the same speed; the ratios are
this checkout's over the baseline's. The client is bench_server.run.
The baseline is taken from git (`git archive`) and laid out as the installed
package is, so it needs no install of its own.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx

from bench_server import free_port, percentile, run, start_server
from gluscope.schema import HOOKS, QUADRANT_SLUGS

REPO = Path(__file__).resolve().parent.parent
# The installed package's layout (pyproject.toml, package-dir): these folders sit under gluscope/.
SUBPACKAGES = ("server", "templates", "frontend", "recorder")
HTMX = Path("frontend/static/vendor/htmx.min.js")


def baseline_tree(commit: str, into: Path) -> Path:
    """The baseline's source as an importable `gluscope` package under `into`; the path to put on PYTHONPATH."""
    src = into / "src"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    package = into / "path" / "gluscope"
    shutil.copytree(src / "gluscope", package)
    for name in SUBPACKAGES:
        shutil.copytree(src / name, package / name)
    (package / HTMX.relative_to("frontend")).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / HTMX, package / HTMX.relative_to("frontend"))  # built by npm, not in git
    return into / "path"


def start(db: Path, workers: int, pythonpath: Path | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    # cwd outside the checkout, so that neither server imports this checkout's folders by accident.
    return start_server(db, port, workers, env=env, cwd=tempfile.gettempdir()), f"http://127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", type=Path, required=True)
    p.add_argument("--baseline", required=True, help="a git commit of this repository")
    p.add_argument("--workers", type=int, default=2, help="reader processes of each server (default: 2)")
    p.add_argument("--baseline-workers", type=int, default=None,
                   help="reader processes of the baseline, if not --workers (to compare defaults)")
    p.add_argument("--rounds", type=int, default=6, help="rounds per server and scenario (default: 6)")
    p.add_argument("--requests", type=int, default=80, help="requests per round (default: 80)")
    p.add_argument("--clients", default="1,16")
    p.add_argument("--only", default=None, help="run only the scenarios whose name contains this, e.g. list")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="gluscope-baseline-") as tmp:
        base_workers = args.baseline_workers or args.workers
        servers = {"baseline": start(args.db, base_workers, baseline_tree(args.baseline, Path(tmp))),
                   "this": start(args.db, args.workers, None)}
        try:
            model = httpx.get(f"{servers['this'][1]}/api/models").json()["models"][0]
            m, n_layers, d_mlp = model["id"], model["n_layers"], model["d_mlp"]
            paths = {
                "neuron JSON": ("/api/models/{m}/neurons/{l}/{n}", {}),
                "neuron page": ("/models/{m}/neurons/{l}/{n}", {}),
                "examples fragment": ("/models/{m}/neurons/{l}/{n}/examples?quadrant={q}&hook={h}",
                                      {"HX-Request": "true"}),
                "examples JSON": ("/api/models/{m}/neurons/{l}/{n}/examples?quadrant={q}&hook={h}", {}),
                # Distributions: a neuron's histograms and its sampled lists.
                "histograms fragment": ("/models/{m}/neurons/{l}/{n}/histograms", {"HX-Request": "true"}),
                "histograms JSON": ("/api/models/{m}/neurons/{l}/{n}/histograms", {}),
                "random list": ("/models/{m}/neurons/{l}/{n}/examples?quadrant={q}&hook=hook_post&kind=random", {"HX-Request": "true"}),
                "interval list": ("/models/{m}/neurons/{l}/{n}/examples?quadrant={q}&hook=hook_post&kind=interval",
                                  {"HX-Request": "true"}),
            }
            paths = {name: path for name, path in paths.items() if args.only is None or args.only in name}

            def sessions(template: str, seed: int, count: int) -> list[list[str]]:
                rng = random.Random(seed)
                return [[template.format(m=m, l=rng.randrange(n_layers), n=rng.randrange(d_mlp),
                                         q=rng.choice(QUADRANT_SLUGS), h=rng.choice(HOOKS))] for _ in range(count)]

            print(f"{args.db} ({args.db.stat().st_size / 1e9:.2f} GB), readers: {base_workers} baseline, "
                  f"{args.workers} this; "
                  f"{args.rounds} alternating rounds of {args.requests} requests; ratio = this / baseline "
                  f"({args.baseline})")
            print(f"{'scenario':<21}{'clients':>8}{'p50 base':>10}{'this':>7}{'ratio':>7}"
                  f"{'p99 base':>10}{'this':>7}{'ratio':>7}{'req/s base':>12}{'this':>7}")
            for name, (template, headers) in paths.items():
                for clients in (int(c) for c in args.clients.split(",")):
                    latencies: dict[str, list[float]] = {s: [] for s in servers}
                    walls = dict.fromkeys(servers, 0.0)
                    for side in servers:  # warm up the connections
                        run(servers[side][1], sessions(template, -1, 20), headers, clients)
                    for r in range(args.rounds):
                        for side in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
                            lat, wall, _ = run(servers[side][1], sessions(template, r, args.requests), headers, clients)
                            latencies[side] += lat
                            walls[side] += wall
                    (b50, b99, brate), (t50, t99, trate) = (
                        (1000 * percentile(sorted(latencies[s]), 50), 1000 * percentile(sorted(latencies[s]), 99),
                         len(latencies[s]) / walls[s]) for s in servers)
                    print(f"{name:<21}{clients:>8}{b50:>10.1f}{t50:>7.1f}{t50 / b50:>7.2f}{b99:>10.1f}{t99:>7.1f}"
                          f"{t99 / b99:>7.2f}{brate:>12.0f}{trate:>7.0f}", flush=True)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(10)


if __name__ == "__main__":
    main()
