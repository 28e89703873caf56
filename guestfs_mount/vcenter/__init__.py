"""The vCenter layer: the only part of guestfs-mount that imports httpx.

``VCenterClient`` (client.py) is what the upper layers use; it runs one transport (rest.py,
vi_json.py, soap.py; chosen by probe.py) over the shared plumbing of session.py and
downloads bodies through transfer.py.
"""

from .client import ClientConfig, ClientStats, VCenterClient

__all__ = ["ClientConfig", "ClientStats", "VCenterClient"]
