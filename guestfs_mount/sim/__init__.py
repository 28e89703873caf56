"""guestfs-sim: a vCenter / ESXi REST simulator for guestfs-mount's tests and demo.

Modules: ``state`` (VMs, sessions, transfers, counters), ``guestfs`` (safe guest path
resolution), ``vcenter_app`` (the ``/api`` listener), ``esx_app`` (``/guestFile``),
``admin`` (``/_sim``), ``faults``, ``tlsutil``, ``server``, ``cli``, ``ctl`` and
``testing`` (``run_simulator`` for tests and benchmarks).
"""
