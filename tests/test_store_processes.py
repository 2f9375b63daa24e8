"""Real processes: a reader polling while another process writes, and a writer SIGKILLed mid-run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from routelens.store import Store

REPO = Path(__file__).resolve().parents[1]

# Shared by the child processes: deterministic blocks, so a run's rows are known in advance.
PRELUDE = textwrap.dedent("""
    import sys, time
    import numpy as np
    from routelens.records import RunMeta, SequenceRecord, TokenBlock
    from routelens.store import Store, WriterConfig

    def meta(name):
        return RunMeta(model="tiny", architecture="Tiny", family="tiny", config_hash="c", num_experts=32, top_k=4,
                       moe_layers=(1, 3, 5, 7), num_layers=8, dtype="float16", transformers_version="5",
                       torch_version="2", routelens_version="0.1", input_source="proc", name=name)

    def block(i, n=256):
        rng = np.random.default_rng(i)
        experts = np.argsort(rng.random((4, n, 32)), axis=-1)[..., :4].astype(np.uint16)
        return TokenBlock(seq_id=np.full(n, i, np.int64), pos=np.arange(n, dtype=np.int32),
                          token_id=rng.integers(0, 500, n).astype(np.int32), layers=(1, 3, 5, 7),
                          experts=experts, weights=rng.random((4, n, 4)).astype(np.float16))

    def say(msg):
        print(msg, flush=True)
