"""Exact peak RSS of each decoder layer of a `lowbit quantize` run.

The kernel's high-water mark (VmHWM) is read when a layer is handed to the writer and then
reset through /proc/self/clear_refs (Linux), so each line is that layer's own peak, not the
run's so far: whether the peak grows with depth shows in a few layers instead of a whole model.

    python bench/layer_peaks.py MODEL OUT --scheme W4A16 --samples 16 --seq-len 128 --overwrite

Everything after the script name is passed to `lowbit quantize`.
"""

from __future__ import annotations

import sys

KB_PER_GIB = 2**20  # /proc/self/status reports kB


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / KB_PER_GIB
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # 5: reset the peak RSS to the current RSS


def main() -> None:
    from lowbit import cli
    from lowbit.export import CheckpointWriter

    end_layer = CheckpointWriter.end_layer

    def measured(self, index, *args, **kwargs):
        print(f"layer {index}: peak {_status('VmHWM'):.2f} GiB, resident {_status('VmRSS'):.2f} GiB",
              flush=True)
        result = end_layer(self, index, *args, **kwargs)
        _reset_peak()
        return result

    CheckpointWriter.end_layer = measured
    _reset_peak()  # the imports' and the dataset's peak are not a layer's
    sys.exit(cli.main(["quantize", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
