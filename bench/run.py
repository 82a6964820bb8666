"""The benchmark suite: EnergonAI's three experiments, our generation benchmarks (the server, and one stream per
precision), the quality of each precision, each against transformers measured side by side, and encoders per
precision against our float32 (with ONNX Runtime and CTranslate2 where installed), with one JSON and PNG plots
per run.

    .venv/bin/python -P bench/run.py                 # full mode (about 20 minutes on an idle 2-core machine)
    .venv/bin/python -P bench/run.py --quick         # tiny sizes, under 3 minutes: a smoke run
    .venv/bin/python -P bench/run.py --gpu           # CUDA, fp16 (one card: tp > 1 is skipped)
    .venv/bin/python -P bench/run.py --only runtime tp_scaling
    .venv/bin/python -P bench/run.py --readme        # also rewrite README.md's results table from this run
    .venv/bin/python -P bench/run.py --only decode --readme   # re-run one; the table keeps the published others

Each experiment is its own script (`bench/<name>.py`, runnable alone) and runs in its own process, so that
thread settings, memory peaks and worker processes never leak from one to the next. The suite writes
`bench/results/<mode>/<name>.json` per experiment, `suite.json` (all of them, plus the machine), and
`<name>.png` plots shaped like EnergonAI's figures (bench/plots.py). A failed experiment (its sanity check
or a crash) is recorded with its exit status and the suite exits non-zero after running the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # run with -P: the bench folder is not on sys.path
from common import machine_info  # noqa: E402
from plots import make_plots  # noqa: E402
from report import update_readme  # noqa: E402

# experiment -> (script, extra arguments in full mode, in quick mode)
EXPERIMENTS: dict[str, tuple[str, list[str], list[str]]] = {
    "runtime": ("runtime.py", [], []),
    "dynamic_batching": ("dynamic_batching.py", [], []),
    "tp_scaling": ("tp_scaling.py", [], []),
    # d: the server at 1, 8 and 64 clients against transformers' static batch of 64.
    "generation": ("serve_vs_hf.py", [], ["--repeats", "1", "--warmup", "0"]),
    # e, f: one stream and small batches per precision (float32 ... int4), and what each costs in quality.
    "decode": ("generate_vs_hf.py", [], ["--repeats", "1", "--warmup", "0"]),
    "quality": ("quality.py", [], []),
    # g: encoders per precision on MiniLM: embedding fidelity and speed against float32, with ONNX Runtime and
    # CTranslate2 where the peers extra is installed.
    "embeddings": ("embedding_quality.py", ["--peers-if-installed"], ["--repeats", "1"]),
}


def merged_with_published(suite: dict, published_path: Path) -> dict:
    """A partial run (--only) published with --readme: the published suite with this run's experiments in place of
    its own, each marked `rerun` with this run's start, so the README's table stays whole and says which tables
    came later."""
    if not published_path.is_file():
        return suite
    published = json.loads(published_path.read_text())
    experiments = {}
    for name in EXPERIMENTS:
        if name in suite["experiments"]:
            experiments[name] = {**suite["experiments"][name], "rerun": suite["started"]}
        elif name in published["experiments"]:
            experiments[name] = published["experiments"][name]
    return {**published, "experiments": experiments}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run (under 3 minutes)")
    parser.add_argument("--gpu", action="store_true", help="CUDA, fp16")
    parser.add_argument("--only", nargs="+", choices=list(EXPERIMENTS), default=None, help="a subset of experiments")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (all cores)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/<mode>)")
    parser.add_argument("--readme", action="store_true", help="rewrite README.md's results table from this run")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per experiment (default 3600)")
    args = parser.parse_args(argv)
    mode = "gpu" if args.gpu else "cpu"
    mode += "-quick" if args.quick else ""
    out = args.out or BENCH / "results" / mode
    out.mkdir(parents=True, exist_ok=True)
    suite = {"benchmark": "suite", "mode": mode, "machine": machine_info(args.threads),
             "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "experiments": {}}
    if args.gpu:
        import torch

        suite["machine"]["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    failed = []
    for name in args.only or EXPERIMENTS:
        script, full_args, quick_args = EXPERIMENTS[name]
        result_path = out / f"{name}.json"
        command = [sys.executable, "-P", str(BENCH / script), "--threads", str(args.threads), "--out",
                   str(result_path), *(["--quick", *quick_args] if args.quick else full_args),
                   *(["--gpu"] if args.gpu else [])]
        print(f"== {name}: {' '.join(command[2:])}", flush=True)
        start = time.perf_counter()
        try:
            code = subprocess.run(command, timeout=args.timeout or 3600).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        elapsed = time.perf_counter() - start
        entry = {"script": script, "command": command[2:], "exit": code, "elapsed_s": elapsed}
        if result_path.is_file():
            entry["result"] = json.loads(result_path.read_text())
        if code != 0 or "result" not in entry:
            failed.append(name)
        suite["experiments"][name] = entry
        print(f"== {name}: exit {code} in {elapsed:.0f} s", flush=True)
    suite["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    (out / "suite.json").write_text(json.dumps(suite, indent=2, default=str) + "\n")
    if args.readme and args.only:
        suite = merged_with_published(suite, BENCH / "published" / mode / "suite.json")
    plots = make_plots(suite, out)
    print(f"-> {out / 'suite.json'}" + "".join(f"\n-> {p}" for p in plots))
    if args.readme:
        readme = BENCH.parent / "README.md"
        update_readme(suite, readme, plots)
        print(f"-> {readme} (results table)")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
