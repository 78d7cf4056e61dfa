"""Faults around a recording: a second run on the same --out, a full disk, SIGTERM and Ctrl-C at any stage."""

from __future__ import annotations

import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .processes import assert_user_error, record_cmd as cli_record_cmd


def record_cmd(model: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return cli_record_cmd(model, corpus, out, "--max-length", "48", *extra)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.system
def test_a_second_run_on_the_same_out_is_refused(tiny_llama, corpus_file, tmp_path):
    from gluscope.recorder.cli import output_lock

    out = tmp_path / "busy.duckdb"
    with output_lock(out):  # this process is the first run
        r = subprocess.run(record_cmd(tiny_llama, corpus_file, out), capture_output=True, text=True, timeout=120)
    assert_user_error(r, "another `gluscope record` is writing")
    assert leftovers(tmp_path) == []
    # Once the first run is gone, the file can be written.
    r = subprocess.run(record_cmd(tiny_llama, corpus_file, out), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


@pytest.mark.system
def test_a_file_size_limit_during_the_write_leaves_nothing_and_says_one_line(tiny_llama, corpus_file, tmp_path):
    out = tmp_path / "limited.duckdb"

    def limit() -> None:  # the recording's own file may not exceed 256 KiB (ulimit -f)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    r = subprocess.run(record_cmd(tiny_llama, corpus_file, out), capture_output=True, text=True, timeout=300,
                       preexec_fn=limit)
    assert_user_error(r, f"cannot write {out}", "nothing was left behind")
    assert leftovers(tmp_path) == []


@pytest.mark.system
@pytest.mark.parametrize("how, stage", [(signal.SIGTERM, "loop"), (signal.SIGINT, "loop"),
                                        (signal.SIGTERM, "write"), (signal.SIGINT, "write")])
def test_sigterm_and_ctrl_c_leave_no_partial_database(how, stage, tiny_llama, corpus_file, tmp_path):
    out = tmp_path / "interrupted.duckdb"
    # For the loop, a long corpus (the test texts, many times over, batch 1) so that it runs for a while;
    # for the write, the corpus once, so that the write comes soon.
    big = tmp_path / "big.jsonl"
    big.write_text(corpus_file.read_text() * (40 if stage == "loop" else 1))
    proc = subprocess.Popen(record_cmd(tiny_llama, big, out, "--batch-size", "1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        if stage == "loop":
            # tqdm writes "recording:" once the first batch is through.
            seen = ""
            while "recording:" not in seen and time.monotonic() < deadline:
                seen += proc.stderr.read(1)
        else:
            while not list(tmp_path.glob(f".{out.name}.*.tmp")) and time.monotonic() < deadline:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.01)
        assert time.monotonic() < deadline, f"never reached the {stage}"
        proc.send_signal(how)
        code = proc.wait(60)
    finally:
        proc.kill()
    assert code != 0
    assert "Traceback" not in proc.stderr.read()
    assert leftovers(tmp_path) == ["big.jsonl"]


@pytest.mark.integration
def test_an_insert_that_fails_on_the_writing_thread_is_raised_and_leaves_nothing(tmp_path):
    """Tables go into DuckDB on a background thread: its error still reaches the recording, which then
    removes the half-written file."""
    import duckdb
    import pyarrow as pa

    from gluscope.recorder.writer import DatabaseWriter

    out = tmp_path / "failed.duckdb"
    with pytest.raises(duckdb.BinderException, match="no_such_column"):
        with DatabaseWriter(out) as writer:
            writer.write_vocab(["a", "b"], [b"a", b"b"])
            writer._insert("vocab", pa.table({"no_such_column": pa.array([1])}))
            writer.write_vocab(["c"], [b"c"])  # may be refused at once, or queued and dropped
    assert leftovers(tmp_path) == []
