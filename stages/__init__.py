"""One module per DVC stage: read params, call the library, write outputs and metrics.

Each module has ``run(params, paths) -> dict`` (called by Prefect flows and tests) and a CLI
``python -m stages.<name>`` (called by dvc.yaml). Logic belongs in ``imageclf``, not here.
"""
