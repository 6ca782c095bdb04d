"""The paged KV pool: per layer K and V [num_pages, page_size, kv_heads, head_dim], in the model dtype or
float8_e4m3fn with a k_scale and v_scale per layer, 1.0 without checkpoint scales (docs/gpu.md, FP8 KV)."""

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn; quantization saturates here (CUDA's cast would give NaN)
KV_DTYPES = {"fp8_e4m3": FP8, "fp8": FP8}


def kv_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The pool's dtype for --kv-cache-dtype NAME."""
    if name not in ("auto", *KV_DTYPES):
        raise ValueError(f"unknown --kv-cache-dtype {name!r} (auto, fp8_e4m3)")
    return KV_DTYPES.get(name, model_dtype)


def dtype_name(dtype: torch.dtype) -> str:
    """What /metrics and the start-up log call it: fp8_e4m3, bfloat16, float32, ..."""
    return "fp8_e4m3" if dtype == FP8 else str(dtype).removeprefix("torch.")


def quantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x / scale, saturated to +-448, as float8_e4m3fn (round to nearest even), computed exactly as the
    fused write (layers/qkv_store.py) does, so both store the same bits for the same input."""
    x = x.float()
    if scale != 1.0:
        x = x * torch.tensor(1.0 / scale, dtype=torch.float32, device=x.device)
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8)


class KVPool:
    def __init__(self, num_layers: int, num_pages: int, page_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, scales: list[tuple[float, float]] | None = None) -> None:
        self.num_pages, self.page_size, self.dtype, self.fp8 = num_pages, page_size, dtype, dtype == FP8
        shape = (num_layers, num_pages, page_size, kv_heads, head_dim)
        # zeroed on the GPU (a cheap memset): kernels loading whole page tiles must not meet NaN/Inf in
        # unwritten slots; the CPU reads only written slots, and zeroing gigabytes there takes seconds
        alloc = torch.zeros if torch.device(device).type == "cuda" else torch.empty
        # FP8 is allocated as bytes and viewed as float8: every op moving FP8 rows (zero fill, store's
        # scatter, read's gather) runs on the uint8 view, which every torch build supports everywhere
        store = torch.uint8 if self.fp8 else dtype
        self.k, self.v = (alloc(shape, dtype=store, device=device).view(dtype) for _ in "kv")
        # per layer (k_scale, v_scale): floats for the attention kernels; for the fused KV write, a [layers, 2]
        # fp32 tensor of reciprocals (read on the device: nothing on the host changes under a captured graph)
        sc = list(scales) if scales is not None else [(1.0, 1.0)] * num_layers
        if len(sc) != num_layers:
            raise ValueError(f"{len(sc)} KV scale pairs for {num_layers} layers")
        if not self.fp8:
            sc = [(1.0, 1.0)] * num_layers  # a 16/32-bit cache stores K and V as they are
        self.k_scale, self.v_scale = [float(k) for k, _ in sc], [float(v) for _, v in sc]
        self.inv_scales = (1.0 / torch.tensor(sc, dtype=torch.float64)).float().to(device).view(num_layers, 2)

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def store(self, layer: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        for c, x, s in zip(self.flat(layer), (k, v), (self.k_scale[layer], self.v_scale[layer])):
            if self.fp8:
                c.view(torch.uint8)[loc] = quantize(x, s).view(torch.uint8)
            else:
                c[loc] = x.to(c.dtype)

    def read(self, layer: int, idx: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V rows idx of a layer [len(idx), kv_heads, head_dim] in dtype; FP8: stored * scale, rounded once."""
        if not self.fp8:
            return tuple(c[idx].to(dtype) for c in self.flat(layer))
        kv = (c.view(torch.uint8)[idx].view(FP8).float() for c in self.flat(layer))
        scales = (self.k_scale[layer], self.v_scale[layer])
        return tuple((x * s if s != 1.0 else x).to(dtype) for x, s in zip(kv, scales))

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[num_pages * page_size, kv_heads, head_dim] views of one layer."""
        return tuple(c[layer].view(-1, *c.shape[3:]) for c in (self.k, self.v))
