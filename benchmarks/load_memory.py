"""Load time and host memory of `Model.load`, one fresh process per (model, weights mode).

    python benchmarks/load_memory.py [--models smollm2-135m,gemma3-270m] [--weights quantized,dequantized] [--device cpu]

Each load runs in its own Python process (peak RSS is a per-process high-water mark): torch, tokenizers and
the workbench are imported first, then the model is loaded; the table shows the peak RSS growth during the
load next to the file's size, and the bytes the weights hold on the device. On a CPU the weights themselves
are host memory; on CUDA the host holds the memory-mapped file and little else.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, os, resource, sys, time
import torch, tokenizers
from workbench.model import Model
from workbench.models import resolve
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
name, weights, device = sys.argv[1:4]
before = rss()
t0 = time.perf_counter()
m = Model.load(name, device=device, weights=weights)
seconds = time.perf_counter() - t0
print(json.dumps(dict(model=name, weights=m.info.weights, device=str(m.device), seconds=seconds,
                      file_mib=os.path.getsize(resolve(name)) / 2**20, weights_mib=m.info.weight_bytes / 2**20,
                      growth_mib=rss() - before)))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--weights", default="quantized,dequantized")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        for weights in args.weights.split(","):
            out = subprocess.run([sys.executable, "-c", CHILD, name.strip(), weights.strip(), args.device],
                                 capture_output=True, text=True, check=False)
            if out.returncode != 0:
                print(f"{name} {weights}: failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| model | weights | device | load s | file MiB | weights MiB | peak RSS growth MiB | growth / file |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['weights']} | {r['device']} | {r['seconds']:.2f} | {r['file_mib']:.0f} | "
              f"{r['weights_mib']:.0f} | {r['growth_mib']:.0f} | {r['growth_mib'] / r['file_mib']:.2f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
