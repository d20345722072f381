"""dptr_testbed."""
