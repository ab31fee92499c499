"""Join plans.py's LABEL lines with ncu's raw CSV: median duration per labelled product, GB/s over the fewest bytes.
python bench/studies/matvec_ncu/plans_to_json.py PLANS_STDOUT PLANS.csv OUT.json"""
import json
import re
import statistics
import sys

from ncu_csv import launches

labels = [line.strip().split(" ", 1)[1].split("|") for line in open(sys.argv[1]) if line.startswith("LABEL ")]
unit, data = launches(sys.argv[2])
times = {}
for kernel, duration in data:
    times.setdefault(re.sub(r"^custom_kernel_", "", kernel), []).append(duration)
scale = {"ns": 1e-3, "usecond": 1.0, "us": 1.0, "nsecond": 1e-3}[unit]
SH = {"gate+up gated": (30720, 3840), "down": (3840, 15360), "o sliding": (3840, 4096), "qkv sliding": (8192, 3840),
      "qk full": (8704, 3840), "o full": (3840, 8192), "lm head": (262144, 3840)}
LAUNCHES = 3
out = []
for kname, shape, m, tag, err in labels:
    # plans.py launches each labelled product LAUNCHES times, in order; one and four rows share a kernel name (M is
    # read at run time), so each label takes its kernel's next LAUNCHES launches.
    ts = times.get(kname, [])[:LAUNCHES]
    times[kname] = times.get(kname, [])[LAUNCHES:]
    if len(ts) < LAUNCHES:
        print("missing", kname)
        continue
    us = statistics.median(ts) * scale
    N, K = SH[shape]
    M = int(m[2:])
    by = N * K // 2 + 2 * N * (K // 64) * 2 + M * (K + N) * 2
    out.append({"shape": shape, "M": M, "variant": tag, "us": us, "all_us": [t * scale for t in ts],
                "gbps": by / us / 1e3, "err": err, "kernel": kname})
    print(f"| {shape} | {M} | {tag} | {us:.1f} | {by/us/1e3:.0f} | {100*by/us/1e3/4800:.0f}% | {err} |")
json.dump(out, open(sys.argv[3], "w"), indent=1)
