"""Every knob of the engine and the server, with its default and --help text (python -m aengine: one flag each)."""

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated as H


@dataclass
class EngineConfig:
    model: H[str | None, "HF model dir, .gguf file, or config.json dir with --load-format dummy "
                         "(default: embedded SmolLM2-135M)"] = None
    dtype: H[str, "weights and activations: auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16"] = "auto"
    device: H[str, "auto (cuda when available, else cpu), cpu, cuda, cuda:N"] = "auto"
    load_format: H[str, "auto (from the files) or dummy (random weights from config.json, for benchmarks)"] = "auto"
    tokenizer: H[str | None, "tokenizer directory (default: the model directory)"] = None
    seed: H[int, "seed for dummy weights and for requests that give no seed"] = 0
    page_size: H[int, "tokens per KV page (0: chosen per attention backend)"] = 0
    num_pages: H[int, "KV pages in the pool (0: from --kv-cache-tokens on CPU, --gpu-memory-utilization on CUDA)"] = 0
    kv_cache_tokens: H[int, "KV pool size in tokens on CPU"] = 32768
    gpu_memory_utilization: H[float, "fraction of GPU memory for weights, activations and the KV pool"] = 0.85
    cache: H[str, "prefix cache: radix (share KV of common prefixes) or none"] = "radix"
    kv_cache_dtype: H[str, "KV storage: auto (model dtype) or fp8_e4m3/fp8 (2x tokens, checkpoint scales)"] = "auto"
    max_running_requests: H[int, "most requests in the running batch"] = 256
    max_prefill_tokens: H[int, "prompt tokens per prefill step (chunked prefill budget)"] = 8192
    max_prefill_tokens_decoding: H[int, "the same while requests wait to decode, unless a burst of prompts waits; "
                                        "bounds their inter-token latency (0: --max-prefill-tokens)"] = 0
    max_model_len: H[int, "context length in tokens (0: the model's max_position_embeddings)"] = 0
    disable_overlap: H[bool, "run one batch at a time instead of launching batch N+1 before processing batch N"] = False
    enable_mixed_chunk: H[bool, "decode running requests inside prefill steps"] = False
    attn: H[str, "attention: auto, torch, fi (flashinfer), fa (flash-attn), or prefill,decode such as fa,fi"] = "auto"
    cuda_graph_max_bs: H[int, "largest decode batch captured as a CUDA graph (0: no CUDA graphs)"] = 256
    piecewise_cuda_graph_max_tokens: H[int, "largest prefill step replayed as a CUDA graph "
                                            "(0: prefill runs eagerly)"] = 2048
    tp: H[int, "tensor-parallel degree (GPUs per model replica)"] = 1
    nnodes: H[int, "number of nodes for multi-node tensor parallelism"] = 1
    node_rank: H[int, "this node's rank for multi-node tensor parallelism"] = 0
    dist_init_addr: H[str | None, "host:port of rank 0 for multi-node tensor parallelism"] = None

    def replace(self, **kw: object) -> "EngineConfig":
        return dataclasses.replace(self, **kw)


@dataclass
class ServerConfig:
    host: H[str, "address to listen on (loopback by default; 0.0.0.0 exposes the server)"] = "127.0.0.1"
    port: H[int, "TCP port for WebSocket, /health and /metrics"] = 8765
    api_key: H[str | None, "require this key (Authorization: Bearer KEY, or the subprotocol bearer.KEY next to "
                           "aengine); default: $AENGINE_API_KEY"] = None
    allowed_origins: H[list[str], "browser Origins accepted (default: any); repeat or comma-separate"] = \
        field(default_factory=list)
    max_frame_bytes: H[int, "largest accepted client frame in bytes"] = 4 * 1024 * 1024
    max_requests_per_connection: H[int, "most live requests on one connection"] = 256
    max_connections: H[int, "most open WebSocket connections"] = 1024
    max_waiting_requests: H[int, "queue length at which new requests are refused with overloaded"] = 4096
    max_waiting_bytes: H[int, "bytes of generate frames still tokenizing past which requests get overloaded"] = 2**28
    max_waiting_bytes_per_connection: H[int, "the same budget for one connection"] = 32 * 1024 * 1024
    max_tokens_limit: H[int, "cap on max_tokens per request (0: up to the context length)"] = 0
    send_buffer_bytes: H[int, "unsent bytes a connection may hold, past which it is aborted and closed"] = 2**23
    drain_seconds: H[float, "on Ctrl-C / SIGTERM, how long in-flight requests may finish before being cancelled"] = 5.0
    debug_state: H[bool, "serve GET /debug/state (KV page and radix-tree invariants, task count; for tests)"] = False
