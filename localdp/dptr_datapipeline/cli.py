"""``dptr-datapipeline serve``: run the local Data Pipeline service."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from dptr_datapipeline.engine import DEFAULT_MAXIMUM_RETRIES
from dptr_datapipeline.server import DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY
from dptr_datapipeline.service import LocalDataPipeline


def _access_key(text: str) -> tuple[str, str]:
    key_id, sep, secret = text.partition(":")
    if not sep or not key_id or not secret:
        raise argparse.ArgumentTypeError("expected ACCESS_KEY_ID:SECRET")
    return key_id, secret


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dptr-datapipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the AWS Data Pipeline JSON 1.1 API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080, help="0 picks a free port (printed on start)")
    serve.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiply every protocol duration and divide every quota rate by this (0.01: 2 min -> 1.2 s)",
    )
    serve.add_argument("--no-quotas", action="store_true", help="disable the per-operation request quotas")
    serve.add_argument("--state-file", help="keep pipelines in this JSON file across restarts")
    serve.add_argument(
        "--access-key",
        action="append",
        type=_access_key,
        metavar="ID:SECRET",
        help=f"accepted credentials (repeatable); default {DEFAULT_ACCESS_KEY_ID}:{DEFAULT_SECRET_ACCESS_KEY}",
    )
    serve.add_argument(
        "--default-maximum-retries",
        type=int,
        default=DEFAULT_MAXIMUM_RETRIES,
        help="maximumRetries for objects that do not set it",
    )
    serve.add_argument(
        "--precondition-retries",
        choices=("runner", "service"),
        default="runner",
        help="who re-checks a precondition that did not hold: the runner within its attempt"
        " (default; the developer guide's reading: FALSE is final) or the service, with a new"
        " attempt after retryDelay until preconditionTimeout",
    )
    serve.add_argument(
        "--no-pipeline-log-uri-on-attempts",
        action="store_true",
        help="keep Default's pipelineLogUri off polled attempts (runners must read it with DescribeObjects)",
    )
    serve.add_argument("--log-level", default="INFO")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    service = LocalDataPipeline(
        time_scale=args.time_scale,
        quotas=not args.no_quotas,
        state_file=args.state_file,
        access_keys=dict(args.access_key) if args.access_key else None,
        host=args.host,
        port=args.port,
        default_maximum_retries=args.default_maximum_retries,
        precondition_retries=args.precondition_retries,
        pipeline_log_uri_on_attempts=not args.no_pipeline_log_uri_on_attempts,
    )
    service.start()

    def _shutdown(signum: int, frame: FrameType | None) -> None:
        service.request_stop()

    signal.signal(signal.SIGTERM, _shutdown)
    signal.signal(signal.SIGINT, _shutdown)
    # Scripts wait for this line to learn the port (useful with --port 0).
    print(f"dptr-datapipeline listening on {service.endpoint_url}", flush=True)
    service.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
