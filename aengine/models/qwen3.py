"""Qwen3: Llama with RMSNorm on each head of q and k before rotary."""

from aengine.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
