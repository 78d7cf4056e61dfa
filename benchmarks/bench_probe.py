"""The probe's cost per request against a bare Hugging Face forward of the same tokens, measured in one run.

    python benchmarks/bench_probe.py --db /work/demo/demo.duckdb --device cpu

The baseline is the model the database was recorded from, loaded again with
transformers.AutoModelForCausalLM.from_pretrained (the folder the probe loads
first: a GGUF file's converted folder in the cache, else the source), eval(),
one [1, T] forward with logits under torch.inference_mode(). The probe is
measured two ways:

  in-process  the request's Plan (tokenizing and checking), Passes.run and
              finish, on a worker thread as the probe's batcher runs them (the
              baseline runs on the same thread): the compute cost, and each
              of its three parts;
  HTTP        POST /models/{model}/{answer} to a `gluscope probe` started as
              a subprocess (its own process, as it is deployed), JSON body in
              and out, with one and with four clients (threads issuing
              requests back to back, each with its own keep-alive connection).

The texts have exactly T tokens through the model (--tokens, default 64: BOS
and T-1 tokens of a corpus text of the database, cut, decoded and checked to
tokenize back to the same ids through the probe's own tokenize). Every round
runs the baseline and each variant once, in turn, on the same text, so that
all of them see the machine at the same speed (its speed drifts); ratios are
p50 over the baseline's p50. The 4-client load runs against two probes, one
with batching (the default --batch-tokens) and one with --batch-tokens 1 (no
two requests share a pass), in alternating rounds.

Requests: activations of one neuron in the last layer (the whole model runs;
a neuron in an earlier layer stops the pass there, which --early-neuron
shows), the neurons that fire at the last token over every layer (top 10),
and ablate (zero one neuron: two rows with logits, so about twice the bare
forward). Neither activations nor fire needs logits, so their pass skips the
final norm and the unembedding that the bare forward computes; "probe pass
with logits" (Passes.run of one row with logits) does the bare forward's
work through the bridge and the probe's hooks, like for like. Last, one pass
over 4 texts against one over a single text: what batching saves in compute.

torch keeps its default thread count in this process and in the probes
(none is set; the figure is printed). Other jobs on the machine slow every
figure; the load average is printed as the run goes.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from bench_server import free_port, percentile

REPO = Path(__file__).resolve().parent.parent


def start_probe(db: Path, device: str, batch_tokens: int | None, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "gluscope.cli", "probe", str(db), "--device", device, "--port", str(port)]
    if batch_tokens is not None:
        cmd += ["--batch-tokens", str(batch_tokens)]
    # cwd outside the checkout: the installed package, as `gluscope probe` runs.
    proc = subprocess.Popen(cmd, cwd=tempfile.gettempdir(), stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, log: Path, limit_s: float = 300) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the probe exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the probe did not start within {limit_s:.0f} s")


def texts_of(lm, n_tokens: int, count: int) -> list[tuple[str, list[int]]]:
    """`count` texts that the probe runs as exactly n_tokens ids (BOS first): (text, ids)."""
    from gluscope.probe.answers import Limits, tokenize

    out = []
    for (ids,) in lm.db.query("SELECT token_ids FROM texts WHERE n_tokens > $n ORDER BY text_id", {"n": n_tokens}):
        # Cut a corpus text after n_tokens - 1 tokens (after its BOS) and decode; a cut can merge or split
        # tokens at the edge when tokenized again, so keep only the texts whose ids come back unchanged.
        text = lm.model.tokenizer.decode(ids[1:n_tokens])
        back = tokenize(lm, text, Limits())
        if len(back) == n_tokens and back[1:] == list(ids[1:n_tokens]):
            out.append((text, back))
            if len(out) == count:
                return out
    raise SystemExit(f"only {len(out)} texts of the database tokenize back to {n_tokens} tokens")


def stats(values: list[float]) -> tuple[float, float]:
    s = sorted(values)
    return 1000 * percentile(s, 50), 1000 * percentile(s, 99)


def load(url: str, path: str, bodies: list[dict], clients: int, count: int) -> tuple[list[float], float]:
    """`count` requests from `clients` threads, each back to back on its own connection: latencies and wall."""
    latencies: list[float] = []
    lock = threading.Lock()
    next_i = [0]
    failures: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            while True:
                with lock:
                    i = next_i[0]
                    next_i[0] += 1
                if i >= count:
                    return
                t = time.perf_counter()
                r = http.post(path, json=bodies[i % len(bodies)])
                took = time.perf_counter() - t
                with lock:
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                    latencies.append(took)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    if failures:
        raise SystemExit(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return latencies, wall


def loadavg() -> str:
    """The machine's load average (1, 5, 15 min): other jobs on it slow every figure."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=64, help="tokens through the model per text, BOS included "
                                                          "(default: 64)")
    p.add_argument("--texts", type=int, default=8, help="distinct texts, taken in turn (default: 8)")
    p.add_argument("--rounds", type=int, default=25, help="rounds of the one-client comparison (default: 25)")
    p.add_argument("--requests", type=int, default=32,
                   help="requests per answer and probe in the 4-client load (default: 32)")
    p.add_argument("--neuron", default=None, help="the activations neuron (default: neuron 0 of the last layer)")
    p.add_argument("--early-neuron", default=None, help="another, in an earlier layer (default: neuron 0 of the "
                                                        "middle layer); 'none' to skip")
    p.add_argument("--out", type=Path, default=None, help="also write what is printed to this file")
    args = p.parse_args(argv)

    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    from transformers import AutoModelForCausalLM
    import transformers

    from gluscope.probe.answers import PLANS, Limits
    from gluscope.probe.forward import Passes, Read, Row
    from gluscope.probe.loaded import candidate_sources, load_for
    from gluscope.probe_protocol import BATCH_TOKENS, AblateRequest, ActivationsRequest, FireRequest
    from gluscope.server.db import open_databases

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.split("\n")
    changed = sorted({line[3:] for line in dirty if line.strip()})
    say(f"# python benchmarks/bench_probe.py {shlex.join(sys.argv[1:] if argv is None else argv)}")
    say(f"# commit {commit}" + (f" with uncommitted changes in {', '.join(changed)}" if changed else ""))
    say(f"# {machine()}")
    say(f"# torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}; "
        f"torch threads {torch.get_num_threads()} (the default, here and in the probes; OMP_NUM_THREADS "
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')})")

    began = time.perf_counter()
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-passes")
    tmp = Path(tempfile.mkdtemp(prefix="gluscope-bench-probe-"))
    # The probes load while this process does: batching on (the default) and off (no two requests fit 1 token).
    probes = {"on": start_probe(args.db, args.device, None, tmp / "on.log"),
              "off": start_probe(args.db, args.device, 1, tmp / "off.log")}
    try:
        (model_id, db), = open_databases([args.db]).items()
        lm = load_for(db, args.device)
        passes = Passes(lm)
        folder = candidate_sources(db.meta, None)[0]
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=lm.model.dtype).to(lm.model.device).eval()
        for side, (proc, url) in probes.items():
            wait_ready(proc, url, tmp / f"{side}.log")
        say(f"# loaded in {time.perf_counter() - began:.0f} s (this process and two probes at once); load average "
            f"{loadavg()}")

        n_layers, d_mlp = lm.model.n_layers, lm.model.d_mlp
        neuron = args.neuron or f"{n_layers - 1}.0"
        early = None if args.early_neuron == "none" else (args.early_neuron or f"{n_layers // 2}.0")
        texts = texts_of(lm, args.tokens, args.texts)
        limits = Limits()
        requests = {
            f"activations {neuron}": ("activations", lambda t: ActivationsRequest(text=t, neurons=neuron)),
            "fire": ("fire", lambda t: FireRequest(text=t)),
            "ablate": ("ablate", lambda t: AblateRequest(text=t, neurons=neuron)),
        }
        if early:
            requests[f"activations {early}"] = ("activations", lambda t: ActivationsRequest(text=t, neurons=early))
        bodies = {name: [make(t).model_dump(exclude_none=True) for t, _ in texts]
                  for name, (_, make) in requests.items()}

        say(f"{args.db} ({model_id}: {n_layers} layers x {d_mlp} neurons, {lm.model.dtype}, {args.device}); "
            f"{len(texts)} texts of {args.tokens} tokens (BOS included)")
        say(f"baseline: AutoModelForCausalLM.from_pretrained({folder}) "
            f"[{hf.config._attn_implementation} attention], eval, inference_mode, [1, {args.tokens}] -> logits")

        # The in-process calls run on one worker thread, as the probe's passes do (its batcher's thread), not on
        # this main thread: on this 2-core machine, loaded by other jobs, a forward on the main thread with
        # torch's default 2 threads was measured 5-10 times slower than the same forward on another thread.

        def timed(fn, *a) -> float:
            def call() -> float:
                t = time.perf_counter()
                fn(*a)
                return time.perf_counter() - t
            return worker.submit(call).result()

        def bare(ids: list[int]) -> None:
            with torch.inference_mode():
                hf(torch.tensor([ids], device=hf.device)).logits

        parts: dict[str, list[float]] = {}  # the last in-process call's plan, pass and finish seconds

        def in_process(answer: str, request) -> dict:
            t0 = time.perf_counter()
            plan = PLANS[answer](lm, request, limits)
            t1 = time.perf_counter()
            results = passes.run(plan.rows)
            t2 = time.perf_counter()
            body = plan.finish(results)
            parts["last"] = [t1 - t0, t2 - t1, time.perf_counter() - t2]
            return body

        # The probe answers as this process computes (same model, same rows, one pass each).
        with httpx.Client(base_url=probes["on"][1], timeout=120) as http:
            for name, (answer, make) in requests.items():
                text = texts[0][0]
                got = http.post(f"/models/{model_id}/{answer}", json=bodies[name][0]).json()
                if got != worker.submit(in_process, answer, make(text)).result():
                    raise SystemExit(f"{name}: the probe's answer differs from this process's")

        # --- one client, every variant in turn on the same text ---------------------------------
        times: dict[str, list[float]] = collections.defaultdict(list)
        http = httpx.Client(base_url=probes["on"][1], timeout=120)
        for r in range(-2, args.rounds):  # two rounds of warm-up
            text, ids = texts[r % len(texts)]
            took = {"bare HF forward": timed(bare, ids),
                    "probe pass with logits": timed(passes.run, [Row(ids, logits=True)])}
            for name, (answer, make) in requests.items():
                took[f"{name} in-process"] = timed(in_process, answer, make(text))
                for part, seconds in zip(("plan", "pass", "finish"), parts["last"]):
                    took[f"{name} {part}"] = seconds
                t = time.perf_counter()
                reply = http.post(f"/models/{model_id}/{answer}", json=bodies[name][r % len(texts)])
                took[f"{name} HTTP"] = time.perf_counter() - t
                if reply.status_code != 200:
                    raise SystemExit(f"{name}: {reply.status_code} {reply.text[:300]}")
            if r >= 0:
                for k, v in took.items():
                    times[k].append(v)
        http.close()

        base50, base99 = stats(times["bare HF forward"])
        say()
        say(f"# load average {loadavg()} after the one-client rounds")
        say(f"one client: {args.rounds} rounds, each variant once per round on the same text (p99 of "
            f"{args.rounds}: {'the largest' if args.rounds <= 50 else 'the largest but one or so'}); "
            f"ratio = p50 / the bare forward's p50; the targets are the HTTP request's")
        say(f"{'request':<34}{'p50 ms':>9}{'p99 ms':>9}{'ratio':>7}{'target':>8}")
        say(f"{'bare HF forward':<34}{base50:>9.1f}{base99:>9.1f}{1:>7.2f}")
        p50, p99 = stats(times["probe pass with logits"])
        say(f"{'probe pass with logits':<34}{p50:>9.1f}{p99:>9.1f}{p50 / base50:>7.2f}   (Passes.run of one row with "
            "logits and no reads: the same work as the bare forward, through the bridge and the probe's hooks)")
        targets = {"activations": 1.3, "fire": 1.5}
        for name, (answer, _) in requests.items():
            for how in ("in-process", "HTTP"):
                p50, p99 = stats(times[f"{name} {how}"])
                target = targets.get(answer) if how == "HTTP" and name != f"activations {early}" else None
                mark = "" if target is None else f"{target:.1f} {'met' if p50 / base50 <= target else 'MISSED'}"
                say(f"{name + ' ' + how:<34}{p50:>9.1f}{p99:>9.1f}{p50 / base50:>7.2f}{mark:>12}")
        say("in-process, its parts (p50 ms): plan (tokenize, check) / the forward pass (Passes.run) / finish "
            "(the body)")
        for name in requests:
            say(f"  {name:<32}" + " / ".join(f"{stats(times[f'{name} {part}'])[0]:.1f}"
                                             for part in ("plan", "pass", "finish")))

        # --- four clients, batching on and off ------------------------------------------------------
        rounds = 2  # on, off, off, on: long enough rounds that starting and draining the 4 clients matter little
        say()
        say(f"four clients (threads, back to back), {args.requests} requests per answer and probe in {rounds} "
            f"rounds each (on, off, off, on); batching on: --batch-tokens {BATCH_TOKENS} (the default), off: "
            f"--batch-tokens 1 (no two requests share a pass); p50/bare: over the one-client bare forward's p50")
        say(f"{'request':<30}{'batching':>9}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>8}{'p50/bare':>10}")
        for name, (answer, _) in requests.items():
            if name == f"activations {early}":
                continue
            lat = {"on": [], "off": []}
            wall = {"on": 0.0, "off": 0.0}
            before = httpx.get(f"{probes['on'][1]}/stats").json()
            for side in probes:  # warm the connections and the pass sizes
                load(probes[side][1], f"/models/{model_id}/{answer}", bodies[name], 4, 4)
            for r in range(rounds):
                for side in (("on", "off") if r % 2 == 0 else ("off", "on")):
                    l, w = load(probes[side][1], f"/models/{model_id}/{answer}", bodies[name], 4,
                                args.requests // rounds)
                    lat[side] += l
                    wall[side] += w
            for side in ("on", "off"):
                p50, p99 = stats(lat[side])
                say(f"{name:<30}{side:>9}{p50:>9.1f}{p99:>9.1f}{len(lat[side]) / wall[side]:>8.2f}"
                    f"{p50 / base50:>10.2f}")
            after = httpx.get(f"{probes['on'][1]}/stats").json()
            sizes = {int(k): v - before["pass_sizes"].get(k, 0) for k, v in after["pass_sizes"].items()}
            say(f"{'':<30}{'on/off':>9}{stats(lat['on'])[0] / stats(lat['off'])[0]:>9.2f}"
                f"{stats(lat['on'])[1] / stats(lat['off'])[1]:>9.2f}"
                f"{(len(lat['on']) / wall['on']) / (len(lat['off']) / wall['off']):>8.2f}"
                f"   (batching on: {after['requests'] - before['requests']} requests in "
                f"{after['passes'] - before['passes']} passes; of 1, 2, ... requests: "
                f"{', '.join(str(sizes.get(k, 0)) for k in range(1, max(sizes, default=1) + 1))})")
        # What batching saves in the forward pass itself: a pass over 4 texts against 4 passes over one.
        one, four = [], []
        rows = [Row(ids, reads=[Read(n_layers - 1, torch.tensor([0]))]) for _, ids in texts[:4]]
        for r in range(-1, 6):
            t1, t4 = timed(passes.run, rows[:1]), timed(passes.run, rows)
            if r >= 0:
                one.append(t1)
                four.append(t4)
        say(f"one pass over 4 texts (in-process, reading one neuron of the last layer): {stats(four)[0]:.1f} ms, "
            f"{stats(four)[0] / stats(one)[0] / 4:.2f} of the time of 4 passes over one ({stats(one)[0]:.1f} ms each): "
            f"the compute that batching 4 requests saves here")
        say(f"# load average {loadavg()} after the four-client load")
        say(f"# {time.perf_counter() - began:.0f} s in all")
    finally:
        worker.shutdown()
        for proc, _ in probes.values():
            proc.terminate()
        for proc, _ in probes.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)  # the probes' logs
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
