"""Prefect flows and their deployments: they wire, the logic lives elsewhere.

The training flow runs dvc.yaml's stages through DVC (dvc_experiment.py), so a flow run is a DVC
experiment; the monitoring flow calls monitoring/. Importing this package sends the library's
log records to Prefect, so each task's log in the UI shows what its code printed.
"""

import os

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "imageclf")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
