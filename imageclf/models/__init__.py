"""Models: the registry of architectures (zoo), pretrained backbones, layers written out, and
checkpoints (a state_dict plus what rebuilds the model).

Importing any module of the package runs this file first, so the pretrained backbones are in
the zoo's registry wherever ``imageclf.models.zoo`` is used. The zoo itself does not import
them: :mod:`imageclf.models.backbones` imports the zoo (to register), not the other way round.
"""

# backbones imports zoo itself, so the registry exists before anything registers in it.
from imageclf.models import backbones, zoo  # noqa: F401  (imported for the registrations)
