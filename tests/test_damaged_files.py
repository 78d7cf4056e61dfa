"""Damaged database files: refused with one line when opened, skipped in a --data-dir, and never a 500."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import duckdb
import httpx
import pytest

from gluscope.server.db import HEADER_BYTES

from .processes import free_port, wait_for

pytestmark = pytest.mark.system


def serve(*args: str, port: int | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gluscope.cli", "serve", *args, "--workers", "1",
                             "--port", str(port or free_port())], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.parametrize("keep", ["300KB", "third", "all but one block"])
def test_a_file_cut_short_is_refused_in_one_line(recorded_db, tmp_path, keep):
    cut = tmp_path / "cut.duckdb"
    shutil.copy(recorded_db, cut)
    size = cut.stat().st_size
    os.truncate(cut, {"300KB": 300_000, "third": size // 3, "all but one block": size - 65536}[keep])
    r = subprocess.run([sys.executable, "-m", "gluscope.cli", "serve", str(cut)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert str(cut) in line and ("cut short" in line or "damaged" in line), line


def test_a_data_dir_serves_the_good_files_and_warns_about_the_bad(recorded_db, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(recorded_db, folder / "good.duckdb")
    shutil.copy(recorded_db, folder / "cut.duckdb")
    os.truncate(folder / "cut.duckdb", 300_000)
    (folder / "junk.duckdb").write_bytes(b"no database here" * 100)
    port = free_port()
    proc = serve("--data-dir", str(folder), port=port)
    try:
        models = wait_for(f"http://127.0.0.1:{port}/api/models", proc).json()["models"]
        assert [m["file"] for m in models] == ["good.duckdb"]
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    warnings = [line for line in err.splitlines() if "warning: skipping" in line]
    assert len(warnings) == 2 and any("cut.duckdb" in w for w in warnings) and any("junk.duckdb" in w for w in warnings)


def test_a_shard_file_is_refused_until_merged(recorded_db, tmp_path):
    shard = tmp_path / "shard.duckdb"
    shutil.copy(recorded_db, shard)
    con = duckdb.connect(str(shard))
    con.execute("UPDATE metadata SET shard_index = 0, shard_count = 2")
    con.close()
    r = subprocess.run([sys.executable, "-m", "gluscope.cli", "serve", str(shard)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "merge the shards first" in r.stderr.strip().splitlines()[-1]


def test_blocks_damaged_after_opening_answer_503_never_500(recorded_db, tmp_path):
    """Zero every block of the windows table: the file opens (the server reads those blocks on request only),
    and then every request that needs them answers 503 with the one error shape."""
    bad = tmp_path / "bad.duckdb"
    shutil.copy(recorded_db, bad)
    con = duckdb.connect(str(bad), read_only=True)
    block_size = con.execute("PRAGMA database_size").fetchall()[0][2]
    blocks = {b for (b,) in con.execute("SELECT DISTINCT block_id FROM pragma_storage_info('windows') "
                                        "WHERE block_id >= 0").fetchall()}
    con.close()
    assert blocks
    with bad.open("r+b") as f:
        for b in blocks:
            f.seek(HEADER_BYTES + b * block_size)
            f.write(b"\xff" * block_size)
    port = free_port()
    proc = serve(str(bad), port=port)
    try:
        models = wait_for(f"http://127.0.0.1:{port}/api/models", proc).json()["models"]
        base = f"http://127.0.0.1:{port}"
        model = models[0]["id"]
        for url in (f"/api/models/{model}/neurons/1/3/examples?quadrant=nn&hook=act",
                    f"/models/{model}/neurons/1/3/examples?quadrant=pp&hook=hook_post",
                    f"/api/models/{model}/neurons/0/0/examples?quadrant=pn&hook=hook_pre"):
            r = httpx.get(base + url, timeout=30)
            assert r.status_code == 503, (url, r.status_code, r.text[:300])
            if url.startswith("/api"):
                assert "damaged" in r.json()["error"]["message"]
        assert httpx.get(f"{base}/api/models/{model}/neurons/1/3", timeout=30).status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)
