"""Every knob of the engine and the server in one place, with its default."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class EngineConfig:
    model: str | None = None  # HF dir, .gguf file, or config.json dir with load_format="dummy"; None = embedded
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # auto: cuda when available, else cpu
    load_format: str = "auto"  # auto | dummy
    tokenizer: str | None = None  # defaults to the model directory
    seed: int = 0  # seeds dummy weights and unseeded sampling
    page_size: int = 0  # 0: chosen per attention backend
    num_pages: int = 0  # 0: derived from kv_cache_tokens (CPU) or gpu_memory_utilization (CUDA)
    kv_cache_tokens: int = 32768  # CPU default pool size in tokens
    gpu_memory_utilization: float = 0.85
    cache: str = "radix"  # radix | none
    kv_cache_dtype: str = "auto"  # auto (the model dtype) | fp8_e4m3 (scales from the checkpoint, else 1.0)
    max_running_requests: int = 256
    max_prefill_tokens: int = 8192  # prompt tokens per step (chunked prefill budget)
    max_prefill_tokens_decoding: int = 0  # the budget while running requests wait to decode (0: the same)
    max_model_len: int = 0  # 0: the model's max_position_embeddings
    disable_overlap: bool = False
    enable_mixed_chunk: bool = False  # decode rows ride along in prefill steps instead of alternating
    attn: str = "auto"  # torch | fi | fa, or "prefill,decode" such as "fa,fi"
    cuda_graph_max_bs: int = 256  # 0 disables CUDA graphs
    tp: int = 1
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None

    def replace(self, **kw: object) -> EngineConfig:
        return dataclasses.replace(self, **kw)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    api_key: str | None = None
    allowed_origins: list[str] = field(default_factory=list)
    max_frame_bytes: int = 4 * 1024 * 1024
    max_requests_per_connection: int = 256
    max_connections: int = 1024
    max_waiting_requests: int = 4096
    max_waiting_bytes: int = 256 * 1024 * 1024  # generate frames not yet in the scheduler's queue
    max_waiting_bytes_per_connection: int = 32 * 1024 * 1024
    max_tokens_limit: int = 0  # 0: up to the context length
    send_buffer_bytes: int = 8 * 1024 * 1024
    drain_seconds: float = 5.0
    debug_state: bool = False  # GET /debug/state: KV and radix-tree invariants, for tests
