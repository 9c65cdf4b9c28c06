"""What every flow shares: the command line (--config, --set), logging, banners, the last JSON line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python flows/x.py` from a Ray job's working dir, without an install
    sys.path.insert(0, str(REPO))


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=str(REPO / "flows/configs/tiny.yaml"), help="preset YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one config value (YAML-typed); repeatable")
    return p


def load(args):
    from components.config import ConfigError, load_config

    try:
        return load_config(args.config, args.overrides)
    except ConfigError as err:
        fail(str(err))


def setup_logging() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("urllib3", "botocore", "alembic", "mlflow.store.db"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def banner(text: str) -> None:
    print(f"\n==== {text} ====", file=sys.stderr, flush=True)


def emit(result: dict) -> None:
    """The last line on stdout: one JSON object for scripts."""
    print(json.dumps(result), flush=True)


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def run_flow(script: str, *args: str) -> dict:
    """Run another flow as its own process (as a user would) and return its last-line JSON."""
    import subprocess

    cmd = [sys.executable, str(REPO / "flows" / script), *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
    if proc.returncode != 0:
        fail(f"{script} exited with {proc.returncode}", code=proc.returncode)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return json.loads(lines[-1])
