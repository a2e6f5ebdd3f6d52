"""`ia3 serve`: one base model, many (IA)^3 adapters, mixed in every batch, behind an HTTP API.

Needs the `serve` extra (`pip install ia3[serve]`: fastapi, uvicorn). The core library never imports this package.

    from ia3.serve import ServeConfig, create_app, run
    app = create_app(ServeConfig(model="t5-small", adapters_dir="adapters/"))   # an ASGI app (FastAPI)
    run(ServeConfig(...), host="127.0.0.1", port=8000)                           # blocks, serving with uvicorn
"""

from ia3.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app", "run"]


def __getattr__(name: str):
    if name in ("create_app", "run"):
        from ia3.serve import app

        return getattr(app, name)
    raise AttributeError(name)
