"""What the run's page costs: its wall time, peak memory and size on a finished store.

    python benchmarks/bench_run_page.py --store STORE [--repeat 3]
        [--out benchmarks/results/run_page.json]

A real-shaped store (30,000 cells x 5,000 genes, 3 cell lines, 1,000 draws, 721 genes
flagged `baseline_no_counts`) comes from
`python benchmarks/bench_real_screens.py --rows 3 --skip-peer --workdir W` (the store is
under W). In this process, with one torch thread: `write_run_page` for every finished
modality, `--repeat` times (the first includes matplotlib's import), each under
`tasks.stage_meter.StageMeter`; then the page's size, its figures, and the run's own
step times from the store, for scale.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tasks.results.run_page import write_run_page  # noqa: E402
from tasks.stage_meter import StageMeter  # noqa: E402
from tasks.store import CIS_KEY, is_complete, open_root, results_key  # noqa: E402

MIB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "run_page.json")
    args = parser.parse_args()
    import psutil
    import torch

    torch.set_num_threads(1)
    root = open_root(str(args.store))
    names = sorted(
        name
        for name in root["technical"].group_keys()
        if results_key(name) != CIS_KEY and is_complete(root, results_key(name))
    )
    shapes = {name: list(root[results_key(name)]["alpha_y_add"].shape) for name in names}
    before = psutil.Process().memory_info().rss
    runs = []
    for _ in range(args.repeat):
        with StageMeter() as meter:
            page = write_run_page(root, args.store, names)
        runs.append(meter.use)
    text = page.read_text(encoding="utf-8")
    steps = root.attrs.get("steps", {})
    report = {
        "store": str(args.store),
        "modalities": shapes,  # [draws, groups, features(, categories)]
        "page_seconds": [round(run.seconds, 2) for run in runs],
        "peak_rss_mib": [round(run.peak_rss_bytes / MIB) for run in runs],
        "rss_before_mib": round(before / MIB),
        "page_mib": round(len(text.encode()) / MIB, 2),
        "figures": len(re.findall(r"<img ", text)),
        "run_steps_seconds": {
            name: {k: v.get("seconds") for k, v in steps.get(name, {}).items()} for name in names
        },
        "when": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(json.dumps(report, indent=2))
    first, rest = runs[0].seconds, [run.seconds for run in runs[1:]]
    fit = sum(float(report["run_steps_seconds"][n].get("fit") or 0) for n in names)
    print(
        f"page: {first:.1f} s first (matplotlib imported), "
        f"{min(rest) if rest else first:.1f} s after; peak RSS "
        f"{max(report['peak_rss_mib'])} MiB ({report['rss_before_mib']} MiB before); "
        f"{report['page_mib']} MiB, {report['figures']} figures; "
        f"page / fit stage {min(rest or [first]) / fit:.2f}x" if fit else ""
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
