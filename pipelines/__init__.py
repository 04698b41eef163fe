"""Prefect flows: they only wire stage functions together (the logic lives in imageclf/stages).

Importing this package sends the library's log records (the stages' progress) to Prefect, so each
task's log in the UI shows its stage's output.
"""

import os

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "imageclf")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
