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


# Runs `python -m MODULE ARGS...` inside the probe's child itself, then appends the child's own
# I/O counters (Linux /proc/self/io) to stderr: write_bytes is what the kernel was asked to
# write to storage (page cache dirtied), wchar what went through write() calls.
_IO_CHILD = ("import runpy,sys;m=sys.argv[1];sys.argv=[m]+sys.argv[2:]\n"
             "try:\n runpy.run_module(m,run_name='__main__',alter_sys=True);c=0\n"
             "except SystemExit as e:\n c=e.code or 0\n"
             "io=dict(l.split(': ') for l in open('/proc/self/io').read().splitlines())\n"
             "sys.stderr.write('\\nIO %s %s\\n'%(io['write_bytes'],io['wchar']));sys.exit(c)")


def run_measured(module_args: list[str]) -> dict:
    """`python -m <module_args>` measured: peak RSS and wall (as peak_rss_of), and the bytes it
    wrote (write_bytes, wchar)."""
    probe = _PROBE.replace("sys.stderr.write(r.stderr[-2000:]) if r.returncode else None;",
                           "sys.stderr.write(r.stderr[-2000:]);")
    done = subprocess.run([sys.executable, "-c", probe, sys.executable, "-c", _IO_CHILD, *module_args],
                          capture_output=True, text=True)
    code, rss, wall = done.stdout.split()
    if code != "0":
        raise RuntimeError(f"{' '.join(module_args)} failed ({code}):\n{done.stderr}")
    write_bytes, wchar = done.stderr.rsplit("IO ", 1)[1].split()
    return dict(rss=float(rss), wall=float(wall), write_bytes=int(write_bytes), wchar=int(wchar))
