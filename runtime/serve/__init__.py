"""The intervene server: ``python -m runtime.serve --model NAME``.

``app`` (FastAPI routes), ``engine`` (jobs, queues, worker processes),
``worker`` (the process that holds one model and runs one job at a time),
``execute`` (recompile, validate, run one block, check the model after).
"""

from .app import create_app
from .engine import Engine, Limits

__all__ = ["Engine", "Limits", "create_app"]
