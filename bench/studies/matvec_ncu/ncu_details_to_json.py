"""ncu's details page (--set full, as ncu_matvec.py's launches gave it) to JSON: for each kernel, in launch order, the
metrics that say why a product runs below the card's bandwidth.
python bench/studies/matvec_ncu/ncu_details_to_json.py NCU_TEXT OUT.json"""
import json
import re
import sys

METRICS = ["Duration", "DRAM Throughput", "Memory Throughput", "Achieved Occupancy", "Theoretical Occupancy",
           "Registers Per Thread", "Block Size", "Grid Size", "Dynamic Shared Memory Per Block",
           "Warp Cycles Per Issued Instruction", "Issue Slots Busy", "Issued Warp Per Scheduler",
           "Eligible Warps Per Scheduler", "Active Warps Per Scheduler", "Executed Instructions", "L2 Hit Rate",
           "Block Limit Registers", "Block Limit Shared Mem"]
kernels = []
for line in open(sys.argv[1]):
    header = re.match(r"^  (custom_kernel_\w+)\(", line)
    if header:
        kernels.append({"kernel": header.group(1), "metrics": {}})
        continue
    if not kernels:
        continue
    for name in METRICS:
        found = re.match(rf"^    {re.escape(name)}\s+(\S.*?)\s+([\d,.]+)\s*$", line) or \
            re.match(rf"^    {re.escape(name)}\s+([\d,.]+)\s*$", line)
        if found and name not in kernels[-1]["metrics"]:
            unit, value = (found.group(1), found.group(2)) if found.lastindex == 2 else ("", found.group(1))
            kernels[-1]["metrics"][name] = {"value": float(value.replace(",", "")), "unit": unit}
json.dump(kernels, open(sys.argv[2], "w"), indent=1)
for k in kernels:
    m = k["metrics"]
    print(f"{k['kernel'][:70]:70s} {m['Duration']['value']:7.2f} us  DRAM {m['DRAM Throughput']['value']:5.1f}%  "
          f"occupancy {m['Achieved Occupancy']['value']:5.1f}% of {m['Theoretical Occupancy']['value']:.0f}%  "
          f"regs {m['Registers Per Thread']['value']:.0f}")
