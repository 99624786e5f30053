# mistake: rotates by -angle: the rotated half is (x2, -x1)
x1, x2 = x.chunk(2, dim=-1)
return x * cos + torch.cat((x2, -x1), dim=-1) * sin
