"""Resumable recordings: killed at random moments (in the loop, in a checkpoint's write, in the final write), by
SIGKILL, SIGTERM or Ctrl-C, `gluscope record --resume` still ends with the very file an uninterrupted run writes."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import dataclasses

import duckdb
import numpy as np
import pytest
import torch

from gluscope.recorder import kernel_reducer
from gluscope.recorder.checkpoint import (DEFAULT_EVERY_MINUTES, DELAY_ENV, ESTIMATE_AFTER_BATCHES,
                                          CheckpointSchedule, describe_run, difference, load_checkpoint,
                                          save_checkpoint)
from gluscope.recorder.model import activation_function
from gluscope.recorder.tensor_reducer import TensorReducer
from gluscope.recorder.reducer_interface import Batch, LayerSetup, make_reducers
from .tiny_models import save_tiny_model

from . import recordings
from .brute_force import require_kernel
from .processes import GLUSCOPE, assert_user_error, record_cmd as cli_record_cmd

EVERY = "0.002"  # minutes between checkpoints: about every 0.12 s, so a run of a few seconds writes many
OPTIONS = ("--max-length", "48", "--batch-size", "1", "--k", "4")
STAGES = ("loop", "checkpoint", "write")
# How long after reaching a stage the signal comes, at random (seeded): any instant of the stage, as far as the
# stage lasts for sure (a checkpoint's write is held open 0.4 s by DELAY_ENV; the final write is short). The
# loop is short: on an idle machine the kernel records the long corpus in about half a second, and a later step
# of a chain needs loop left to reach a checkpoint of its own (a quarter second once left it 0.1 s, less than
# one checkpoint interval).
DELAYS = {"loop": 0.05, "checkpoint": 0.25, "write": 0.005}


def record_cmd(model: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return cli_record_cmd(model, corpus, out, *OPTIONS, *extra)


def checkpoint_of(out: Path) -> Path:
    return out.with_name(out.name + ".checkpoint")


def assert_identical_files(got: Path, want: Path) -> None:
    """Every table of the two files has the same columns and the same rows, exactly (floats bit for bit, NaN
    equal to NaN); metadata too, but for its creation time."""
    con = duckdb.connect(str(got), read_only=True)
    try:
        con.execute(f"ATTACH '{want}' AS want (READ_ONLY)")
        here = con.execute("SELECT current_database()").fetchall()[0][0]

        def tables(db: str) -> list[str]:
            return sorted(t for (t,) in con.execute(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = ?", [db]).fetchall())
        assert tables(here) == tables("want")
        assert "metadata" in tables(here) and "windows" in tables(here)
        for table in tables(here):
            columns = [c for (c, *_) in con.execute(f"DESCRIBE {here}.{table}").fetchall()]
            assert columns == [c for (c, *_) in con.execute(f"DESCRIBE want.{table}").fetchall()], table
            chosen = "* EXCLUDE (created_at)" if table == "metadata" else "*"
            n = con.execute(f"SELECT count(*) FROM {here}.{table}").fetchall()[0][0]
            assert n == con.execute(f"SELECT count(*) FROM want.{table}").fetchall()[0][0], f"{table}: row counts"
            differ = con.execute(f"""SELECT count(*) FROM (
                (SELECT {chosen} FROM {here}.{table} EXCEPT ALL SELECT {chosen} FROM want.{table})
                UNION ALL (SELECT {chosen} FROM want.{table} EXCEPT ALL SELECT {chosen} FROM {here}.{table}))""")
            assert differ.fetchall()[0][0] == 0, f"{table}: rows differ"
        for table in ("metadata", "texts", "examples", "windows", "value_stats"):
            assert con.execute(f"SELECT count(*) FROM {here}.{table}").fetchall()[0][0] > 0, table
    finally:
        con.close()


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["kernel", "torch"])
def test_a_reducer_loaded_from_a_checkpoint_goes_on_exactly_as_the_one_saved(kind, tmp_path):
    """Batch A, a checkpoint, batch B into a fresh reducer loaded from it: the statistics of A then B, bit for bit."""
    if kind == "kernel":
        require_kernel()
    gen = torch.Generator().manual_seed(7)
    lengths = np.array([9, 6, 9, 4, 8, 9])
    setup = LayerSetup(k=3, before=2, after=1, sign=torch.where(torch.rand(24, generator=gen) < 0.5, -1.0, 1.0),
                       act_fn=activation_function("silu"), text_lengths=lengths)
    batches = [(torch.randn(3, 9, 24, generator=gen), torch.randn(3, 9, 24, generator=gen),
                Batch.of(lengths[ids], ids, torch.device("cpu"))) for ids in (np.array([0, 1, 2]), np.array([3, 4, 5]))]
    whole, first = make_reducers(kind, [setup, setup])
    for x_gate, x_in, batch in batches:
        whole.update(x_gate, x_in, batch)
    first.update(*batches[0])
    declared = TensorReducer.STATE if kind == "torch" else tuple(row[0] for row in kernel_reducer.STATE)
    assert tuple(dict.fromkeys(name.split(".")[0] for name in first.state())) == declared
    if kind == "torch":
        for obj in (first, first.distributions):
            tensors = {name for name, value in vars(obj).items() if isinstance(value, (torch.Tensor, dict))
                       and name != "__dict__"}
            undeclared = tensors - set(obj.STATE) - set(obj.DERIVED)
            assert not undeclared, (f"{type(obj).__name__}'s {sorted(undeclared)} are not in its STATE: a checkpoint "
                                    "would lose them (name them there if batches change them, else in DERIVED)")
    path = tmp_path / "layer.checkpoint"
    save_checkpoint(path, {"test": kind}, 1, [first])
    checkpoint = load_checkpoint(path)
    assert (checkpoint.run, checkpoint.next_batch) == ({"test": kind}, 1)
    (resumed,) = make_reducers(kind, [setup])
    resumed.load_state(checkpoint.layer_state(0))
    resumed.update(*batches[1])
    want, got = whole.finish(), resumed.finish()
    for field in dataclasses.fields(want):
        np.testing.assert_array_equal(getattr(got, field.name), getattr(want, field.name), err_msg=field.name)
    # A state of another shape is refused, naming the field.
    other = LayerSetup(k=4, before=2, after=1, sign=setup.sign, act_fn=setup.act_fn, text_lengths=lengths)
    (wrong,) = make_reducers(kind, [other])
    with pytest.raises(ValueError, match=r"the saved [\w.]+ is .*, this reducer.s is "):
        wrong.load_state(checkpoint.layer_state(0))
    checkpoint.close()


@pytest.mark.unit
def test_an_interrupt_anywhere_in_a_checkpoint_write_stays_an_interrupt_and_keeps_the_last_checkpoint(
        tmp_path, monkeypatch):
    path = tmp_path / "run.checkpoint"
    state = {"a": np.arange(6.0), "b": np.ones(3)}

    class Reducer:
        def state(self) -> dict:
            return state

    save_checkpoint(path, {"run": 1}, 1, [Reducer()])
    before = path.read_bytes()
    # Ctrl-C in the narrowest window: zipfile has marked a member open for writing but not handed back its writer.
    # It reaches another thread, as it may reach one of torch's workers in a run; Python then runs its handler in
    # the main thread all the same.
    calls = []
    done = threading.Event()
    other = threading.Thread(target=done.wait)

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            signal.pthread_kill(other.ident, signal.SIGINT)
            time.sleep(0.05)  # the other thread takes the signal while this one is still in the window
        return original(self, *args, **kwargs)

    original = zipfile._ZipWriteFile.__init__
    monkeypatch.setattr(zipfile._ZipWriteFile, "__init__", interrupted)
    other.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(path, {"run": 1}, 2, [Reducer()])
    finally:
        done.set()
        other.join()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


@pytest.mark.unit
def test_the_first_difference_of_two_runs_is_said_as_the_option_that_makes_it():
    run = describe_run({"created_at": "now", "batch_size": np.int64(8), "k": 16, "refactor_glu": True,
                        "max_length": 1024, "corpus_fingerprint": "aaa", "sample_seed": 0}, shard=None)
    assert difference(run, dict(run)) is None
    assert "created_at" not in run  # the creation time is no part of a run
    assert difference(run, {**run, "batch_size": 16}) == "checkpoint was recorded with --batch-size 8, this run has 16"
    assert difference(run, {**run, "refactor_glu": False}) == (
        "checkpoint was recorded with the weight convention refactor_glu, this run has --no-refactor-glu")
    assert difference(run, {**run, "shard": "1/3"}) == (
        "checkpoint was recorded with no --shard, this run has --shard 1/3")
    # An option is named before the corpus fingerprint it also changes; a key without a flag by its name.
    assert "--max-length 1024, this run has 512" in difference(run, {**run, "max_length": 512,
                                                                     "corpus_fingerprint": "b"})
    assert "over another corpus" in difference(run, {**run, "corpus_fingerprint": "b"})
    assert difference(run, {**run, "sample_seed": 3}) == "checkpoint was recorded with sample_seed 0, this run has 3"


@pytest.mark.unit
def test_by_default_only_a_run_estimated_over_15_minutes_checkpoints():
    def decided(total_tokens: int) -> float:
        schedule = CheckpointSchedule(None, total_tokens)
        time.sleep(0.01)
        assert not any(schedule.due(tokens_done=10 * (i + 1)) for i in range(ESTIMATE_AFTER_BATCHES))
        return schedule.every_s
    # 30 tokens took at least 10 ms: 10^9 tokens take days, 30 tokens no time.
    assert decided(10**9) == DEFAULT_EVERY_MINUTES * 60
    assert decided(30) == 0
    assert CheckpointSchedule(0, 10**9).every_s == 0 and CheckpointSchedule(0.5, 30).every_s == 30


@pytest.mark.system
def test_resume_under_torchrun_is_refused_in_one_line(tiny_llama, corpus_file, tmp_path):
    # torchrun's own variables, as each rank sees them; the refusal comes before any process group.
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    r = subprocess.run(record_cmd(tiny_llama, corpus_file, tmp_path / "x.duckdb", "--resume"), capture_output=True,
                       text=True, timeout=300, env=env)
    assert_user_error(r, "--resume and --checkpoint-every do not work under torchrun")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def long_corpus() -> Path:
    """The test corpus four times over: 168 texts, one batch each, so that a run resumed after two interrupts in
    its loop still has more than two checkpoints ahead (the kernel records the whole corpus in a fraction of a
    second: with twice over, a loaded machine once left a resumed run too little loop to reach its second)."""
    return recordings.corpus("long")


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama, long_corpus) -> dict[str, Path]:
    """Per reducer, the file a run that nothing interrupts writes (and that never checkpoints)."""
    require_kernel()
    return {reducer: recordings.record(tiny_llama, long_corpus, *OPTIONS, "--reducer", reducer,
                                       "--checkpoint-every", "0")
            for reducer in ("kernel", "torch")}


def interrupt(cmd: list[str], out: Path, stage: str, how: signal.Signals, rng: random.Random,
              log: Path) -> tuple[int, str]:
    """Run `cmd` until it is in `stage`, then send `how` at a random instant of it; (exit status, stderr)."""
    env = {**os.environ, **({DELAY_ENV: "0.4"} if stage == "checkpoint" else {})}
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
    tmp_checkpoint = out.with_name(f".{checkpoint_of(out).name}.{proc.pid}.tmp")
    tmp_database = out.with_name(f".{out.name}.{proc.pid}.tmp")
    reached = {
        # This run's own first checkpoint is written: its loop is under way (and resumable).
        "loop": lambda: "checkpoint after batch" in log.read_text(),
        # A checkpoint is being written over an earlier one.
        "checkpoint": lambda: tmp_checkpoint.exists() and checkpoint_of(out).exists(),
        "write": lambda: tmp_database.exists(),
    }[stage]
    deadline = time.monotonic() + 240
    try:
        while not reached():
            assert proc.poll() is None, f"the run ended before its {stage}: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"never reached the {stage}"
            time.sleep(0.002)
        time.sleep(rng.uniform(0, DELAYS[stage]))
        if stage == "loop":
            assert not tmp_database.exists(), "the loop ended before the signal"
        elif stage == "checkpoint":
            assert tmp_checkpoint.exists(), "the checkpoint's write ended before the signal"
        proc.send_signal(how)
        code = proc.wait(60)
    finally:
        proc.kill()
        proc.wait()
    return code, log.read_text()


def batches_done(stderr: str) -> int | None:
    """How many batches the run's checkpoint said were done, from its "resuming from" line."""
    for line in stderr.splitlines():
        if "resuming from" in line:
            return int(line.split(": ")[-1].split(" of ")[0])
    return None


