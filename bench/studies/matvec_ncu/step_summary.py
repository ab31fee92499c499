"""ncu's raw CSV of step.py's run (one metric, gpu__time_duration.sum, per kernel) summed by kernel name: the device
time of two plain 12B decoding steps, kernels serialized.
python bench/studies/matvec_ncu/step_summary.py STEP.csv [OUT.json]"""
import collections
import json
import re
import sys

from ncu_csv import launches

unit, data = launches(sys.argv[1])
by = collections.defaultdict(lambda: [0, 0.0])
for kernel, duration in data:
    name = re.sub(r"<.*", "", kernel)
    by[name][0] += 1
    by[name][1] += duration
total = sum(t for _, t in by.values())
print(f"kernels {len(data)}, total {total:.1f} {unit} (two steps)")
groups = sorted(by.items(), key=lambda kv: -kv[1][1])
for name, (n, t) in groups:
    print(f"{t:10.1f} {unit} {100 * t / total:5.1f}%  n={n:4d}  {name[:90]}")
if len(sys.argv) > 2:
    json.dump({"unit": unit, "steps": 2, "kernels": len(data), "total": total,
               "by_kernel": [{"kernel": name, "launches": n, "total": t, "share": t / total}
                             for name, (n, t) in groups]}, open(sys.argv[2], "w"), indent=1)
