"""Models: the registry of architectures (zoo), pretrained backbones, layers written out, and
checkpoints (a state_dict plus what rebuilds the model)."""
