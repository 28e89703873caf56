"""The whole vCenter as one tree (``--all-vms``): every VM a directory.

``names`` makes guest-controlled VM names safe directory names; ``vm`` is one VM's
lazily built single-VM machinery and its failure state; ``inventory`` the refreshed
set of VMs; ``fuse`` the FUSE layer of the fleet (its own inode space over the per-VM
``fs.Operations``); ``serve`` the lifecycle.
"""
