"""CPU benchmarks: every figure next to its target and anchor, as a table and JSON.

examples:
  python flows/bench.py                                 # what `make bench` runs
  python flows/bench.py --only training,caching
  python flows/bench.py --only scale --scale-steps 2000,8000

Sections: curation, training, input, caching, serving, multiplex, zt_repro (all by default), and scale (only when
named: the epoch plan and MLflow logging at the Terminus run's size, on the Terminus preset whatever --config says;
bench/scale.py writes it to bench/results/scale_<hardware>_<yyyy-mm-dd>.json). The table goes to stdout,
the full report to bench/results/<theme>_<hardware>_<yyyy-mm-dd>.json with its rendered .md (a run of every section
also regenerates docs/benchmarks.md's results table), and the last stdout line is a JSON summary. Every process
runs with glibc's malloc thresholds pinned (``bench.process.PINNED_MALLOC``; the flow restarts itself with them). Exit
status 0 even when a target is missed (a miss is a measurement, reported as such); 1 when a section failed to run.
"""

from __future__ import annotations

import os
import sys

from flows._common import banner, emit, fail, load, parser, setup_logging


def main() -> None:
    # here, not at the top: as a script, `bench` names this file until the re-run below
    from bench.process import pin_malloc

    pin_malloc()
    from bench.report import SECTIONS  # after pin_malloc, which may restart the process

    known = (*SECTIONS, "scale")  # scale runs only when named
    p = parser(__doc__)
    p.add_argument("--only", default=",".join(SECTIONS), metavar="SECTION[,SECTION]",
                   help=f"comma-separated sections to run, in this order (default: all of {', '.join(SECTIONS)}; "
                        "also: scale)")
    p.add_argument("--scale-steps", default=None, metavar="N[,N]",
                   help="scale: steps logged to MLflow, a run per size (default: bench.scale.STEPS); sizes below "
                        "the Terminus run's 128k are extrapolated to it")
    args = p.parse_args()
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(known))
    if unknown or not sections:
        fail(f"--only: unknown section(s) {unknown or '(none given)'}; choose from {', '.join(known)}")
    try:
        scale_steps = tuple(int(n) for n in args.scale_steps.split(",")) if args.scale_steps else None
    except ValueError:
        fail(f"--scale-steps: give whole numbers separated by commas, got {args.scale_steps!r}")
    cfg = load(args)
    setup_logging()

    from bench.report import run_benchmarks, table, write_report

    banner(f"bench: {', '.join(sections)} ({cfg.name})")
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    reports, failed, missed = [], [], []
    core = [s for s in sections if s != "scale"]
    if core:
        report = run_benchmarks(cfg, core, log=log)
        reports.append((report, write_report(cfg, report)))
    if "scale" in sections:
        from bench.scale import run_scale, scale_config

        reports.append(run_scale(scale_config(), log=log, **({"steps": scale_steps} if scale_steps else {})))
    for report, path in reports:
        print(table(report), flush=True)
        print(f"\nreport: {path}", flush=True)
        failed += [name for name, data in report["sections"].items() if "error" in data]
        missed += report["missed"]
    emit({"report": [str(path) for _, path in reports], "missed": missed, "failed": failed,
          "total_s": round(sum(r["meta"]["total_s"] for r, _ in reports), 1)})
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    if not __package__:
        # `python flows/bench.py` puts flows/ first on sys.path, where the name `bench` is this file, not the
        # bench package: run as the module flows.bench instead (sys.path[0] is then the working directory),
        # with the interpreter's own options.
        options = sys.orig_argv[1:len(sys.orig_argv) - len(sys.argv)]
        os.execv(sys.executable, [sys.executable, *options, "-m", "flows.bench", *sys.argv[1:]])
    main()
