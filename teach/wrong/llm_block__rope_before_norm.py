# mistake: RoPE before the q/k RMSNorm (Qwen3 normalises first; with non-uniform norm weights they differ)
B, T, _ = x.shape
H, KV, hd = self.c.n_heads, self.c.n_kv_heads, self.c.head_dim
q, k, v = self.qkv(x).view(B, T, H + 2 * KV, hd).split((H, KV, KV), dim=2)
q = self.q_norm(rope(q.transpose(1, 2), cos, sin))
k = self.k_norm(rope(k.transpose(1, 2), cos, sin))
v = v.transpose(1, 2)
if cache is not None:
    k, v = cache.update(self.layer, k, v)
y = attention(q, k, v, mask, is_causal)
return self.proj(y.transpose(1, 2).reshape(B, T, H * hd))