""")


def spawn(script: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(script)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def wait_for_line(proc: subprocess.Popen, expected: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.strip() == expected:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"child exited ({proc.returncode}) before {expected!r}: {proc.stderr.read()}")
    raise AssertionError(f"child did not print {expected!r} within {timeout} s")


def test_reader_process_never_sees_the_lock_while_another_process_writes(tmp_path):
    path = tmp_path / "live.duckdb"
    writer = spawn(f"""
        store = Store.open({str(path)!r}, writer_config=WriterConfig(flush_interval_s=0.02, flush_decisions=4096))
        w = store.create_run(meta("live"))
        say("started")
        for i in range(60):
            w.add_block(block(i))
            time.sleep(0.03)
        w.finish()
        say("finished")
    """)
    try:
        wait_for_line(writer, "started")
        reader = Store.open(path, read_only=True)
        seen: list[tuple[str, int]] = []
        queries = 0
        while writer.poll() is None:
            info = reader.runs()[0]  # any lock error would propagate and fail the test
            seen.append((info.status, info.n_tokens))
            if info.n_tokens:
                frame = reader.run("live").routing(layers=[3])
                assert len(frame) == info.n_tokens * 4 or reader.runs()[0].n_tokens > info.n_tokens
                queries += 1
        assert writer.returncode == 0, writer.stderr.read()
    finally:
        writer.kill()
        writer.wait()
    final = reader.runs()[0]
    assert (final.status, final.n_tokens, final.n_decisions) == ("complete", 60 * 256, 60 * 256 * 4 * 4)
    mid = [n for status, n in seen if status == "incomplete" and 0 < n < 60 * 256]
    assert len(mid) >= 1, seen  # the reader saw the run part-written, between flushes
    assert [n for _, n in seen] == sorted(n for _, n in seen)
    assert queries >= 1


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_mid_trace_keeps_earlier_runs_and_marks_the_run_incomplete(tmp_path):
    path = tmp_path / "crash.duckdb"
    child = spawn(f"""
        store = Store.open({str(path)!r}, writer_config=WriterConfig(flush_interval_s=0.01, flush_decisions=1))
        with store.create_run(meta("A")) as w:
            for i in range(5):
                w.add_block(block(i))
        say("A done")
        w = store.create_run(meta("B"))
        i = 100
        while True:  # flushes back to back until killed; big blocks so the kill often lands mid-INSERT
            w.add_block(block(i, n=4096))
            i += 1
            if i == 103:
                say("B writing")
    """)
    try:
        wait_for_line(child, "A done")
        store = Store.open(path, read_only=True)
        run_a = store.run("A").routing()
        tokens_a = store.run("A").tokens()
        wait_for_line(child, "B writing")
        time.sleep(0.3)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL

    store = Store.open(path)
    by_name = {r.name: r for r in store.runs()}
    assert by_name["A"].status == "complete" and by_name["A"].n_tokens == 5 * 256
    assert store.run("A").routing().equals(run_a) and store.run("A").tokens().equals(tokens_a)
    assert by_name["B"].status == "incomplete"
    partial = store.run("B").routing()
    # whatever B committed is whole flushes: the counters match the rows
    assert len(partial) == by_name["B"].n_decisions and len(partial) % (4096 * 16) == 0

    import numpy as np
    from routelens.records import RunMeta, TokenBlock

    meta_c = RunMeta(model="tiny", architecture="Tiny", family="tiny", config_hash="c", num_experts=32, top_k=4,
                     moe_layers=(1, 3, 5, 7), num_layers=8, dtype="float16", transformers_version="5",
                     torch_version="2", routelens_version="0.1", input_source="proc", name="C")
    with store.create_run(meta_c) as w:
        w.add_block(TokenBlock(seq_id=np.zeros(2, np.int64), pos=np.arange(2, dtype=np.int32),
                               token_id=np.arange(2, dtype=np.int32), layers=(1, 3, 5, 7),
                               experts=np.zeros((4, 2, 4), np.uint16) + np.arange(4, dtype=np.uint16),
                               weights=np.full((4, 2, 4), 0.25, np.float16)))
    assert store.run("C").info.status == "complete" and len(store.run("C").routing()) == 32
    assert store.run("A").routing().equals(run_a)



def test_add_block_does_not_wait_while_another_process_holds_the_store(tmp_path):
    import numpy as np

    from routelens.records import RunMeta, TokenBlock
    from routelens.store import WriterConfig

    path = tmp_path / "held.duckdb"
    store = Store.open(path, writer_config=WriterConfig(flush_interval_s=0.01, flush_decisions=1))
    writer = store.create_run(RunMeta(
        model="tiny", architecture="Tiny", family="tiny", config_hash="c", num_experts=32, top_k=4,
        moe_layers=(1, 3, 5, 7), num_layers=8, dtype="float16", transformers_version="5", torch_version="2",
        routelens_version="0.1", input_source="proc", name="held"))
    holder = spawn(f"""
        import duckdb, select
        con = duckdb.connect({str(path)!r}, read_only=True)  # e.g. a dashboard stuck in a long query
        say("locked")
        select.select([sys.stdin], [], [], 20)  # a writer that blocked its caller would fail, not hang
        con.close()
        say("released")
    """)
    try:
        wait_for_line(holder, "locked")
        t0 = time.perf_counter()
        for i in range(40):
            n = 512
            writer.add_block(TokenBlock(
                seq_id=np.full(n, i, np.int64), pos=np.arange(n, dtype=np.int32), token_id=np.zeros(n, np.int32),
                layers=(1, 3, 5, 7), experts=np.broadcast_to(np.arange(4, dtype=np.uint16), (4, n, 4)).copy(),
                weights=np.full((4, n, 4), 0.25, np.float16)))
        handed_over = time.perf_counter() - t0
        time.sleep(0.5)  # the writer keeps retrying the lock meanwhile
        assert store.runs()[0].n_tokens == 0  # nothing could be flushed (read-only readers share the file)
        holder.stdin.write("go\n")
        holder.stdin.flush()
        wait_for_line(holder, "released")
    finally:
        holder.kill()
        holder.wait()
    assert handed_over < 1.0  # queueing only; the disk was unavailable the whole time
    info = writer.finish()
    assert (info.status, info.n_tokens, info.n_decisions) == ("complete", 40 * 512, 40 * 512 * 16)
