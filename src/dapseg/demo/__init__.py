"""The web demo: ``backend`` (requests, knobs and views, no UI code) and ``app`` (the Gradio page)."""

from dapseg.demo.app import Catalog, build_app, serve

__all__ = ["Catalog", "build_app", "serve"]
