"""dptr_datapipeline: a local AWS Data Pipeline service speaking the real protocol.

Use it in-process (``LocalDataPipeline``) or as ``dptr-datapipeline serve``.
See docs/local-datapipeline.md.
"""

from dptr_datapipeline.definition import definition_file_to_api
from dptr_datapipeline.ledger import AttemptRecord, CallRecord, Ledger, Reassignment, Violation
from dptr_datapipeline.server import (
    DEFAULT_ACCESS_KEY_ID,
    DEFAULT_QUOTAS,
    DEFAULT_SECRET_ACCESS_KEY,
    QUOTA_BURST,
)
from dptr_datapipeline.service import REGION, LocalDataPipeline

__all__ = [
    "DEFAULT_ACCESS_KEY_ID",
    "DEFAULT_QUOTAS",
    "DEFAULT_SECRET_ACCESS_KEY",
    "QUOTA_BURST",
    "REGION",
    "AttemptRecord",
    "CallRecord",
    "Ledger",
    "LocalDataPipeline",
    "Reassignment",
    "Violation",
    "definition_file_to_api",
]
