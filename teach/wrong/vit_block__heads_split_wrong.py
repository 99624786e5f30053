# mistake: splits the fused qkv as (B, N, heads, 3, hd): every head mixes q, k and v features
B, N, D = x.shape
q, k, v = self.qkv(self.norm1(x)).view(B, N, self.n_heads, 3, -1).permute(3, 0, 2, 1, 4)
a = attention(q, k, v).transpose(1, 2).reshape(B, N, D)
x = x + self.proj(a)
return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))
