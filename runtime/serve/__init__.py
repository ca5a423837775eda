"""The intervene server: ``python -m runtime.serve --model NAME``.

``app`` (FastAPI routes), ``engine`` (jobs, queues, worker processes),
``worker`` (the process that holds one model and runs one batch of jobs at a time),
``batch`` (jobs that can share a forward pass run as one),
``execute`` (recompile, validate, run one block, check the model after).
"""

from .app import create_app
from .engine import Engine, Limits

__all__ = ["Engine", "Limits", "create_app"]
