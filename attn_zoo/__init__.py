"""attn-zoo: long-context efficient attention variants behind one interface."""

from attn_zoo import variants
from attn_zoo.attention import Attention
from attn_zoo.params import Params
from attn_zoo.registry import available, build, register

__all__ = ["Attention", "Params", "available", "build", "register", "variants"]
