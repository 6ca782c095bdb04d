"""Qwen2 / Qwen2.5: Llama with a bias on the q, k and v projections."""

from aengine.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
