"""dptr_common."""
