# mistake: rotates interleaved pairs (x[2i], x[2i+1]) instead of the halves (x[i], x[i + hd/2])
x1, x2 = x[..., 0::2], x[..., 1::2]
rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
return x * cos + rotated * sin
