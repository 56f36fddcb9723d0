"""The HTTP service and web page (`cliplens serve`)."""

from cliplens.server.app import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app"]
