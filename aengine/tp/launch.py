"""Starting tensor parallelism: checks first, then this node's rank processes and rank 0, the server (docs/tp.md)."""

import logging
import multiprocessing as mp
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from aengine.config import EngineConfig
from aengine.distributed import set_tp
from aengine.runtime.runner import resolve_device_dtype
from aengine.tp.executor import TPExecutor, stop_procs
from aengine.tp.rank import Rank, rank_main, use_loopback
from aengine.weights import load_hf_config, resolve_model

log = logging.getLogger("aengine")


def check_tp(cfg: EngineConfig, hf_config: Any) -> int:
    """Clear errors before any process starts; returns the ranks per node."""
    tp, nn = cfg.tp, cfg.nnodes
    if tp < 1 or nn < 1 or tp % nn:
        raise ValueError(f"--tp {tp} must be a positive multiple of --nnodes {nn}")
    if not 0 <= cfg.node_rank < nn:
        raise ValueError(f"--node-rank {cfg.node_rank} is outside [0, {nn})")
    if nn > 1 and not cfg.dist_init_addr:
        raise ValueError("--nnodes > 1 needs --dist-init-addr HOST:PORT (node 0's address)")
    heads = hf_config.num_attention_heads
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    if heads % tp:
        raise ValueError(f"--tp {tp} does not divide the model's {heads} attention heads")
    if kv % tp and tp % kv:
        raise ValueError(f"--tp {tp} and the model's {kv} KV heads do not divide one another")
    for size in (hf_config.intermediate_size, getattr(hf_config, "moe_intermediate_size", tp)):
        if size % tp:
            raise ValueError(f"--tp {tp} does not divide the MLP size {size}")
    local = tp // nn
    device, _ = resolve_device_dtype(cfg.replace(device=cfg.device.split(":")[0]))
    if device.type == "cuda" and torch.cuda.device_count() < local:
        raise ValueError(f"--tp {tp} over {nn} node(s) needs {local} GPUs per node; "
                         f"this node has {torch.cuda.device_count()}")
    return local


def _spawn(cfg: EngineConfig, hf_config: Any, path: Path) -> tuple[int, str, list[Any]]:
    """Check, pick the rendezvous, start this node's ranks but local rank 0: (per node, init method, processes)."""
    local = check_tp(cfg, hf_config)
    if cfg.dist_init_addr:
        init_method = f"tcp://{cfg.dist_init_addr}"
    else:
        with socket.socket() as s:  # single node: any free loopback port
            s.bind(("127.0.0.1", 0))
            init_method = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    use_loopback(init_method)  # before spawning: children inherit the environment
    ctx = mp.get_context("spawn")  # fork is unsafe with CUDA and with the loop's threads
    first = cfg.node_rank * local  # this node's first rank, local rank 0: this process
    procs = [ctx.Process(target=rank_main, args=(cfg, hf_config, path, first + lr, lr, init_method),
                         name=f"aengine-tp{first + lr}", daemon=True) for lr in range(1, local)]
    for p in procs:
        p.start()
    return local, init_method, procs


def start_tp(cfg: EngineConfig, hf_config: Any, path: Path) -> TPExecutor:
    """Rank 0, node 0's server: spawn this node's other ranks, join, build its runner (other nodes: run_worker_node)."""
    if cfg.node_rank != 0:
        raise ValueError("only node 0 serves; run the other nodes with run_worker_node")
    _, init_method, procs = _spawn(cfg, hf_config, path)
    try:
        rank = Rank(cfg, hf_config, path, 0, 0, init_method, procs)
    except BaseException:
        stop_procs(procs, kill=True)
        set_tp(0, 1, None)
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    return TPExecutor(rank, procs)


def run_worker_node(cfg: EngineConfig) -> int:
    """Nodes 1..nnodes-1: run this node's ranks until node 0 shuts down; returns an exit code."""
    hf_config = load_hf_config(path := resolve_model(cfg.model))
    local, init_method, procs = _spawn(cfg, hf_config, path)
    try:
        Rank(cfg, hf_config, path, cfg.node_rank * local, 0, init_method).loop()
    except Exception as e:
        log.error("TP rank %d: %s", cfg.node_rank * local, str(e).splitlines()[0] if str(e) else e)
        stop_procs(procs, kill=True)
        return 1
    stop_procs(procs)
    return 1 if any(p.exitcode for p in procs) else 0
