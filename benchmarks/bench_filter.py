"""Latency of the whole-model filter and of the comparison, against the neuron JSON of the same run.

    python benchmarks/bench_filter.py --db data/synthetic.duckdb      # starts `gluscope serve` on a free port
    python benchmarks/bench_filter.py --url http://127.0.0.1:8000     # or measures a server already running

With 1 and 16 concurrent clients (bench_server.py's closed-loop client): the
neuron JSON (the baseline, answered from memory), filters of random bounds
over random layer ranges (the example the filter was specified with: a frequency floor, a
cosine ceiling, sorted by a quadrant's largest |hook_post|), filters over the
whole model sorted by a field (one of its first 10 pages of 100), the
comparison JSON and its page (2 to 4 random neurons, none cached), and a
researcher's comparison: 2 to 4 random neurons, then 3 other lists of them
(4 htmx requests in a row on one connection, the later three from the
neurons' cached examples). Each line gives p50/p99 and the p99's ratio to the
baseline's p99 at the same client count. Before measuring, the SQL shapes the
filter could take are timed once in this process on the file itself (one
DuckDB thread, as a reader runs), which is why queries.NEURON_FACTS exists,
and each view is timed in this process against one cold lookup of a
neuron's examples (what the examples fragment costs): `--views-only` stops there.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

import duckdb
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import free_port, percentile, read_through, report_memory, run, start_server, stop  # noqa: E402

from gluscope.schema import HOOKS, QUADRANT_SLUGS  # noqa: E402
from gluscope.server import queries  # noqa: E402


def time_sql_shapes(db: Path) -> None:
    """The filter's SQL, with value_stats joined per request, against the scan of neuron_facts."""
    con = duckdb.connect(str(db), read_only=True)
    con.execute("SET threads = 1")

    def best(sql: str, n: int = 3) -> float:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            con.execute(sql).fetchall()
            out.append(time.perf_counter() - t)
        return 1000 * min(out)

    n_tokens = con.execute("SELECT greatest(n_tokens, 1) FROM metadata").fetchall()[0][0]
    join = f"""SELECT n.layer, n.neuron, greatest(abs(v.min), abs(v.max)) AS a, count(*) OVER ()
        FROM neurons n JOIN value_stats v ON v.layer = n.layer AND v.neuron = n.neuron AND v.hook = 0 AND v.quadrant = 3
        WHERE n.count_nn / {n_tokens} >= 0.2 ORDER BY a DESC, n.layer, n.neuron LIMIT 50"""
    t = time.perf_counter()
    con.execute(queries.NEURON_FACTS)
    build = time.perf_counter() - t
    bounds = [("freq_nn", "min")]
    filled = {"$layer_lo": "0", "$layer_hi": "99999", "$min_freq_nn": "0.2", "$limit": "50", "$offset": "0"}

    def fill(sql: str) -> str:
        for name, value in filled.items():
            sql = sql.replace(name, value)
        return sql

    page = fill(queries.neuron_filter(bounds, ["freq_nn", "absmax_nn"], "absmax_nn", True))
    count = fill(queries.neuron_filter_count(bounds))
    print(f"SQL on one DuckDB thread, whole model, gate-_in- freq >= 0.2 by its max |hook_post|: "
          f"join value_stats per request {best(join):.1f} ms; neuron_facts page {best(page):.1f} ms "
          f"+ count {best(count):.1f} ms (table built once in {build:.2f} s)")
    con.close()


