"""Triton kernels of the hot paths, installed as `attn_zoo.kernels`.

Kernels know nothing of the registry: they take tensors and layouts (key-block lists, gather
indices) and return outputs with their log-sum-exps, so partial results merge exactly.
"""
