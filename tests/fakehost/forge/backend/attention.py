"""backend.attention: the attention functions Neo picks from at import."""


def attention_pytorch(q, k, v, heads, mask=None, **kwargs): ...


def attention_sage(q, k, v, heads, mask=None, **kwargs): ...


def attention_flash(q, k, v, heads, mask=None, **kwargs): ...


attention_function = attention_pytorch
