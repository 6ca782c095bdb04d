"""Tensor parallelism on CPU (gloo): tp=N must give tp=1's greedy tokens, offline and through the
server, on one node and on two "nodes" over loopback; a dead rank fails requests and ends the
server; no rank process outlives its engine."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aengine import LLM, SamplingParams
from clients.client import Client, ServerError
from tests.conftest import build_tiny
from tests.server_util import ROOT, free_port, running_server

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process checks read /proc")

CPU = dict(dtype="float32", device="cpu", kv_cache_tokens=1024)
CPU_ARGS = ("--dtype", "float32", "--device", "cpu", "--kv-cache-tokens", "1024")
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9], [100, 200, 300], [499, 500, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
# one prefill step of ~900 tokens: its metadata outgrows the first broadcast buffer
LONG = [[(7 * i + j) % 480 + 10 for i in range(300)] for j in range(3)]


# ---- processes --------------------------------------------------------------------------------
def descendants(pid: int) -> list[int]:
    """Live (non-zombie) descendants of pid, from /proc; multiprocessing's resource tracker (one
    per parent, gone when the parent exits) is not a rank and does not count."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            cmd = Path(f"/proc/{d}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and b"resource_tracker" not in cmd:
            parent[int(d)] = int(fields[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture
def no_leftovers() -> Iterator[None]:
    before = set(descendants(os.getpid()))
    yield
    new = [p for p in descendants(os.getpid()) if p not in before]
    assert not wait_gone(new, 15.0), f"processes left behind: {new}"


# ---- models -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Tiny Llamas with 6 query heads and 2 (sharded at tp=2) or 1 (replicated) KV heads; an odd
    vocabulary leaves the last rank's vocab shard padded."""
    root = tmp_path_factory.mktemp("tp")
    return {kv: build_tiny("llama", root / f"kv{kv}", vocab_size=501, num_key_value_heads=kv,
                           initializer_range=0.2) for kv in (2, 1)}


@pytest.fixture(scope="module")
def tiny_ref(tiny: dict[int, Path]) -> dict[int, list[list[int]]]:
    out = {}
    for kv, path in tiny.items():
        with LLM(str(path), **CPU) as llm:
            out[kv] = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
            out[-kv] = [o.token_ids for o in llm.generate(LONG, GREEDY)]
    return out


# ---- offline ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kv", [2, 1])
def test_tp2_matches_tp1(tiny: dict[int, Path], tiny_ref: dict[int, list[list[int]]], kv: int,
                         no_leftovers: None) -> None:
    sampled = [SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True),
               SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, ignore_eos=True),
               SamplingParams(max_tokens=8, temperature=1.0, top_k=20, ignore_eos=True)]
    # kv=1 also in mixed steps: the ranks must read the decode rows' tokens the same way
    mixed = dict(max_prefill_tokens=128, enable_mixed_chunk=True) if kv == 1 else {}
    with LLM(str(tiny[kv]), tp=2, **CPU, **mixed) as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == tiny_ref[kv]
        assert [o.token_ids for o in llm.generate(LONG, GREEDY)] == tiny_ref[-kv]
        assert (llm.engine.stats().mixed_steps > 0) == bool(mixed)
        # sampling: every rank must feed the same next token, else later steps break down
        outs = llm.generate(PROMPTS, sampled)
        assert all(len(o.token_ids) == 8 for o in outs)
        assert outs[0].token_ids == llm.generate(PROMPTS[:1], sampled[:1])[0].token_ids  # seeded
    with LLM(str(tiny[kv]), **CPU) as llm:
        assert outs[0].token_ids == llm.generate(PROMPTS[:1], sampled[:1])[0].token_ids


