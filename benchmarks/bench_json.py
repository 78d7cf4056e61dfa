"""What an examples JSON body costs the server, per step, on random lists of a database file.

    python benchmarks/bench_json.py --db data/synthetic.duckdb

Builds each list's body (data.ExampleList.to_json), encodes it with the
standard library's json (as the server did) and with orjson (as it does),
and validates it against its response model (responses.ExampleListBody),
which the server does not do at run time: the models document the bodies,
and tests/test_openapi.py checks them. The steps run one after the other on
each body, so all of them see the machine at the same speed.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import orjson

from gluscope.schema import HOOKS, QUADRANT_SLUGS
from gluscope.server import data
from gluscope.server.db import open_databases
from gluscope.server.responses import ExampleListBody


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", required=True)
    p.add_argument("--lists", type=int, default=200, help="random lists to measure (default: 200)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    db = next(iter(open_databases([args.db], neuron_table=False).values()))
    rng = random.Random(args.seed)
    lists = [data.read_example_list(db, rng.randrange(db.n_layers), rng.randrange(db.d_mlp),
                                    rng.choice(QUADRANT_SLUGS), rng.choice(HOOKS)) for _ in range(args.lists)]
    steps = {"build the dict (to_json)": 0.0, "encode with json": 0.0, "encode with orjson": 0.0,
             "validate with pydantic": 0.0}
    size = 0
    for _ in range(args.repeat):
        for found in lists:
            t0 = time.perf_counter()
            body = found.to_json(db.vocab)
            t1 = time.perf_counter()
            encoded = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
            t2 = time.perf_counter()
            fast = orjson.dumps(body)
            t3 = time.perf_counter()
            ExampleListBody.model_validate(body)
            t4 = time.perf_counter()
            if json.loads(encoded) != json.loads(fast):
                raise SystemExit("json and orjson disagree")
            for name, dt in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                steps[name] += dt
            size += len(fast)
    n = args.repeat * len(lists)
    print(f"{db.id}: {n} bodies of {args.lists} random lists, {size / n / 1024:.1f} KiB each on average")
    for name, total in steps.items():
        print(f"{name:<28}{1000 * total / n:8.3f} ms per body")


if __name__ == "__main__":
    main()
