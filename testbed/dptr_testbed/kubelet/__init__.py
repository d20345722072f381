"""The test bed's kubelet stand-in: a fake node that runs its pods' containers
as local processes and reports their status through the API, as kubelet does.

Run as ``python -m dptr_testbed.kubelet --kubeconfig=PATH --node=NAME --root=DIR``;
see testbed/README.md for what it emulates and what it does not.
"""

from __future__ import annotations

from .standin import StandIn, main

__all__ = ["StandIn", "main"]
