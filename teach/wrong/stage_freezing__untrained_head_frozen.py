# mistake: follows STAGES literally: stage 1 freezes an untrained generator (the VLM then learns from a random head)
parts = set(STAGES[stage]["trains"])
gem.requires_grad_("vlm" in parts)
if head is not None:
    head.connector.requires_grad_("connector" in parts)
    head.generator.requires_grad_("generator" in parts)
mods = [gem] + ([head] if head is not None else [])
return [p for m in mods for p in m.parameters() if p.requires_grad]
