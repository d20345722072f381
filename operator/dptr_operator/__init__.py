"""dptr_operator."""
