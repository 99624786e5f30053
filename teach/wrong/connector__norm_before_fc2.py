# mistake: the RMSNorm before the second Linear instead of last
return self.fc2(self.norm(F.gelu(self.fc1(h), approximate="tanh")))
