"""Run the architecture sweep, one subprocess per model (a crash or a hang is one row's failure), and write the
coverage matrix: ``python -m tests.sweep.report [names…] [--jobs N]`` → ``bench/results/sweep.{json,md}``."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from .harness import ALL, GROUP

CHECKS = ["build", "roles", "lora", "hf_parity", "merge", "ia3", "onnx"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_one(name: str, timeout: float) -> dict:
    code = ("import json, warnings, torch; warnings.filterwarnings('ignore'); torch.set_num_threads(1)\n"
            "import transformers; transformers.logging.set_verbosity_error()\n"
            f"from tests.sweep.harness import run; print('@@' + json.dumps(run({name!r}).__dict__))")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                           cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"name": name, "group": GROUP[name], "checks": {"build": f"FAIL: timeout {timeout:.0f} s"}}
    for line in p.stdout.splitlines():
        if line.startswith("@@"):
            return json.loads(line[2:])
    tail = (p.stderr.strip().splitlines() or ["no output"])[-1][:160]
    return {"name": name, "group": GROUP[name], "checks": {"build": f"FAIL: crashed ({tail})"}}


def _cell(v: str | None) -> str:
    if v is None:
        return "–"
    if v == "ok":
        return "✓"
    if v.startswith("n/a"):
        return "n/a"
    return "✗"


def markdown(rows: list[dict]) -> str:
    lines = ["| model | group | " + " | ".join(CHECKS) + " | roles found |",
             "|---|---|" + "---|" * len(CHECKS) + "---|"]
    notes = []
    for r in rows:
        ch = r.get("checks", {})
        lines.append(f"| {r['name']} | {r['group']} | " + " | ".join(_cell(ch.get(c)) for c in CHECKS)
                     + f" | {r.get('roles', '')} |")
        for c in CHECKS:
            v = ch.get(c)
            if v and v != "ok":
                notes.append(f"- {r['name']} {c}: {v}")
    ok = sum(1 for r in rows if all(r.get("checks", {}).get(c, "") in ("ok",) or
                                    str(r.get("checks", {}).get(c, "")).startswith("n/a") for c in CHECKS))
    return "\n".join(lines) + f"\n\n{ok} of {len(rows)} pass every check.\n\n" + "\n".join(notes) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "sweep"))
    a = ap.parse_args(argv)
    names = a.names or ALL
    with ThreadPoolExecutor(a.jobs) as ex:
        rows = list(ex.map(lambda n: run_one(n, a.timeout), names))
    for r in rows:
        print(r["name"], r.get("checks"), flush=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    with open(a.out + ".md", "w") as f:
        f.write(markdown(rows))


if __name__ == "__main__":
    main()
