"""course: course-only code. The project is also the capstone of a PyTorch course, and these
modules exist only to teach; each maps to a course topic listed in docs/course-map.md.

- autograd_by_hand.py: backpropagation by hand (a custom ``torch.autograd.Function`` and an MLP
  on plain tensors), checked against autograd (course modules 1-2);
- lightning_adapter.py: the same training as PyTorch Lightning (course bonus B);
- tensor_calc.py: the tensor calculator, ``python -m course.tensor_calc`` (Mini-Project 1).

The product (the library imageclf/, the DVC stages, the flows, the service, monitoring, ops)
never imports this package: pyproject.toml's import-linter contract says so and ``lint-imports``
checks it. The course code may import the library, never the other way round.
"""
