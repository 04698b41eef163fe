"""imageclf: the library. All model, data, training, export and registry logic lives here;
stages/, pipelines/, services/ and monitoring/ only call it (import-linter checks the direction).

Layers, lowest first; each imports only from its own layer and those below, and no modules
import each other in a loop (tests/test_architecture.py, whose LAYERS says why each sits there):

1. base modules: paths.py and config.py (every path and parameter), io.py (atomic writes),
   metric_names.py, errors.py (StageError, InvalidInput), seeding.py, tracking.py (MLflow),
   onnx_runtime.py (sessions and model metadata, no torch);
2. data/: fetch, the canonical store, transforms.py (the one preprocessing), loaders;
3. models/: zoo.py (the model registry), backbones.py, layers, checkpoints, ensembles;
4. training/: engine.py (the training loop), transfer, resume, DDP, debugging;
5. evaluation/: metrics, error analysis, inside views;
6. registry.py: MLflow champion/challenger;
7. deploy/: export, optimize, compress, distill, benchmark, inference, champion;
8. tools on top: stage.py (the stage CLI), summary.py, compare.py.

Course-only code (backpropagation by hand, the Lightning adapter, the tensor calculator) is not
here but in course/, which may import the library and is never imported by it.

This file imports nothing: it runs before every module of the package.
"""
