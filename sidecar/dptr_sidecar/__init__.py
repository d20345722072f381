"""dptr_sidecar."""
