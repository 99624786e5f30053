# mistake: reads the batched output's halves the wrong way round (both = [cond, null])
if cfg_scale == 1.0:
    return self.generator(x, t, cond)
vu, vc = self.generator(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
return vu + cfg_scale * (vc - vu)
