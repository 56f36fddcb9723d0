"""The HTTP service and web page (`cliplens serve`)."""

from cliplens.server.app import create_app
from cliplens.server.service import ServerSettings

__all__ = ["ServerSettings", "create_app"]
