"""How an epoch's update steps and an evaluation scale with BLAS threads: the measurement
behind `mlplab.engine.threads`' rule.

    python bench/bench_threads.py [--repeats 5] [--threads 1,2]

For the reports' nets (3072-50-10, 3072-50-50-10 BN) and the toolbox net (best_mlp's
3072-1024-1024-10 BN, flip/translate, Nesterov), it times one epoch of update steps
(45,000 synthetic rows, batch 100) and one evaluation of all 50,000 rows under each BLAS
thread limit, every limit once per round (interleaved: a slow spell of the machine
falls on a round, not on one limit), and prints medians and each limit's median ratio
to one thread. A limit pays for the update steps when its ratio is clearly below 1:
`threads.MACS_PER_UPDATE_THREAD` is set from where that starts (a step's
multiply-adds per thread; `threads.step_macs`). Time it alone on the machine.
"""

from __future__ import annotations

import argparse
from statistics import median

from bench_epoch import NETWORKS, TOOLBOX_HIDDEN, mlplab_epoch, synthetic_dataset
from threadpoolctl import threadpool_limits

from mlplab.engine import threads

CASES = {**NETWORKS, "toolbox net": (TOOLBOX_HIDDEN, True)}
CASES.pop("9-layer BN")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", default=f"1,{threads.available_cores()}",
                        help="BLAS thread limits to compare, e.g. 1,2,4")
    args = parser.parse_args()
    limits = sorted({int(n) for n in args.threads.split(",")})
    ds = synthetic_dataset()
    print(f"median of {args.repeats}; ratio: the limit's seconds / one thread's, per round")
    print("| network | step multiply-adds | " + " | ".join(
        f"{n} thread(s): epoch s (ratio), eval s (ratio)" for n in limits) + " |")
    print("|---|---|" + "---|" * len(limits))
    for name, (hidden, bn) in CASES.items():
        toolbox = name == "toolbox net"
        times = {n: [] for n in limits}
        for r in range(args.repeats + 1):  # the first round warms up
            for n in limits[r % len(limits):] + limits[:r % len(limits)]:
                with threadpool_limits(n, user_api="blas"):
                    result = mlplab_epoch(ds, hidden, bn, r, toolbox=toolbox)
                if r:
                    times[n].append(result)
        cells = []
        for n in limits:
            epoch = [e for e, _ in times[n]]
            ev = [v for _, v in times[n]]
            ratio = [e / one for e, (one, _) in zip(epoch, times[limits[0]], strict=True)]
            eratio = [v / one for v, (_, one) in zip(ev, times[limits[0]], strict=True)]
            cells.append(f"{median(epoch):.3f} ({median(ratio):.2f}), "
                         f"{median(ev):.3f} ({median(eratio):.2f})")
        macs = threads.step_macs([3072, *hidden, 10], 100)
        print(f"| {name} | {macs / 1e6:.0f}M | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
