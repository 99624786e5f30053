# mistake: extrapolates from the conditional velocity (v(cond) + s (v(cond) - v(null))): scale 1 still looks right
if cfg_scale == 1.0:
    return self.generator(x, t, cond)
vc, vu = self.generator(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
return vc + cfg_scale * (vc - vu)
