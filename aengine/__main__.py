"""CLI: python -m aengine [options]. Each EngineConfig/ServerConfig field is a generated flag: none is forgotten."""

import argparse
import dataclasses
import logging
import os
import sys
import types
from pathlib import Path
from typing import Union, get_args, get_origin, get_type_hints

from aengine.config import EngineConfig, ServerConfig

CHOICES = {"cache": ["radix", "none"], "load_format": ["auto", "dummy"], "kv_cache_dtype": ["auto", "fp8_e4m3", "fp8"]}


def _add_fields(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    group = parser.add_argument_group(title)
    hints, docs = get_type_hints(cls), get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        if get_origin(tp) in (Union, types.UnionType):  # int for `int | None`
            tp = next(a for a in get_args(tp) if a is not type(None))
        tp = get_origin(tp) or tp  # list for `list[str]`
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        doc = docs[f.name].__metadata__[0]
        if tp is bool:
            group.add_argument(flag, action="store_true", help=doc)
        elif tp is list:
            group.add_argument(flag, action="append", default=None, metavar="X", help=doc)
        else:
            group.add_argument(flag, type=tp, default=default, choices=CHOICES.get(f.name),
                               metavar=None if f.name in CHOICES else f.name.upper(),
                               help=doc if "default" in doc else f"{doc} (default: {default})")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the usage block: the line says what is wrong
        self.exit(2, f"aengine: error: {message}\n")


# Inclusive ranges (None: unbounded) checked at parsing: a bad number is one line, not an error after the load.
RANGES = {"port": (0, 65535), "gpu_memory_utilization": (0.01, 1.0), **dict.fromkeys(
    "node_rank page_size num_pages max_prefill_tokens_decoding max_model_len cuda_graph_max_bs max_tokens_limit "
    "piecewise_cuda_graph_max_tokens drain_seconds".split(), (0, None)), **dict.fromkeys("tp nnodes kv_cache_tokens "
    "max_running_requests max_prefill_tokens max_frame_bytes max_requests_per_connection max_connections "
    "max_waiting_requests max_waiting_bytes max_waiting_bytes_per_connection send_buffer_bytes".split(), (1, None))}


def _check(p: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
    for name, (lo, hi) in RANGES.items():
        if (v := getattr(ns, name)) < lo or (hi is not None and v > hi):
            p.error(f"argument --{name.replace('_', '-')}: {v} is outside [{lo}, {'∞' if hi is None else hi}]")
    parts = ns.attn.split(",")
    if ns.attn != "auto" and (len(parts) > 2 or not set(parts) <= {"torch", "fi", "fa"}):
        p.error(f"argument --attn: {ns.attn!r} is not auto, one of torch, fi, fa, or PREFILL,DECODE of those")
    if ns.model is not None and not Path(ns.model).expanduser().exists():
        p.error(f"argument --model: {ns.model!r} does not exist")
    if ns.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            p.error(f"argument --device: {ns.device} asked for, but no CUDA device is available")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m aengine", description="Serve a model over WebSocket (protocol v1, docs/protocol.md) "
                "with GET /health and /metrics on one port. Ctrl-C or SIGTERM drains in-flight requests, then exits.")
    _add_fields(p, ServerConfig, "server")
    _add_fields(p, EngineConfig, "engine")
    p.add_argument("--shell", action="store_true",
                   help="chat with the model in this terminal through the engine directly, without a server")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="logging level (default: info)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    ns = p.parse_args(argv)
    _check(p, ns)
    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pick = lambda cls: {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)}
    server_cfg = ServerConfig(**pick(ServerConfig) | {
        "api_key": ns.api_key or os.environ.get("AENGINE_API_KEY") or None,
        "allowed_origins": [o for x in ns.allowed_origins or [] for o in x.split(",") if o]})
    engine_cfg = EngineConfig(**pick(EngineConfig))
    if engine_cfg.node_rank > 0:  # multi-node TP: other nodes run only their ranks; node 0 serves
        from aengine.tp.launch import run_worker_node

        return run_worker_node(engine_cfg)
    if ns.shell:
        from clients.shell import run_shell  # a user interface over the engine, loaded only here

        return run_shell(engine_cfg, max_tokens=server_cfg.max_tokens_limit or 512)
    from aengine.serve.server import run_server

    return run_server(engine_cfg, server_cfg)


if __name__ == "__main__":
    sys.exit(main())
