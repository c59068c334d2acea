"""The large-screen benchmark's printed table."""

from __future__ import annotations

from typing import Any

from machine import MIB

STAGES = ("ingest", "filter", "fit", "sample")
TARGET_BYTES = 3e9  # "peak RSS <= 3 GB"


def fmt_gb(mib: float | None) -> str:
    return "-" if mib is None else f"{mib * MIB / 1e9:.2f}"


def table_text(report: dict[str, Any]) -> str:
    s = report["screen"]
    lines = [
        f"Screen: {s['n_cells']:,} cells ({s['n_ntc_cells']:,} NTC) x {s['n_genes']:,} genes, "
        f"nnz {s['nnz']:,} (density {s['density']:.3f}, {s['dtype']}), "
        f"npz {s['npz_gb']:.2f} GB on disk ({s['compression']}; "
        f"{s['npz_uncompressed_gb']:.2f} GB uncompressed), written in {s['write_seconds']} s "
        f"(generator peak RSS {fmt_gb(s.get('generator_peak_rss_mb'))} GB)",
        f"Store: {report.get('store_gb', '-')} GB on disk "
        f"(counts [{s['n_genes']} x {s['n_cells']}] float32 = "
        f"{s['n_genes'] * s['n_cells'] * 4 / 1e9:.1f} GB dense)",
        "",
        f"{'stage / step':<24}{'wall s':>9}{'cpu s':>9}{'peak RSS GB':>13}{'ru_maxrss GB':>14}"
        f"{'<= 3 GB':>9}",
    ]
    for stage in STAGES:
        r = report["stages"].get(stage)
        if r is None:
            continue
        if not r.get("ok"):
            lines.append(f"{stage:<24}{'FAILED (rc=' + str(r.get('rc')) + ')':>40}")
            continue
        ok = "PASS" if r["peak_rss_mb"] * MIB <= TARGET_BYTES else "FAIL"
        lines.append(
            f"{stage:<24}{r['wall_s']:>9.1f}{r['cpu_s']:>9.1f}{fmt_gb(r['peak_rss_mb']):>13}"
            f"{fmt_gb(r['ru_maxrss_mb']):>14}{ok:>9}"
        )
        for step in r["steps"]:
            lines.append(
                f"  {step['step']:<22}{step['wall_s']:>9.1f}{step['cpu_s']:>9.1f}"
                f"{fmt_gb(step['rss_peak_mb']):>13}{fmt_gb(step['ru_maxrss_after_mb']):>14}"
            )
        lines.append(
            f"  (process {r['process_wall_s']} s incl. imports {r['import_s']} s; "
            f"RSS after imports {fmt_gb(r['rss_after_imports_mb'])} GB)"
        )
    lines.append(
        f"(peak RSS: stage rows = max of the psutil samples (every "
        f"{report['args']['sample_interval'] * 1000:.0f} ms), VmHWM and ru_maxrss of the "
        "stage's process; step rows = sampled peak within the step, ru_maxrss after it)"
    )
    fit = report["stages"].get("fit", {}).get("fit")
    if fit:
        lines.append(
            f"Fit: {fit['n_fit_features']:,} fit features, guide {fit['guide']}, cells "
            f"{'streamed in ' + str(fit['cell_batches']) + ' batches' if fit['cells_streamed'] else 'in memory'}"
            f", {fit['niters_run']} SVI steps ({fit['stop_reason']}): {fit['ms_per_step']} ms/step"
            f" with the batch read ahead; memory given: {report['args']['memory_gb']} GB"
        )
    sample = report["stages"].get("sample", {}).get("sample")
    if sample:
        lines.append(f"Sampling: {sample}")
    if "flags" in report["stages"].get("filter", {}):
        lines.append(f"Filter flags: {report['stages']['filter']['flags']}")
    m = report["machine"]
    lines.append(
        f"Target peak RSS <= 3 GB (3e9 bytes) in every stage: "
        f"{'PASS' if report.get('target_pass') else 'FAIL'}"
    )
    lines.append(
        f"Machine: {m['cpu_model']}, {m['cpu_count']} CPUs (affinity {m['cpu_affinity']}), "
        f"RAM {m['ram_total_gb']} GB ({m['ram_available_gb_at_start']} GB available at start); "
        f"load average start {m['load_average_at_start']}, end {report.get('load_average_end')}"
    )
    lines.append(f"Total benchmark time: {report.get('total_seconds')} s")
    return "\n".join(lines)
