"""The demo business service: ``python -m spine.demo --host 127.0.0.1 --port 8400 --db PATH``."""

import argparse
import os
import sys
from pathlib import Path

import uvicorn

from spine.demo.service import DB_ENV, DEFAULT_DB, create_app


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and serve until interrupted; the API key comes from the environment."""
    parser = argparse.ArgumentParser(prog="python -m spine.demo", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8400)
    parser.add_argument(
        "--db",
        type=Path,
        default=Path(os.environ.get(DB_ENV) or DEFAULT_DB),
        help=f"SQLite file (default ${DB_ENV}, then {DEFAULT_DB})",
    )
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    try:
        app = create_app(args.db)
    except ValueError as exc:
        print(f"demo service: {exc}", file=sys.stderr)
        return 2
    # A request hung by chaos must not hold up shutdown for its full 30 s.
    uvicorn.run(
        app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=3
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
