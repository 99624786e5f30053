# mistake: block i reads hidden_states[i + 1] (skips the embeddings, layer 0)
# region: 1
return [blk.context(hidden_states[i + 1], mask) for i, blk in enumerate(self.blocks)]
