"""mcpgw: a transparent, auditing gateway for the Model Context Protocol."""

from mcpgw._version import __version__

__all__ = ["__version__"]