def test_tp2_moe_matches_tp1(tmp_path: Path, no_leftovers: None) -> None:
    """Qwen3-MoE: each rank holds half of every expert's intermediate dim (16 of 32) and half of
    the dense layer's; the router is whole on both."""
    path = build_tiny("qwen3_moe", tmp_path / "moe", vocab_size=501, initializer_range=0.2)
    with LLM(str(path), **CPU) as llm:
        ref = [o.token_ids for o in llm.generate(PROMPTS + LONG, GREEDY)]
    with LLM(str(path), tp=2, max_prefill_tokens=128, enable_mixed_chunk=True, **CPU) as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS + LONG, GREEDY)] == ref
    with pytest.raises(ValueError, match="--tp 2 does not divide the MLP size 33"):
        LLM(str(build_tiny("qwen3_moe", tmp_path / "odd", moe_intermediate_size=33)), tp=2, **CPU)


def test_tp2_dummy_weights_match_tp1(tiny: dict[int, Path], no_leftovers: None) -> None:
    """Dummy weights are drawn whole and sharded, so tp=2 serves tp=1's random model (W6 and the
    GPU logits check rely on it)."""
    with LLM(str(tiny[2]), load_format="dummy", **CPU) as llm:
        ref = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    with LLM(str(tiny[2]), load_format="dummy", tp=2, **CPU) as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == ref
    with LLM(str(tiny[2]), load_format="dummy", seed=1, **CPU) as llm:  # the seed does change them
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] != ref


def test_rank_that_cannot_start_is_an_error(tiny: dict[int, Path], tmp_path: Path) -> None:
    """A script without a __main__ guard: the spawned rank fails while importing it, and rank 0
    must say so at once rather than wait out the rendezvous timeout."""
    script = tmp_path / "noguard.py"
    script.write_text(f"from aengine import LLM\nLLM({str(tiny[2])!r}, tp=2, device='cpu', dtype='float32', "
                      "kv_cache_tokens=1024)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0
    assert "RankDied: tensor-parallel rank process aengine-tp1 exited with code 1 before joining" in r.stderr


def test_tp3_embedded_offline(embedded: LLM, no_leftovers: None) -> None:
    prompts = ["The capital of France is", "1, 2, 3,"]
    ref = [o.token_ids for o in embedded.generate(prompts, GREEDY)]
    with LLM(tp=3, **CPU) as llm:  # 9 query heads, 3 KV heads: one of each kind per rank
        assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == ref


def test_clear_errors(tiny: dict[int, Path], no_leftovers: None) -> None:
    with pytest.raises(ValueError, match="attention heads"):
        LLM(str(tiny[2]), tp=4, **CPU)
    with pytest.raises(ValueError, match="KV heads"):
        LLM(str(tiny[2]), tp=3, **CPU)
    with pytest.raises(ValueError, match="dist-init-addr"):
        LLM(str(tiny[2]), tp=2, nnodes=2, **CPU)
    with pytest.raises(ValueError, match="multiple of --nnodes"):
        LLM(str(tiny[2]), tp=3, nnodes=2, dist_init_addr="127.0.0.1:1", **CPU)


def worker_node(path: Path, addr: str, *extra: str) -> subprocess.Popen:
    """Node 1 of a two-node run on loopback: `python -m aengine --node-rank 1` runs ranks only."""
    return subprocess.Popen([sys.executable, "-m", "aengine", "--model", str(path), "--tp", "2", "--nnodes", "2",
                             "--node-rank", "1", "--dist-init-addr", addr, *CPU_ARGS, *extra], cwd=ROOT)


def test_two_nodes_offline(tiny: dict[int, Path], tiny_ref: dict[int, list[list[int]]], no_leftovers: None) -> None:
    addr = f"127.0.0.1:{free_port()}"
    node1 = worker_node(tiny[2], addr)
    try:
        with LLM(str(tiny[2]), tp=2, nnodes=2, dist_init_addr=addr, **CPU) as llm:
            assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == tiny_ref[2]
        assert node1.wait(30) == 0  # node 0's shutdown ends node 1
    finally:
        node1.kill()
        node1.wait()


def test_killed_rank_fails_generate(tiny: dict[int, Path], no_leftovers: None) -> None:
    before = set(descendants(os.getpid()))
    llm = LLM(str(tiny[2]), tp=2, **CPU)
    try:
        assert len(llm.generate(PROMPTS, GREEDY)) == 3
        (rank1,) = set(descendants(os.getpid())) - before
        os.kill(rank1, signal.SIGKILL)
        assert not wait_gone([rank1], 10.0)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="engine stopped"):
            llm.generate(PROMPTS, GREEDY)
        assert time.monotonic() - t0 < 30
        with pytest.raises(RuntimeError):  # later requests are refused, not queued forever
            llm.generate(PROMPTS[:1], GREEDY)
    finally:
        with pytest.raises(RuntimeError, match="rank"):  # shutdown reports the fault (the server exits 1)
            llm.close()


