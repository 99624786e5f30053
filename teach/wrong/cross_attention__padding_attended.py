# mistake: forgets the padding mask (an all-zero additive bias)
k, v = self.kv(self.ctx_norm(h)).chunk(2, dim=-1)
bias = torch.zeros(mask.shape, dtype=k.dtype, device=k.device)
return self.split(k), self.split(v), bias[:, None, None, :]
