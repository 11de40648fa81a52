"""backend.attention: the attention functions Neo picks from at import ((batch, tokens, heads * dim) in and out)."""
import torch


def attention_pytorch(q, k, v, heads, mask=None, **kwargs):
    batch, _, inner = q.shape
    q, k, v = (t.view(batch, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(batch, -1, inner)


def attention_sage(q, k, v, heads, mask=None, **kwargs): ...


def attention_flash(q, k, v, heads, mask=None, **kwargs): ...


attention_function = attention_pytorch
