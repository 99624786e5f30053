# mistake: GQA heads repeated in the wrong order (tile: head h reads kv h % KV, not h // (H // KV))
rep = q.shape[1] // k.shape[1]
k, v = k.repeat(1, rep, 1, 1), v.repeat(1, rep, 1, 1)  # (B, H, S, hd)
if SDPA:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
if is_causal:
    T, S = scores.shape[-2:]
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
if mask is not None:
    scores = scores.masked_fill(~mask, float("-inf"))
return scores.softmax(-1) @ v
