"""The demo: its business service (`spine.demo.service`) and the refund agent's tools
(`spine.demo.agent`)."""

__all__ = ["create_app"]


def __getattr__(name: str) -> object:
    # Lazy, so workers importing `spine.demo.agent` do not pay for FastAPI.
    if name == "create_app":
        from spine.demo.service import create_app

        return create_app
    raise AttributeError(f"module 'demo' has no attribute {name!r}")
