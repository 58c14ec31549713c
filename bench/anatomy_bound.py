"""What the chest's range could reach on this simulator at best: a planner that knew each patient's skeleton
exactly, and so placed the lungs by the anatomy rule (positioning/anatomy.py) with no error of its own, against
the simulator's truth, which adds each patient's drawn spread (apex 6 mm, base 12 mm sd; docs/anatomy.md).
docs/planning.md, "The targets with a noiseless camera and the drawn anatomy", quotes it.

For each scene: the rule's lung apex and base and the true ones along the table (y_S, mm); the margin-free
overscan at each end (+ = the rule's end beyond the true one); then, over every pair of margins 0-40 mm: the
share of scenes whose lungs are covered within the 5 mm tolerance of issue #5 and the median overscan at each
end. It prints the pair that covers 99 % with the least overscan, and the best coverage whose median
overscans are both 15 mm or less. No capture, no fit: only the simulator's posed bodies.
Run: .venv/bin/python bench/anatomy_bound.py [--n 4000] [--seed0 40000000]
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from pathlib import Path

import numpy as np

from planning import SEED0, margin_trade  # the held-out seeds and the margin search of the plans

log = logging.getLogger("bench.anatomy_bound")


def free_overscan(n: int, seed0: int) -> np.ndarray:
    """(n, 2) margin-free overscan, cranial and caudal, mm: the rule's end beyond the true one."""
    from positioning.bodymodel import load_body_model
    from sim.scene import load_config, sample_scene
    from sim.simulate import posed_patient

    model, cfg = load_body_model(), load_config(None)
    out = np.empty((n, 2))
    for i in range(n):
        p = sample_scene(seed0 + i, cfg, model.data.train["betas"])
        true, rule = (posed_patient(p, model, anatomy_spread=s)[4] for s in (True, False))
        head = np.sign(true["lung_apex"][1] - true["lung_base"][1])  # +1 where the head lies at +y_S
        out[i] = ((rule["lung_apex"][1] - true["lung_apex"][1]) * head,
                  (true["lung_base"][1] - rule["lung_base"][1]) * head)
        if (i + 1) % 500 == 0:
            log.info("%d scenes", i + 1)
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4000, help="scenes from --seed0 on")
    ap.add_argument("--seed0", type=int, default=SEED0)
    ap.add_argument("--out", type=Path, default=Path("bench/out/anatomy_bound.json"))
    a = ap.parse_args()
    free = free_overscan(a.n, a.seed0)
    result = {"machine": f"{platform.machine()}, {platform.system()} {platform.release()}",
              "n": a.n, "seed0": a.seed0,
              "free_overscan_sd_mm": [round(float(x), 1) for x in free.std(0)],
              "free_overscan_median_mm": [round(float(x), 1) for x in np.median(free, 0)],
              **margin_trade(free)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
