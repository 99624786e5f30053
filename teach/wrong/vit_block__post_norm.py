# mistake: post-norm (norm(x + f(x))) instead of SigLIP's pre-norm (x + f(norm(x)))
B, N, D = x.shape
q, k, v = self.qkv(x).view(B, N, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
a = attention(q, k, v).transpose(1, 2).reshape(B, N, D)
x = self.norm1(x + self.proj(a))
return self.norm2(x + self.fc2(F.gelu(self.fc1(x), approximate="tanh")))
