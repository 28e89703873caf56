"""vCenter REST client layer: the only part of guestfs-mount that imports httpx."""

from .client import ClientConfig, ClientStats, VCenterClient

__all__ = ["ClientConfig", "ClientStats", "VCenterClient"]
