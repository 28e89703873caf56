"""Local caches of guest file content."""

from .content import (
    ContentCache,
    ContentKey,
    DownloadCancelled,
    Fetch,
    Sink,
    TransferEvent,
)

__all__ = ["ContentCache", "ContentKey", "DownloadCancelled", "Fetch", "Sink", "TransferEvent"]
