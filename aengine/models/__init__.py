"""Registry: HF `architectures` name -> our module."""

from __future__ import annotations

from torch import nn

from aengine.models.llama import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,  # Llama's layers; a sliding window caps the context (runner)
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3ForCausalLM,  # the config's num_experts makes its MLPs MoE
}


def model_class(cfg: object) -> type[nn.Module]:
    archs = getattr(cfg, "architectures", None) or []
    if found := [REGISTRY[a] for a in archs if a in REGISTRY]:
        return found[0]
    raise ValueError(f"unsupported architecture {archs or getattr(cfg, 'model_type', '?')}; "
                     f"supported: {', '.join(REGISTRY)}")
