"""What every benchmark prints next to its figures: the machine and the load average."""
from __future__ import annotations

import os
import platform
import sys


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    torch = sys.modules.get("torch")
    versions = f"Python {platform.python_version()}" + (f", torch {torch.__version__}" if torch else "")
    return f"{cpu}, {os.cpu_count()} CPUs, {versions}"


def load_average() -> str:
    return "{:.2f} {:.2f} {:.2f} (1, 5, 15 min)".format(*os.getloadavg())
