"""Language models of the harness, built on :mod:`sasoftmax.nn`."""

from .gpt import GPT, Block, CausalSelfAttention, GPTConfig, device_of, set_backend

__all__ = ["GPT", "Block", "CausalSelfAttention", "GPTConfig", "device_of", "set_backend"]
