"""The mamlserve client side: `mamlserve.client.Client` (httpx) and the `mamlserve` command."""

from mamlserve.client import Client, MamlserveError

__all__ = ["Client", "MamlserveError"]
