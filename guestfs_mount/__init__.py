"""guestfs-mount: a read-only FUSE view of a running VMware VM's guest filesystem."""

__version__ = "0.1.0"
