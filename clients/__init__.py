"""Clients of the aengine WebSocket server: an async client library and a terminal chat."""

from clients.client import Client, GenerateResult, ServerError

__all__ = ["Client", "GenerateResult", "ServerError"]
