"""Registry: HF `architectures` name -> our module."""

from torch import nn

from aengine.models.llama import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

# Mistral: Llama's layers, a sliding window caps the context (runner); Qwen3-MoE: num_experts makes the MLPs MoE
REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM, "MistralForCausalLM": LlamaForCausalLM, "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM, "Qwen3MoeForCausalLM": Qwen3ForCausalLM}


def model_class(cfg: object) -> type[nn.Module]:
    archs = getattr(cfg, "architectures", None) or []
    if found := [REGISTRY[a] for a in archs if a in REGISTRY]:
        return found[0]
    raise ValueError(f"unsupported architecture {archs or getattr(cfg, 'model_type', '?')}; "
                     f"supported: {', '.join(REGISTRY)}")
