"""An OpenAI-compatible server with a web page (`llama3med serve`)."""

from .app import Settings, create_app
from .engine import Engine

__all__ = ["Engine", "Settings", "create_app"]
