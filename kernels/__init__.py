"""Triton kernels of the hot paths, installed as `attn_zoo.kernels`.

Kernels know nothing of the registry: they take tensors and layouts (key-block lists, gather
indices) and return outputs with their log-sum-exps, so partial results merge exactly.

* `layout`: tile layouts (`BlockLayout`) of a pattern `allowed(i, j)`, built once and cached.
* `block_sparse`: flash attention over a layout, forward and backward, as torch custom ops.

Nothing is imported here: Triton reads `TRITON_INTERPRET` when a kernel is defined, so the
library imports a kernel module on its first triton call only.
"""
