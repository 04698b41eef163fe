"""imageclf: the library. All model, data, training, export and registry logic lives here;
stages/, pipelines/, services/ and monitoring/ only call it (import-linter checks the direction).

Where things are: data/ (fetch, canonical store, loaders), transforms.py (the one preprocessing),
models.py (the model registry), engine.py (the training loop), export.py and optimize.py,
registry.py (MLflow champion/challenger), config.py and paths.py (every parameter and path).
"""
