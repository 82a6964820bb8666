"""The HTTP server: `python -m energon_hf.serve`, or `create_app(model, tokenizer, settings)`."""

from .app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]
