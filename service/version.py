"""The service's version, from the installed package metadata."""

from importlib import metadata

try:
    VERSION = metadata.version("portal-gateway")
except metadata.PackageNotFoundError:  # running from a source tree without install
    VERSION = "0.0.0"

USER_AGENT = f"portal-gateway/{VERSION}"
