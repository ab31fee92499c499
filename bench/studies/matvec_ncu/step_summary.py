"""ncu's raw CSV of step.py's run (one metric, gpu__time_duration.sum, per kernel) summed by kernel name: the device
time of two plain 12B decoding steps, kernels serialized.
python bench/studies/matvec_ncu/step_summary.py STEP.csv [OUT.json]"""
import collections
import csv
import json
import re
import sys

rows = list(csv.reader(open(sys.argv[1])))
start = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
head = rows[start]
ki, ti = head.index("Kernel Name"), head.index("gpu__time_duration.sum")
unit = rows[start + 1][ti]
data = [r for r in rows[start + 1:] if len(r) == len(head) and r[ti].replace(",", "").replace(".", "").isdigit()]
by = collections.defaultdict(lambda: [0, 0.0])
for r in data:
    name = re.sub(r"<.*", "", r[ki].split("(")[0])
    by[name][0] += 1
    by[name][1] += float(r[ti].replace(",", ""))
total = sum(t for _, t in by.values())
print(f"kernels {len(data)}, total {total:.1f} {unit} (two steps)")
groups = sorted(by.items(), key=lambda kv: -kv[1][1])
for name, (n, t) in groups:
    print(f"{t:10.1f} {unit} {100 * t / total:5.1f}%  n={n:4d}  {name[:90]}")
if len(sys.argv) > 2:
    json.dump({"unit": unit, "steps": 2, "kernels": len(data), "total": total,
               "by_kernel": [{"kernel": name, "launches": n, "total": t, "share": t / total}
                             for name, (n, t) in groups]}, open(sys.argv[2], "w"), indent=1)
