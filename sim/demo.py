"""``ctpos demo``: one complete simulated exam, headless, with its report (see sim/exam.py).

``--simulated-technician`` is a simulation-only switch: ctpos plays the
technician (approves the plan as shown, confirms the room is clear). Without it
the exam stops at the approval step and moves nothing. ``make demo`` passes it.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def _main(args: argparse.Namespace) -> int:
    from sim.exam import ExamConfig, run_exam

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)  # a report is one run's; never mix two
    s = run_exam(ExamConfig(out=out, seed=args.seed, protocol=args.protocol,
                            simulated_technician=args.simulated_technician))
    pv = s["plan_vs_truth"]
    print(f"exam seed {s['seed']}, {s['protocol']}: {s['outcome']}")
    print(f"  patient {s['truth']['patient_position']} {s['truth']['pose']}, BMI {s['truth']['bmi']}; found "
          f"{'correct' if pv['position_correct'] else 'WRONG'} position")
    print(f"  table height error {pv['table_height_error_mm']:+.1f} mm; overscan cranial "
          f"{pv['overscan_cranial_mm']:+.1f} mm, caudal {pv['overscan_caudal_mm']:+.1f} mm")
    if "iso_error_mm" in s:
        e = s["iso_error_mm"]
        print(f"  ISO-centre error before {e['before']:+.1f} mm, after {e['after']:+.1f} mm"
              + (f" (of which {e['bore_compromise']:+.1f} mm set by the plan to keep clear of the bore)"
                 if e["bore_compromise"] else ""))
    print(f"  total {sum(v for k, v in s['stages_s'].items() if k != 'total'):.1f} s")
    print(f"report: {(out / 'report.md').resolve()}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run one complete simulated exam, headless, and write its report")
    p.add_argument("--out", default="demo-report", help="report folder (replaced if it exists)")
    p.add_argument("--seed", type=int, default=7, help="chooses the patient, the camera mount and the noise")
    p.add_argument("--protocol", default="chest", help="chest, abdomen, chest_abdomen_pelvis, head, whole_body, ...")
    p.add_argument("--simulated-technician", action="store_true",
                   help="SIMULATION ONLY: approve the plan and confirm the room clear without a person")
    p.set_defaults(func=_main)
