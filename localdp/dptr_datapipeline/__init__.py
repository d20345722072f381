"""dptr_datapipeline: a local AWS Data Pipeline service (in progress)."""
