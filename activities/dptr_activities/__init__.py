"""dptr's SqlActivity and CopyActivity: ``dptr-activity``, run in the task container of their attempts.

The operator resolves an attempt into a :class:`dptr_common.activity_plan.ActivityPlan`
and mounts it (with the database password) from a per-attempt Secret; this package reads
it, runs the statements or the copy, and ends with an exit code and a termination message
(``<errorId>\\n<message>``) that the sidecar reports as SetTaskStatus.
"""
