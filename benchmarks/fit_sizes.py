"""Measure what each table of recorded databases takes per row, for recorder/sizes.py's constants, and how far
sizes.estimate is from each file.

    python benchmarks/fit_sizes.py /work/demo/demo.duckdb /tmp/syn.duckdb ...
    python benchmarks/fit_sizes.py --scale 16 /tmp/moe-2-layers.duckdb /tmp/moe-4-layers.duckdb

A table's size is the 64 KiB blocks its columns use (pragma_storage_info; a block shared by several tables is
split among them). Per file it prints the bytes per row of each table and the ratios sizes.py assumes, then the
mean of each over the files where the table fills at least FIT_MIN_BLOCKS blocks (smaller tables are mostly the
rounding of their last block), then the ratios of how example lists overlap over the real recordings (not
make_synthetic_db's files, whose lists overlap otherwise), then sizes.estimate beside each file's real size.
window_row is fitted on files without experts, and window_nan_token (a NaN of an expert neuron's window, which
compresses) on files with them, given window_row.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import duckdb
import numpy as np

from gluscope.recorder import sizes

FIT_MIN_BLOCKS = 8


def table_bytes(con: duckdb.DuckDBPyConnection) -> dict[str, float]:
    owners: dict[int, set[str]] = collections.defaultdict(set)
    for (table,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall():
        for block, extra in con.execute(f"SELECT block_id, additional_block_ids FROM pragma_storage_info('{table}') "
                                        "WHERE block_id >= 0").fetchall():
            for b in [block, *(extra or [])]:
                owners[b].add(table)
    share: dict[str, float] = collections.Counter()
    for tables in owners.values():
        for table in tables:
            share[table] += sizes.BLOCK / len(tables)
    return dict(share)


def file_shape(con: duckdb.DuckDBPyConnection) -> sizes.ModelShape:
    n_layers, d_mlp, vocab = con.execute("SELECT n_layers, d_mlp, vocab_size FROM metadata").fetchone()
    tables = {t for (t,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    rows = con.execute("SELECT layer, n_neurons, n_experts, top_k FROM layers ORDER BY layer").fetchall() \
        if "layers" in tables else []
    if not rows:
        return sizes.ModelShape(tuple(sizes.LayerShape(d_mlp) for _ in range(n_layers)), vocab)
    width = dict(con.execute("SELECT layer, min(n_neurons) FROM experts WHERE NOT shared GROUP BY layer").fetchall())
    return sizes.ModelShape(tuple(sizes.LayerShape(n, e, width.get(layer, 0), top_k) if e else sizes.LayerShape(n)
                                  for layer, n, e, top_k in rows), vocab)


def measure(path: Path) -> dict:
    con = duckdb.connect(str(path), read_only=True)
    size = table_bytes(con)
    rows = {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in size}
    shape = file_shape(con)
    k, before, after, tool = con.execute("SELECT k, window_before, window_after, tool_version FROM metadata").fetchone()
    lengths = np.array([n for (n,) in con.execute("SELECT n_tokens FROM texts ORDER BY text_id").fetchall()])
    window_tokens = con.execute("SELECT sum(len(x_gate)) FROM windows").fetchone()[0] or 0
    moe = any(layer.experts for layer in shape.layers)
    # An expert neuron's window holds NaN (float16 0x7E00 = 32256) at tokens routed elsewhere; those compress.
    nan_tokens = con.execute("SELECT sum(list_count(list_filter(x_gate, lambda x: x = 32256))) FROM windows"
                             ).fetchone()[0] if moe else 0
    distinct_top = con.execute("SELECT count(*) FROM (SELECT DISTINCT layer, neuron, text_id, position "
                               "FROM examples)").fetchone()[0]
    distinct_tokens = con.execute("SELECT count(DISTINCT t) FROM (SELECT unnest(token_ids[2:]) AS t FROM texts)"
                                  ).fetchone()[0]
    per_row = {t: size[t] / rows[t] for t in size if rows[t]}
    neurons = shape.neurons
    m = {
        "path": path, "file": path.stat().st_size, "synthetic": tool == "synthetic", "shape": shape, "k": k,
        "before": before, "after": after,
        "lengths": lengths, "distinct_tokens": distinct_tokens, "size": size, "rows": rows,
        "bytes": {**per_row,
                  "histograms_neuron": size.get("histograms", 0) / neurons,
                  "density_neuron": size.get("density", 0) / neurons,
                  **({"window_nan_token": (size["windows"] - rows["windows"] * sizes.BYTES["window_row"]
                                           - 4 * (window_tokens - nan_tokens)) / nan_tokens} if moe else
                     {"window_row": (size["windows"] - 4 * window_tokens) / rows["windows"]}),
                  "text_token": size["texts"] / lengths.sum()},
        "ratios": {"DISTINCT_TOP": distinct_top / rows["examples"],
                   "DISTINCT_SAMPLE": (rows["windows"] - distinct_top) / rows["samples"],
                   "EXAMPLE_TOKENS_PER_ENTRY": rows["example_tokens"] / (rows["examples"] + rows["samples"]),
                   "FILE_OVERHEAD": path.stat().st_size / sum(size.values()) - 1},
        "blocks": {**{t: size[t] / sizes.BLOCK for t in size},
                   "histograms_neuron": size.get("histograms", 0) / sizes.BLOCK,
                   "density_neuron": size.get("density", 0) / sizes.BLOCK,
                   "window_row": size["windows"] / sizes.BLOCK, "window_nan_token": size["windows"] / sizes.BLOCK,
                   "text_token": size["texts"] / sizes.BLOCK},
        # Numerator and denominator of each ratio, added up over the files.
        "counts": {"DISTINCT_TOP": (distinct_top, rows["examples"]),
                   "DISTINCT_SAMPLE": (rows["windows"] - distinct_top, rows["samples"]),
                   "EXAMPLE_TOKENS_PER_ENTRY": (rows["example_tokens"], rows["examples"] + rows["samples"])},
    }
    con.close()
    return m


def scale(files: list[Path], layers: int) -> None:
    """Two files of one shape but for their number of layers: per table the bytes one more layer adds per neuron,
    and the file of `layers` layers by a straight line through the two (its layers' tables grow by a layer's worth
    each; texts, vocab and token_neurons stay)."""
    (a, b) = sorted(files, key=lambda f: duckdb.connect(str(f), read_only=True).execute(
        "SELECT n_layers FROM metadata").fetchone()[0])
    parts = []
    for f in (a, b):
        con = duckdb.connect(str(f), read_only=True)
        parts.append((table_bytes(con), *con.execute("SELECT n_layers, d_mlp FROM metadata").fetchone(),
                      f.stat().st_size))
        con.close()
    (ta, la, d, sa), (tb, lb, _, sb) = parts
    per_layer = (sb - sa) / (lb - la)
    fixed = sa - la * per_layer
    total = fixed + layers * per_layer
    print(f"{a.name}: {la} layers, {sa / 1e9:.3f} GB; {b.name}: {lb} layers, {sb / 1e9:.3f} GB")
    print(f"  a layer of {d:,} neurons adds {per_layer / 1e6:,.1f} MB ({per_layer / d:,.0f} bytes per neuron); "
          f"the rest {fixed / 1e6:,.1f} MB")
    print(f"  {layers} layers: {total / 1e9:.2f} GB, {total / (layers * d):,.0f} bytes per neuron of the whole file")
    added = {t: (tb.get(t, 0) - ta.get(t, 0)) / (lb - la) / d for t in set(ta) | set(tb)}
    added["(free blocks, headers)"] = per_layer / d - sum(added.values())
    print("  bytes per neuron by table:")
    for t, v in sorted(added.items(), key=lambda x: -x[1]):
        if abs(v) >= 0.5:
            print(f"    {t:24s} {v:10,.0f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--scale", type=int, metavar="LAYERS", default=None,
                   help="instead: two files of one shape with different layer counts, scaled to LAYERS layers")
    args = p.parse_args(argv)
    if args.scale is not None:
        if len(args.files) != 2:
            p.error("--scale takes two files")
        return scale(args.files, args.scale)
    measured = [measure(f) for f in args.files]
    fits: dict[str, list[float]] = collections.defaultdict(list)
    pooled: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0])
    for m in measured:
        print(f"{m['path']}: {m['file'] / 1e6:,.1f} MB, {m['shape'].describe()}, {len(m['lengths']):,} texts, "
              f"{int((m['lengths'] - 1).sum()):,} tokens, k {m['k']}, window {m['before']}+{m['after']}")
        for name in sorted(m["bytes"]):
            blocks = m["blocks"].get(name, 0)
            mark = "" if blocks >= FIT_MIN_BLOCKS else "   (too small to fit)"
            if not mark:
                fits[name].append(m["bytes"][name])
            rows = f"{m['rows'][name]:>13,} rows" if name in m["rows"] else " " * 18
            print(f"  {name:18s} {m['bytes'][name]:10.2f} B  {rows}  {blocks:9.1f} blocks{mark}")
        for name, value in m["ratios"].items():
            # How lists overlap is the activations': make_synthetic_db's candidates overlap otherwise.
            mark = "   (synthetic: not fitted)" if m["synthetic"] and name != "FILE_OVERHEAD" else ""
            if name == "FILE_OVERHEAD":
                fits[name].append(value)
            elif not mark:
                pooled[name][0] += m["counts"][name][0]
                pooled[name][1] += m["counts"][name][1]
            print(f"  {name:26s} {value:.3f}{mark}")
    print("\nmean over the files where a table fills at least "
          f"{FIT_MIN_BLOCKS} blocks (sizes.BYTES and ratios now):")
    now = {**sizes.BYTES, "DISTINCT_TOP": sizes.DISTINCT_TOP, "DISTINCT_SAMPLE": sizes.DISTINCT_SAMPLE,
           "EXAMPLE_TOKENS_PER_ENTRY": sizes.EXAMPLE_TOKENS_PER_ENTRY, "FILE_OVERHEAD": sizes.FILE_OVERHEAD}
    for name in sorted(fits):
        print(f"  {name:26s} {np.mean(fits[name]):10.3f}   over {len(fits[name])} files   (now {now.get(name, '-')})")
    print("ratios of the real recordings, their counts added up over the files (the largest file weighs most):")
    for name, (num, den) in sorted(pooled.items()):
        print(f"  {name:26s} {num / den:10.3f}   (now {now[name]})")
    print("\nsizes.estimate beside the real file:")
    for m in measured:
        est = sizes.estimate(m["shape"], m["lengths"], k=m["k"], window_before=m["before"],
                             window_after=m["after"], distinct_tokens=m["distinct_tokens"])
        print(f"  {str(m['path']):60s} real {m['file'] / 1e6:12,.1f} MB  estimate {est.total / 1e6:12,.1f} MB  "
              f"({est.total / m['file'] - 1:+.1%})")
        worst = sorted(((est.tables.get(t, 0) - s, t) for t, s in m["size"].items()), key=lambda x: -abs(x[0]))[:4]
        print("      largest differences: " + ", ".join(f"{t} {d / 1e6:+,.1f} MB" for d, t in worst))


if __name__ == "__main__":
    main()