def run_chain(steps: list[tuple[str, signal.Signals]], reducer: str, model: Path, corpus: Path, want: Path,
              folder: Path, seed: int) -> None:
    """Interrupt one run after another as `steps` say, each resuming the last; then let one finish and compare."""
    rng = random.Random(seed)
    out = folder / "resumed.duckdb"
    progress = [0]
    for i, (stage, how) in enumerate(steps):
        cmd = record_cmd(model, corpus, out, "--reducer", reducer, "--checkpoint-every", EVERY,
                         *(["--resume"] if i else []))
        code, stderr = interrupt(cmd, out, stage, how, rng, folder.parent / f"step{i}.log")
        step = f"step {i} ({how.name} during the {stage})"
        assert not out.exists(), f"{step}: a database was left"
        assert checkpoint_of(out).exists(), f"{step}: the checkpoint is gone"
        if i:
            done = batches_done(stderr)
            assert done is not None and done >= progress[-1], f"{step}: did not resume: {stderr[-1500:]}"
            progress.append(done)
        if how == signal.SIGKILL:
            assert code == -signal.SIGKILL, step
        else:
            assert code == 130, f"{step}: exit status {code}"
            assert "Traceback" not in stderr, stderr
            last = stderr.strip().splitlines()[-1]
            assert last.startswith("gluscope record: interrupted") and "--resume" in last, last
            # Nothing half-written is left: no temporary database, no temporary checkpoint.
            assert sorted(p.name for p in folder.iterdir()) == [checkpoint_of(out).name], step
    r = subprocess.run(record_cmd(model, corpus, out, "--reducer", reducer, "--checkpoint-every", EVERY, "--resume"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert batches_done(r.stderr) >= progress[-1] > 0
    # The checkpoint is removed, and so are the temporary files SIGKILL left behind.
    assert sorted(p.name for p in folder.iterdir()) == [out.name]
    assert_identical_files(out, want)


@pytest.mark.system
@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_file_kernel(
        uninterrupted, tiny_llama, long_corpus, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    run_chain([(stage, signal.SIGKILL) for stage in STAGES], "kernel", tiny_llama, long_corpus,
              uninterrupted["kernel"], folder, seed=13)


@pytest.mark.system
@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_file_torch(
        uninterrupted, tiny_llama, long_corpus, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    # The final write is the same code whichever reducer ran: the kernel's chain kills it there.
    run_chain([("loop", signal.SIGKILL), ("checkpoint", signal.SIGKILL)], "torch", tiny_llama, long_corpus,
              uninterrupted["torch"], folder, seed=14)


@pytest.mark.system
@pytest.mark.slow
def test_sigterm_and_ctrl_c_in_every_stage_exit_with_one_line_and_keep_the_checkpoint(
        uninterrupted, tiny_llama, long_corpus, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    # Both signals where a checkpoint is being written, the one window where they are held and then raised; each
    # once in the loop and the final write, where both are the KeyboardInterrupt of tests/test_recorder_faults.py
    # (which sends each signal in each of those stages of a run that does not checkpoint). The write-stage
    # interrupt last: after one, the checkpoint is near the end and little loop is left.
    steps = [("loop", signal.SIGTERM), ("checkpoint", signal.SIGINT), ("checkpoint", signal.SIGTERM),
             ("write", signal.SIGINT)]
    run_chain(steps, "kernel", tiny_llama, long_corpus, uninterrupted["kernel"], folder, seed=15)


@pytest.mark.system
@pytest.mark.slow
def test_a_resume_of_another_run_is_refused_with_one_line(tiny_llama, long_corpus, tmp_path, gluscope_here):
    """Only the killed run is a process of its own; the refusals after it run in this process."""
    require_kernel()
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    corpus = tmp_path / "corpus.jsonl"
    shutil.copy(long_corpus, corpus)
    out = tmp_path / "out" / "run.duckdb"
    out.parent.mkdir()

    def resume(*extra: str) -> subprocess.CompletedProcess:
        return gluscope_here(*record_cmd(model, corpus, out, "--reducer", "kernel", *extra)[len(GLUSCOPE):])

    assert_user_error(resume("--resume"), "--resume: there is no checkpoint", str(checkpoint_of(out)))
    code, _ = interrupt(record_cmd(model, corpus, out, "--reducer", "kernel", "--checkpoint-every", EVERY), out,
                        "loop", signal.SIGKILL, random.Random(16), tmp_path / "killed.log")
    assert code == -signal.SIGKILL and checkpoint_of(out).exists()
    saved = checkpoint_of(out).read_bytes()

    assert_user_error(resume(), "holds an interrupted run", "--resume")
    # An option: the message names it, with both values. Options come in as the lines of a command.
    assert_user_error(resume("--resume", "--batch-size", "2"),
                      "checkpoint was recorded with --batch-size 1, this run has 2")
    assert_user_error(resume("--resume", "--reducer", "torch"),
                      "checkpoint was recorded with --reducer kernel, this run has torch")
    # The same corpus file with one text changed.
    lines = long_corpus.read_text().splitlines(keepends=True)
    corpus.write_text("".join([lines[0].replace("quick", "slow"), *lines[1:]]))
    assert_user_error(resume("--resume"), "checkpoint was recorded over another corpus")
    shutil.copy(long_corpus, corpus)
    # The same model folder with other weights (same architecture and tokenizer).
    shutil.rmtree(model)
    save_tiny_model(model, "llama", recordings.tokenizer_training_texts(), init_std=0.15, seed=1,
                    extra_tokens=("<script>", "</script>"))
    assert_user_error(resume("--resume"), "checkpoint was recorded with other model weights")
    # Refusals leave the checkpoint as it was.
    assert checkpoint_of(out).read_bytes() == saved
    assert not out.exists()


@pytest.mark.system
@pytest.mark.slow
def test_a_mixture_of_experts_run_killed_then_resumed_gives_the_uninterrupted_file(tmp_path):
    """Every expert's reducer and every layer's router statistics are in the checkpoint (Qwen2-MoE: routed and
    shared experts). An MoE batch costs several dense ones, so the shorter corpus still checkpoints many times."""
    require_kernel()
    from .test_moe_bruteforce import moe_model

    model = moe_model("qwen2_moe")
    corpus = recordings.corpus("distinct")
    want = recordings.record(model, corpus, *OPTIONS, "--reducer", "kernel", "--checkpoint-every", "0")
    folder = tmp_path / "run"
    folder.mkdir()
    run_chain([("loop", signal.SIGKILL), ("checkpoint", signal.SIGKILL)], "kernel", model, corpus, want,
              folder, seed=16)
