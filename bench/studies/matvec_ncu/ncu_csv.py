"""The kernels of ncu's raw CSV page (--csv --page raw --metrics gpu__time_duration.sum), in launch order."""
import csv


def launches(path: str) -> tuple:
    """(the duration's unit, [(kernel name without its parameter list, duration)])."""
    rows = list(csv.reader(open(path)))
    start = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
    head = rows[start]
    name_at, time_at = head.index("Kernel Name"), head.index("gpu__time_duration.sum")
    unit = rows[start + 1][time_at]  # the row after the header names the units
    return unit, [(r[name_at].split("(")[0], float(r[time_at].replace(",", ""))) for r in rows[start + 2:]
                  if len(r) == len(head)]
