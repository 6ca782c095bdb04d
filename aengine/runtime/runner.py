"""The model runner: the model, KV pool, page table and per-slot last sampled token; a StepInput in, ids out."""

import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from aengine.attention import ForwardBatch, check_kv_dtype, create_backend, default_page, forward_context
from aengine.cache.pool import FP8, KVPool, dtype_name, kv_dtype
from aengine.config import EngineConfig
from aengine.distributed import broadcast_from_first, tp
from aengine.models import model_class
from aengine.runtime.cuda_graph import CudaGraphs
from aengine.runtime.sampler import SamplingTensors, apply_token_masks, process_logits, sample, upload, with_logprobs
from aengine.runtime.step import StepInput
from aengine.weights import dummy_weights, iter_safetensors

log = logging.getLogger("aengine")

def resolve_device_dtype(cfg: EngineConfig) -> tuple[torch.device, torch.dtype]:
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    auto = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, auto if cfg.dtype == "auto" else \
        getattr(torch, {"half": "float16", "bf16": "bfloat16", "fp32": "float32"}.get(cfg.dtype, cfg.dtype))


def attn_names(cfg: EngineConfig, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    # flashinfer has no float32 kernels: a float32 model on CUDA attends with torch by default
    fi = device.type == "cuda" and dtype != torch.float32
    parts = (cfg.attn if cfg.attn != "auto" else ("fi" if fi else "torch")).split(",")
    if dtype == torch.float32 and "fi" in parts:
        raise ValueError("--attn fi needs --dtype bfloat16 or float16: flashinfer has no float32 kernels")
    return parts[0], parts[-1]


MIN_AUTO_TOKENS = 256  # a KV pool sized from free GPU memory below this is refused, not served


class ModelRunner:
    """`agree` turns this process's KV page count into the one to use before any buffer is sized from it:
    tensor-parallel ranks take the smallest over all ranks (the scheduler sizes requests from one pool)."""

    def __init__(self, cfg: EngineConfig, hf_config: object, model_path: object,
                 agree: Callable[[int], int] = lambda n: n) -> None:
        self.cfg, self.hf = cfg, hf_config
        self.device, self.dtype = resolve_device_dtype(cfg)
        self.kv_dtype = kv_dtype(cfg.kv_cache_dtype, self.dtype)
        prefill_attn, decode_attn = attn_names(cfg, self.device, self.dtype)
        check_kv_dtype((prefill_attn, decode_attn), self.kv_dtype)  # before the weights load: fail fast
        # attention here sees the whole context: a sliding window (Mistral) caps the context instead
        window = getattr(hf_config, "sliding_window", None) or 1 << 62
        if cfg.max_model_len > window:
            raise ValueError(f"--max-model-len {cfg.max_model_len} is longer than the model's sliding window "
                             f"({window} tokens): attention beyond the window is not supported")
        self.page_size = cfg.page_size or default_page((prefill_attn, decode_attn), self.kv_dtype, self.device)
        torch.manual_seed(cfg.seed)
        t0 = time.perf_counter()
        with torch.device(self.device):
            prev = torch.get_default_dtype()
            torch.set_default_dtype(self.dtype)
            try:
                self.model = model_class(hf_config)(hf_config)
            finally:
                torch.set_default_dtype(prev)
        self.model.load_weights(iter_safetensors(model_path) if cfg.load_format != "dummy" else
                                dummy_weights(self.model.checkpoint_shapes(hf_config), cfg.seed, self.device))
        self.model.eval()
        attn = self.model.layers[0].self_attn
        self.num_layers = hf_config.num_hidden_layers
        self.num_pages = agree(cfg.num_pages or self._auto_pages(attn.n_kv_local, attn.head_dim))
        # every admitted request must fit in the pool alone, so preemption always makes progress
        self.max_model_len = min(cfg.max_model_len or hf_config.max_position_embeddings, window,
                                 (self.num_pages - 1) * self.page_size)
        self.pool = KVPool(self.num_layers, self.num_pages, self.page_size, attn.n_kv_local, attn.head_dim,
                           self.kv_dtype, self.device, scales=self._kv_scales())
        if tp().rank == 0:
            log.info("KV cache: %d tokens, %.2f GiB, %s (%d pages of %d); model and weights took %.1f s",
                     self.num_pages * self.page_size, self.pool.nbytes / 2**30, dtype_name(self.kv_dtype),
                     self.num_pages, self.page_size, time.perf_counter() - t0)
        self.max_slots = cfg.max_running_requests + 1  # +1: slot 0 is scratch for padded rows
        max_pages = (self.max_model_len + self.page_size - 1) // self.page_size
        self.page_table = torch.zeros(self.max_slots, max_pages, dtype=torch.int32, device=self.device)
        self.last_tok = torch.zeros(self.max_slots, dtype=torch.int32, device=self.device)
        kw = dict(pool=self.pool, page_table=self.page_table, num_heads=attn.n_local, cfg=cfg, q_dtype=self.dtype)
        self.prefill_backend = create_backend(prefill_attn, **kw)
        self.decode_backend = self.prefill_backend if decode_attn == prefill_attn else create_backend(decode_attn, **kw)
        self.graphs = CudaGraphs(self.model, self.decode_backend, min(cfg.cuda_graph_max_bs, self.max_slots - 1),
                                 self.prefill_backend, cfg.piecewise_cuda_graph_max_tokens) \
            if self.device.type == "cuda" and cfg.cuda_graph_max_bs > 0 else None
        if self.device.type == "cuda":
            self._warm_lm_head()

    @torch.inference_mode()
    def _warm_lm_head(self) -> None:
        """The LM head runs eagerly on each step's sampled rows; cuBLAS picks its kernel by row count, and each
        kernel's first use stalled its step by ~8 ms (W1's 18 slow decode steps; RESULTS.md): use every one now."""
        h = torch.zeros(self.max_slots - 1, self.hf.hidden_size, dtype=self.dtype, device=self.device)
        for m in range(1, len(h) + 1):
            self.model.logits(h[:m])
        torch.cuda.synchronize()

    def _auto_pages(self, kv_heads: int, head_dim: int) -> int:
        """Pages from a byte budget on CUDA (FP8 fits twice the tokens of bf16), from --kv-cache-tokens on CPU."""
        if self.device.type != "cuda":
            return max(2, self.cfg.kv_cache_tokens // self.page_size)
        free, total = torch.cuda.mem_get_info(self.device)
        budget = free - total * (1 - self.cfg.gpu_memory_utilization)
        tokens = int(budget // KVPool.bytes_per_token(self.num_layers, kv_heads, head_dim, self.kv_dtype))
        if tokens < MIN_AUTO_TOKENS:  # else a "working" engine whose context is a handful of tokens
            raise ValueError(f"only {max(tokens, 0)} tokens of KV cache fit ({free / 2**30:.1f} of {total / 2**30:.1f} "
                             f"GiB free): free GPU memory, raise --gpu-memory-utilization or give --num-pages")
        return max(2, tokens // self.page_size)

    def _kv_scales(self) -> list[tuple[float, float]] | None:
        """Per-layer (k_scale, v_scale) for an FP8 pool: the checkpoint's, else 1.0 (logged)."""
        loaded = getattr(self.model, "kv_scales_loaded", 0)
        scales = [(layer.self_attn.k_scale, layer.self_attn.v_scale) for layer in self.model.layers]
        if tp().rank == 0 and self.kv_dtype == FP8 and loaded:
            ks, vs = zip(*scales)
            log.info("FP8 KV scales from the checkpoint (%d tensors): k %.4g..%.4g, v %.4g..%.4g",
                     loaded, min(ks), max(ks), min(vs), max(vs))
        elif tp().rank == 0 and self.kv_dtype == FP8:
            log.info("FP8 KV scales: 1.0 (the checkpoint has none; K/V beyond +-448 saturate)")
        elif tp().rank == 0 and loaded:
            log.info("the checkpoint's %d KV scale tensors are unused: the KV cache is %s", loaded, self.kv_cache_dtype)
        return scales

    @property
    def kv_cache_dtype(self) -> str:  # for /metrics
        return dtype_name(self.kv_dtype)

    def _upload(self, ints: list[np.ndarray]) -> list[torch.Tensor]:
        """One host-to-device copy for all of a step's int metadata."""
        sizes = [len(a) for a in ints]
        flat = torch.from_numpy(np.concatenate(ints).astype(np.int32, copy=False))
        return list(upload(flat, self.device).split(sizes))

    def step(self, inp: StepInput) -> torch.Tensor:
        return self.sample(inp, *self.forward(inp))

    @torch.inference_mode()
    def forward(self, inp: StepInput) -> tuple[torch.Tensor, torch.Tensor]:
        ps = self.page_size
        ext, seq, slots = (np.asarray(x, dtype=np.int64) for x in (inp.extend_lens, inp.seq_lens, inp.slots))
        if inp.decode:
            positions, tok_slots = seq - 1, slots
        else:
            tok_slots = np.repeat(slots, ext)
            positions = np.arange(int(ext.sum())) - np.repeat(np.cumsum(ext) - ext - (seq - ext), ext)
        qo_indptr = np.concatenate([[0], np.cumsum(ext)])
        sample_idx = qo_indptr[1:][inp.sample_rows] - 1
        (d_slots, d_seq, d_qo, d_pos, d_tslots, d_sidx, d_ids, d_ptr, d_ptc, d_ptp, d_sslots) = self._upload([
            slots, seq, qo_indptr, positions, tok_slots, sample_idx, np.asarray(inp.input_ids),
            np.asarray(inp.pt_rows), np.asarray(inp.pt_cols), np.asarray(inp.pt_pages), slots[inp.sample_rows]])
        if len(inp.pt_pages):
            self.page_table[d_ptr.long(), d_ptc.long()] = d_ptp
        pos = d_pos.long()
        out_loc = self.page_table[d_tslots.long(), pos // ps].long() * ps + pos % ps
        input_ids = self.last_tok[d_slots.long()] if inp.decode else d_ids
        if inp.decoding:  # a mixed step's first rows decode: one token each, the last one sampled
            input_ids[: inp.decoding] = self.last_tok[d_slots[: inp.decoding].long()]
        fb = ForwardBatch(inp.decode, input_ids, pos, out_loc, d_slots, d_seq, d_qo, d_sidx.long(),
                          inp.seq_lens, inp.extend_lens)
        if self.graphs is not None and self.graphs.can_run(fb):  # decode, and prefill steps up to a size
            hidden = self.graphs.run(fb)
        else:
            backend = self.decode_backend if inp.decode else self.prefill_backend
            backend.prepare(fb)
            with forward_context(backend):
                hidden = self.model(input_ids, pos)
        # penalties and bias go with the forward; a grammar's masks (filled on the host meanwhile) after
        return process_logits(self.model.logits(hidden[fb.sample_idx]), inp, self.last_tok, d_sslots), d_sslots

    @torch.inference_mode()
    def sample(self, inp: StepInput, logits: torch.Tensor, d_sslots: torch.Tensor, masks: tuple = ()) -> torch.Tensor:
        if masks:  # (masked rows, their grammar's masks)
            apply_token_masks(logits, *masks)
        ids = broadcast_from_first(sample(logits, self._sampling(inp)))
        if len(inp.sample_rows):
            self.last_tok[d_sslots.long()] = ids
        return ids if inp.logprobs < 0 else with_logprobs(logits, ids, inp.logprobs)

    def _sampling(self, inp: StepInput) -> SamplingTensors:
        seeds = [(i, s, inp.seq_lens[r]) for i, (s, r) in enumerate(zip(inp.seeds, inp.sample_rows)) if s >= 0]
        f = torch.tensor([inp.temperature, inp.top_p, inp.min_p], dtype=torch.float32).view(3, -1)
        f, k = upload(f, self.device), upload(torch.tensor(inp.top_k, dtype=torch.int64), self.device)
        greedy = [not t > 0 for t in inp.temperature]  # a row samples only when its temperature is > 0
        return SamplingTensors(temperature=f[0], top_p=f[1], top_k=k, min_p=f[2], seeds=seeds, all_greedy=all(greedy),
                               any_greedy=any(greedy), need_topk=any(k > 0 for k in inp.top_k),
                               need_topp=any(p < 1.0 for p in inp.top_p), need_minp=any(p > 0 for p in inp.min_p))
