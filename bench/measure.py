"""Measuring a command from outside: peak RSS as the kernel counts it, and wall time."""

from __future__ import annotations

import subprocess
import sys

_PROBE = ("import resource,subprocess,sys,time;t=time.perf_counter();"
          "r=subprocess.run(sys.argv[1:],stdout=subprocess.DEVNULL,stderr=subprocess.PIPE,text=True);"
          "sys.stderr.write(r.stderr[-2000:]) if r.returncode else None;"
          "print(r.returncode,resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss*1024,"
          "time.perf_counter()-t)")


def peak_rss_of(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in bytes, wall seconds) of `cmd`, run in a fresh probe process.

    ru_maxrss of RUSAGE_CHILDREN is the maximum over every child the probe waited for, so
    each measurement gets a probe of its own.
    """
    done = subprocess.run([sys.executable, "-c", _PROBE, *cmd], capture_output=True, text=True)
    code, rss, wall = done.stdout.split()
    if code != "0":
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}):\n{done.stderr}")
    return float(rss), float(wall)
