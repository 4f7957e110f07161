"""How long the cost analysis takes, end to end, as a user runs it.

  python -m experiments.bench_analysis [--repeats=3 --json_out=bench_analysis.json]

Times, as fresh processes (imports, tracing, every HLO compile included):
  default   `python -m experiments.peak_analysis` on its built-in default
            (yi-34b, 5 contexts x 4 device counts: 20 prefill programs, 16
            of them chunked, 8 decode steps with 12 interpolated between
            them, 20 context switches); target <= 20 s on a 2-core machine
  1m_tp8    one yi-34b analysis at 1M context on 8 devices
            (`--contexts=1000000 --num_devices=8`); target <= 5 s
  (the targets of issue 12)
Runs alternate between the two so machine noise hits both; medians reported.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import flags

from experiments import cli

_REPEATS = flags.DEFINE_integer("repeats", 3, "Runs of each command.", lower_bound=1)
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the timings here as JSON.")

RUNS = {
    "default": ([], 20.0),
    "1m_tp8": (["--contexts=1000000", "--num_devices=8"], 5.0),
}
_ONLY = flags.DEFINE_multi_enum("only", list(RUNS), list(RUNS), "Runs to time.")


def time_run(flags_: list[str]) -> float:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "experiments.peak_analysis", *flags_], cwd=root,
                        capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if proc.returncode:
    raise RuntimeError(f"peak_analysis {' '.join(flags_)} failed:\n{proc.stderr[-2000:]}")
  return seconds


def main(argv):
  del argv  # cli.run refuses positional arguments
  cli.check_output_paths(json_out=_JSON_OUT.value)
  runs = {name: RUNS[name] for name in _ONLY.value}
  times = {name: [] for name in runs}
  for r in range(_REPEATS.value):
    for name, (flags_, _) in runs.items():
      times[name].append(time_run(flags_))
      print(f"[{r + 1}/{_REPEATS.value}] {name}: {times[name][-1]:.1f} s", flush=True)
  report = {"cpu_count": os.cpu_count(), "repeats": _REPEATS.value, "runs": {}}
  for name, (flags_, target) in runs.items():
    median = statistics.median(times[name])
    report["runs"][name] = {"flags": flags_, "seconds": times[name], "median_s": median,
                            "target_s": target, "met": median <= target}
    print(f"{name:8s} median {median:6.1f} s  (target <= {target:.0f} s: "
          f"{'met' if median <= target else 'NOT met'})")
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(report, f, indent=1)
    print(f"wrote {_JSON_OUT.value}")


if __name__ == "__main__":
  cli.run(main)
