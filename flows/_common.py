"""What every flow shares: the command line (--config, --set, --print-config), logging, banners, the
last JSON line, and the exit codes.

What a flow writes about its errors passes through ``components.redact``: its error lines (``fail``),
its log records (a ``RedactFilter`` on the root logger's handlers) and the traceback of an exception it
does not catch (``redact_excepthook``), all three from ``setup_logging``.

Exit codes of every flow: 0 done (the last stdout line is one JSON object), 1 the work itself failed,
2 bad input (a config, a path, a model that does not exist), 3 refused by a gate (promotion).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from components.redact import RedactFilter, redact, redact_excepthook

REPO = Path(__file__).resolve().parents[1]
BAD_INPUT = 2
REFUSED = 3


def parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the flow docstring's first line and whose epilog is the rest
    (the usage examples), with the options every flow takes."""
    summary, _, examples = doc.strip().partition("\n")
    p = argparse.ArgumentParser(description=summary, epilog=examples.strip("\n") or None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "flows/configs/tiny.yaml"),
                   help="preset YAML (default: flows/configs/tiny.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one config value, typed by its field; repeatable")
    p.add_argument("--print-config", action="store_true",
                   help="print every config key with its value under this preset and overrides, its type and "
                        "its documentation, then exit")
    return p


def load(args):
    """The validated config of ``args`` (exit 2 with one line if it is not), after ``--print-config``.

    The tiny model is built offline, so its runs never reach for the Hugging Face hub
    (``HF_HUB_OFFLINE=1``, set before huggingface_hub is imported); any other model source leaves the
    user's setting alone, so the Terminus preset reaches the hub when the machine can.
    """
    # after parsing: --help does not load the config schema (pydantic)
    from components.config import ConfigError, load_config, reference_text

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        fail(str(err))
    if getattr(args, "print_config", False):
        print(reference_text(cfg))
        raise SystemExit(0)
    if cfg.model.source in ("tiny", "sdxl-random"):  # built offline: nothing to look up on the hub
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # transformers warns at import that torchvision is missing (its image processors fall back to PIL,
    # which is what the pipelines use): noise in every process of every flow. TRANSFORMERS_VERBOSITY=info
    # brings its messages back.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not sys.stderr.isatty():  # redrawn progress bars are escape codes and half lines in a log or a pipe
        os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm's own default, read by every bar (diffusers, hub, MLflow)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return cfg


def setup_logging() -> None:
    """INFO logging to stderr, every record redacted on its way out; uncaught exceptions' tracebacks too."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactFilter) for f in handler.filters):
            handler.addFilter(RedactFilter())
    sys.excepthook = redact_excepthook
    for noisy in ("urllib3", "botocore", "alembic", "mlflow.store.db"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def banner(text: str) -> None:
    print(f"\n==== {text} ====", file=sys.stderr, flush=True)


def emit(result: dict) -> None:
    """The last line on stdout: one JSON object for scripts."""
    print(json.dumps(result), flush=True)


def fail(message: str, code: int = BAD_INPUT):
    """One line on stderr, then exit with ``code``."""
    line = " ".join(redact(str(message)).split())
    print(f"error: {line}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def run_flow(script: str, *args: str, env: dict[str, str] | None = None) -> dict:
    """Run another flow as its own process (as a user would) and return its last-line JSON."""
    cmd = [sys.executable, str(REPO / "flows" / script), *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        fail(f"{script} exited with {proc.returncode}", code=proc.returncode)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return json.loads(lines[-1])