def test_rank_dies_with_rank0(tiny: dict[int, Path]) -> None:
    """SIGKILL of rank 0 (no cleanup runs there) still ends the other ranks."""
    code = (f"from aengine import LLM\nif __name__ == '__main__':\n"
            f"    llm = LLM({str(tiny[2])!r}, tp=2, dtype='float32', device='cpu', kv_cache_tokens=1024)\n"
            f"    print('ready', flush=True)\n    import time; time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        ranks = descendants(proc.pid)
        assert ranks
        proc.kill()
        assert not wait_gone(ranks, 15.0)
    finally:
        proc.kill()
        proc.wait()


# ---- through the server -----------------------------------------------------------------------
def complete_all(url: str, prompts: list, **kw: object) -> list[list[int]]:
    async def go() -> list[list[int]]:
        async with await Client.connect(url) as c:
            key = "input_ids" if isinstance(prompts[0], list) else "prompt"
            rs = await asyncio.gather(*(c.complete(**{key: p}, max_tokens=8, temperature=0.0, ignore_eos=True, **kw)
                                        for p in prompts))
            return [r.token_ids for r in rs]

    return asyncio.run(go())


def test_tp3_server(embedded: LLM) -> None:
    prompts = ["The capital of France is", "1, 2, 3,"]
    ref = [o.token_ids for o in embedded.generate(prompts, GREEDY)]
    with running_server("--tp", "3", *CPU_ARGS) as srv:
        ranks = descendants(srv.proc.pid)
        assert len(ranks) >= 2
        assert complete_all(srv.url, prompts) == ref
        assert srv.stop() == 0
    assert not wait_gone(ranks, 15.0)


def test_two_nodes_server(tiny: dict[int, Path], tiny_ref: dict[int, list[list[int]]]) -> None:
    addr = f"127.0.0.1:{free_port()}"
    node1 = worker_node(tiny[2], addr)
    try:
        with running_server("--model", str(tiny[2]), "--tp", "2", "--nnodes", "2", "--dist-init-addr", addr,
                            *CPU_ARGS) as srv:
            assert complete_all(srv.url, PROMPTS) == tiny_ref[2]
            assert srv.stop() == 0
        assert node1.wait(30) == 0
    finally:
        node1.kill()
        node1.wait()


def test_killed_rank_ends_server(tiny: dict[int, Path]) -> None:
    with running_server("--model", str(tiny[2]), "--tp", "2", *CPU_ARGS) as srv:
        (rank1,) = descendants(srv.proc.pid)

        async def go() -> str:
            async with await Client.connect(srv.url) as c:
                got = 0
                try:
                    async for _ in c.generate(input_ids=PROMPTS[0], max_tokens=480, temperature=0.0, ignore_eos=True,
                                                stream=True):
                        got += 1
                        if got == 2:  # streaming: the request is in flight
                            os.kill(rank1, signal.SIGKILL)
                except ServerError as e:
                    return e.code
                return "finished"

        assert asyncio.run(go()) == "internal"
        assert srv.proc.wait(60) != 0  # the server reports and exits by itself
        assert "rank" in srv.log()
    assert not alive(rank1)
