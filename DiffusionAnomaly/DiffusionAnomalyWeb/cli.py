"""``diffusion-anomaly-web``: serve the detection panel and Slicer's views to web browsers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from DiffusionAnomalyLib.environment import keep_output_readable_on_any_terminal


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusion-anomaly-web", description="Diffusion Anomaly in web browsers: one private session per browser.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--model", type=Path, help="model bundle folder (default: the bundled model)")
    parser.add_argument("--max-sessions", type=int, default=4, help="browser sessions at once, each with its own process")
    parser.add_argument("--sessions-per-client", type=int, default=2, help="sessions at once from one client address")
    parser.add_argument("--idle-seconds", type=float, default=120.0, help="stop a session this long after its page was closed")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    keep_output_readable_on_any_terminal()
    args = build_parser().parse_args(argv)
    problems = [f"{name} must be at least 1" for name, value in (("--max-sessions", args.max_sessions), ("--sessions-per-client", args.sessions_per_client)) if value < 1]
    if not 1 <= args.port <= 65535:
        problems.append("--port must be from 1 to 65535")
    if not args.idle_seconds > 0:
        problems.append("--idle-seconds must be positive")
    try:
        from .sessions import serve
        import trame_slicer  # noqa: F401
    except ImportError as error:
        problems.append(f"the web app needs the [web] extra: pip install -e \".[web]\" ({error})")
    if args.model is not None and not problems:
        from DiffusionAnomalyLib.cards import BundleError, read_card

        try:
            read_card(args.model)
        except BundleError as error:
            problems.append(str(error))
    if problems:
        print(f"diffusion-anomaly-web: error: {problems[0]}", file=sys.stderr)
        return 2
    serve(args.host, args.port, str(args.model) if args.model else None, args.max_sessions, args.idle_seconds, args.sessions_per_client)
    return 0


if __name__ == "__main__":
    sys.exit(main())
