"""What a kill -9 costs: quantize once uninterrupted, once killed after K layers and resumed,
compare every output byte, and time both.

    python bench/resume.py [--model .cache/smollm2-135m-bf16] [--scheme W4A16] [--kill-after 20]

The kill is a real SIGKILL sent when the work directory's manifest records K finished layers;
the rerun is the same command. Prints wall times and the ratio (resumed total / uninterrupted).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]


def command(args, out: Path) -> list[str]:
    return [sys.executable, "-m", "lowbit", "quantize", str(args.model), str(out), "--scheme",
            args.scheme, "--samples", str(args.samples), "--seq-len", str(args.seq_len)]


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr}")
    return time.perf_counter() - start, proc.stderr


def killed(cmd: list[str], manifest: Path, layers: int) -> float:
    """Run cmd and SIGKILL it once `manifest` records `layers` finished layers."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        try:
            if json.loads(manifest.read_text())["layers_done"] >= layers:
                os.kill(proc.pid, signal.SIGKILL)
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        sys.exit(f"the run ended ({proc.returncode}) before {layers} layers were recorded")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / ".cache" / "smollm2-135m-bf16")
    p.add_argument("--scheme", default="W4A16")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--kill-after", type=int, default=20, help="finished layers before the kill")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="lowbit-resume-") as tmp:
        ref, out = Path(tmp) / "ref", Path(tmp) / "out"
        t_ref, _ = timed(command(args, ref))
        t_kill = killed(command(args, out), out.with_name(f".{out.name}.partial") / "lowbit-partial.json",
                        args.kill_after)
        t_resume, stderr = timed(command(args, out))
        said = [line for line in stderr.splitlines() if "resuming" in line]
        names = sorted(p.name for p in ref.iterdir())
        same = names == sorted(p.name for p in out.iterdir()) and all(
            (ref / n).read_bytes() == (out / n).read_bytes() for n in names)
    print(f"{args.scheme} on {args.model.name}, {args.samples} x {args.seq_len} tokens, killed "
          f"after {args.kill_after} layers")
    print(f"  rerun said:          {said[0] if said else '(nothing)'}")
    print(f"  uninterrupted run:   {t_ref:7.1f} s")
    print(f"  killed run:          {t_kill:7.1f} s")
    print(f"  resumed run:         {t_resume:7.1f} s ({t_resume / t_ref:.2f} of uninterrupted)")
    print(f"  killed + resumed:    {t_kill + t_resume:7.1f} s ({(t_kill + t_resume) / t_ref:.2f})")
    print(f"  byte-identical:      {same} ({len(names)} files)")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