def time_views(db: Path, n: int = 20, seed: int = 0) -> None:
    """Each request's view run in this process as a reader runs it (one at a time, nothing contending but
    the machine's other work): median ms, and the ratio to one cold lookup of a neuron's examples."""
    from statistics import median

    from gluscope.server import data, filter_compare, render
    from gluscope.server.db import open_databases
    from gluscope.server.views import run_view

    registry = open_databases([db], neuron_table=False)
    model = next(iter(registry.values()))
    render.token_spans(model.vocab)
    model.temp_table("neuron_facts")
    rng = random.Random(seed)
    n_layers, d_mlp = model.n_layers, model.d_mlp
    none = {name: None for name in filter_compare.BOUND_NAMES}

    def refs(k: int) -> str:
        return ",".join(f"{rng.randrange(n_layers)}.{rng.randrange(d_mlp)}" for _ in range(k))

    def example() -> None:
        lo = rng.randrange(n_layers - 9)
        run_view(registry, "neuron_filter", model.id, "json",
                 {"layers": f"{lo}-{lo + 9}", "sort": "absmax_nn", "order": None, "offset": 0, "limit": 50,
                  **none, "min_freq_nn": 0.2, "max_cos_in_out": rng.uniform(-0.5, 0.5)})

    def whole() -> None:
        run_view(registry, "neuron_filter", model.id, "json",
                 {"layers": None, "sort": rng.choice(list(queries.FILTER_FIELDS)), "order": None,
                  "offset": 100 * rng.randrange(10), "limit": 100, **none})

    def compare(kind: str, k: int) -> None:
        run_view(registry, "compare", model.id, kind, {"neurons": refs(k), "quadrant": "nn", "hook": "hook_post"})

    cases = {
        "examples of one neuron, cold (data.read_example_list)":
            lambda: data.read_example_list(model, rng.randrange(n_layers), rng.randrange(d_mlp), "nn", "hook_post"),
        "filter, example (JSON)": example,
        "filter, whole model sorted (JSON)": whole,
        "compare 2 neurons, cold (JSON)": lambda: compare("json", 2),
        "compare 4 neurons, cold (JSON)": lambda: compare("json", 4),
        "compare 4 neurons, cold (page)": lambda: compare("page", 4),
    }
    print(f"\nviews in this process, median of {n} ({'ms':>6}, ratio to one neuron's examples)")
    base = None
    for name, fn in cases.items():
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        ms = 1000 * median(times)
        base = base or ms
        print(f"  {name:<50}{ms:>8.1f}{ms / base:>8.2f}")
    # The same 4 neurons again with other lists (a researcher switching lists): their examples are cached.
    kept = refs(4)
    run_view(registry, "compare", model.id, "fragment", {"neurons": kept, "quadrant": "nn", "hook": "hook_post"})
    times = []
    for q in QUADRANT_SLUGS:
        for h in HOOKS:
            t = time.perf_counter()
            run_view(registry, "compare", model.id, "fragment", {"neurons": kept, "quadrant": q, "hook": h})
            times.append(time.perf_counter() - t)
    ms = 1000 * median(times)
    print(f"  {'compare 4 neurons, another list (fragment, cached)':<50}{ms:>8.1f}{ms / base:>8.2f}")
    for m in registry.values():
        m.con.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--db", type=Path)
    g.add_argument("--url")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--clients", default="1,16")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--views-only", action="store_true", help="with --db: time the views in this process only")
    p.add_argument("--only", default=None, help="run only the scenarios whose name contains this (and the baseline)")
    args = p.parse_args(argv)

    proc = None
    if args.db:
        print(f"read {args.db} once into the OS page cache in {read_through(args.db):.1f} s")
        time_sql_shapes(args.db)
        time_views(args.db)
        if args.views_only:
            return
        port = free_port()
        t = time.perf_counter()
        proc = start_server(args.db, port, args.workers)
        print(f"server started in {time.perf_counter() - t:.1f} s ({args.db.stat().st_size / 1e9:.2f} GB file)")
        base = f"http://127.0.0.1:{port}"
    else:
        base = args.url.rstrip("/")
    try:
        model = httpx.get(f"{base}/api/models").json()["models"][0]
        m, n_layers, d_mlp = model["id"], model["n_layers"], model["d_mlp"]
        rng = random.Random(args.seed)

        def example_filter() -> str:
            lo = rng.randrange(n_layers)
            hi = min(n_layers - 1, lo + rng.randrange(10))
            q = rng.choice(QUADRANT_SLUGS)
            query = {"layers": f"{lo}-{hi}", f"min_freq_{q}": round(rng.uniform(0.05, 0.4), 2),
                     "max_cos_in_out": round(rng.uniform(-0.5, 0.5), 2), "sort": f"absmax_{q}"}
            return f"/api/models/{m}/neurons?{urlencode(query)}"

        def whole_model_sort() -> str:
            field = rng.choice(list(queries.FILTER_FIELDS))
            query = {"sort": field, "order": rng.choice(("asc", "desc")), "offset": 100 * rng.randrange(10),
                     "limit": 100}
            return f"/api/models/{m}/neurons?{urlencode(query)}"

        def neurons_to_compare() -> str:
            refs = {(rng.randrange(n_layers), rng.randrange(d_mlp)) for _ in range(rng.randint(2, 4))}
            while len(refs) < 2:
                refs.add((rng.randrange(n_layers), rng.randrange(d_mlp)))
            return urlencode({"neurons": ",".join(f"{a}.{b}" for a, b in refs),
                              "quadrant": rng.choice(QUADRANT_SLUGS), "hook": rng.choice(HOOKS)})

        def switching_lists() -> list[str]:
            """A researcher's comparison: open it, then switch the list 3 times (htmx fragments, from the
            neurons' cached examples)."""
            first = neurons_to_compare()
            neurons = first.split("&")[0]
            lists = rng.sample([(q, h) for q in QUADRANT_SLUGS for h in HOOKS], 3)
            return [f"/models/{m}/compare?{first}"] + [f"/models/{m}/compare?{neurons}&quadrant={q}&hook={h}"
                                                       for q, h in lists]

        scenarios = {
            "neuron JSON": lambda: [f"/api/models/{m}/neurons/{rng.randrange(n_layers)}/{rng.randrange(d_mlp)}"],
            "filter, example": lambda: [example_filter()],
            "filter, whole model": lambda: [whole_model_sort()],
            "filter page": lambda: [example_filter().replace("/api/models/", "/models/")],
            "compare JSON": lambda: [f"/api/models/{m}/compare?{neurons_to_compare()}"],
            "compare page": lambda: [f"/models/{m}/compare?{neurons_to_compare()}"],
            "compare, 4 lists": lambda: switching_lists(),
        }
        print(f"\n{'scenario':<22}{'clients':>8}{'requests':>10}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
              f"{'req/s':>8}{'p99/baseline':>14}")
        baseline: dict[int, float] = {}
        for name, make in scenarios.items():
            if args.only and args.only not in name and name != "neuron JSON":
                continue
            for clients in (int(c) for c in args.clients.split(",")):
                run(base, [make() for _ in range(20)], {}, clients)  # warm up the connections
                sessions = [make() for _ in range(args.requests // len(make()))]
                lat, wall, _ = run(base, sessions, {"HX-Request": "true"} if name == "compare, 4 lists" else {},
                                   clients)
                p99 = percentile(lat, 99)
                baseline.setdefault(clients, p99)
                print(f"{name:<22}{clients:>8}{len(lat):>10}{1000 * percentile(lat, 50):>9.1f}{1000 * p99:>9.1f}"
                      f"{1000 * lat[-1]:>9.1f}{len(lat) / wall:>8.0f}{p99 / baseline[clients]:>14.2f}")
        report_memory(proc, args.db)
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
