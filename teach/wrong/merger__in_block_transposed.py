# mistake: concatenates each 2x2 block column-major ((0,0), (1,0), (0,1), (1,1)): the in-block axes swapped
B, N, D = x.shape
s, m = math.isqrt(N), self.m
g = -(-s // m)
x = self.norm(x).view(B, s, s, D)
if g * m != s:
    x = F.pad(x, (0, 0, 0, g * m - s, 0, g * m - s))
x = x.view(B, g, m, g, m, D).permute(0, 1, 3, 4, 2, 5)
x = x.reshape(B, g * g, m * m * D)
return self.fc2(F.gelu(self.fc1(x)))
