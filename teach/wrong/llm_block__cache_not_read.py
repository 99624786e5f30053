# mistake: writes the new keys/values into the cache but attends to the new ones only
B, T, _ = x.shape
H, KV, hd = self.c.n_heads, self.c.n_kv_heads, self.c.head_dim
q, k, v = self.qkv(x).view(B, T, H + 2 * KV, hd).split((H, KV, KV), dim=2)
q = rope(self.q_norm(q).transpose(1, 2), cos, sin)
k = rope(self.k_norm(k).transpose(1, 2), cos, sin)
v = v.transpose(1, 2)
if cache is not None:
    cache.update(self.layer, k, v)
y = attention(q, k, v, mask if cache is None else None, is_causal)
return self.proj(y.transpose(1, 2).reshape(B, T, H * hd))
