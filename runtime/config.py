"""``CONFIG``: where remote blocks go and with which key.

``CONFIG.set_default_api_key(key)`` / ``CONFIG.set_default_host(url)`` set them
for this process; otherwise ``INTERVENE_API_KEY`` and ``INTERVENE_HOST`` are
read when a remote block runs (so a test or a notebook may change the
environment late), and the host defaults to the loopback server that
``python -m runtime.serve`` starts.
"""

from __future__ import annotations

import os

DEFAULT_HOST = "http://127.0.0.1:8765"


class Config:
    """Settings of the remote client; one instance, ``CONFIG``."""

    def __init__(self) -> None:
        self._api_key: str | None = None
        self._host: str | None = None

    def set_default_api_key(self, key: str | None) -> None:
        if key is not None and not isinstance(key, str):
            raise TypeError(f"an API key is a string, got {type(key).__name__}")
        self._api_key = key

    def set_default_host(self, host: str | None) -> None:
        if host is not None:
            if not isinstance(host, str):
                raise TypeError(f"a host is a URL string, got {type(host).__name__}")
            if not host.startswith(("http://", "https://")):
                raise ValueError(f"a host is a URL starting with http:// or https://, got {host!r}")
        self._host = host

    @property
    def api_key(self) -> str | None:
        return self._api_key if self._api_key is not None else os.environ.get("INTERVENE_API_KEY")

    @property
    def host(self) -> str:
        host = self._host or os.environ.get("INTERVENE_HOST") or DEFAULT_HOST
        return host.rstrip("/")

    def __repr__(self) -> str:
        key = "set" if self.api_key else "none"
        return f"Config(host={self.host!r}, api_key={key})"


CONFIG = Config()
