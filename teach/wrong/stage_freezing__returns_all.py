# mistake: sets requires_grad right but hands every parameter to the optimizer (weight decay still moves frozen ones)
parts = set(STAGES[stage]["trains"])
if stage == 1 and head is not None and not head_trained:
    parts.add("generator")
gem.requires_grad_("vlm" in parts)
if head is not None:
    head.connector.requires_grad_("connector" in parts)
    head.generator.requires_grad_("generator" in parts)
return list(gem.parameters()) + (list(head.parameters()) if head is not None else [])
