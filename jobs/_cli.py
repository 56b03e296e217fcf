"""The command line every job shares: ``python -m jobs.<job> [--config FILE] [key=value ...]``."""

from __future__ import annotations

import argparse


def job_parser(job: str, doc: str | None, default_config: str | None = None) -> argparse.ArgumentParser:
    """A parser with ``--config`` and the dotted ``key=value`` overrides; jobs add their own flags to it."""
    summary = (doc or "").strip().splitlines()[0] if doc else None
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{job}", description=summary)
    help_config = f"YAML config (default: {default_config})" if default_config else "YAML config file (defaults apply without one)"
    parser.add_argument("--config", default=default_config, help=help_config)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. loss.lam=0.3")
    return parser
