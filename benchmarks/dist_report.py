"""The per-distribution benchmark's targets and printed table."""

from __future__ import annotations

from typing import Any

TARGETS = {
    "negbinom": {"wall_s": 600, "speedup": 5},
    "binomial": {"wall_s": 120, "speedup": 100},
    "multinomial": {"wall_s": 120, "speedup": 100},
    "normal": {"wall_s": 120, "speedup": 100},
    "studentt": {"wall_s": 900, "speedup": 5},
}
TARGET_CORR = 0.99
TARGET_COVERAGE = (0.85, 0.95)


def check_targets(name: str, row: dict[str, Any]) -> list[str]:
    """The issue's targets that this distribution missed (or could not be checked)."""
    target, missed = TARGETS[name], []
    ratio = row.get("speedup")
    if ratio is not None and ratio < target["speedup"]:
        missed.append(f"speedup {ratio:.1f}x < {target['speedup']}x")
    flow = row.get("flow") or {}
    if flow.get("status") == "timeout":
        missed.append(f"default run timed out (> {flow['process_wall_seconds']:.0f} s)")
    elif flow.get("status") == "ok" and flow["flow_call_seconds"] > target["wall_s"]:
        missed.append(f"wall {flow['flow_call_seconds']:.0f} s > {target['wall_s']} s")
    rec = row.get("recovery") or {}
    if rec.get("corr") is not None and rec["corr"] < TARGET_CORR:
        missed.append(f"corr {rec['corr']:.5f} < {TARGET_CORR}")
    cov = rec.get("coverage90")
    if cov is not None and not TARGET_COVERAGE[0] <= cov <= TARGET_COVERAGE[1]:
        missed.append(f"cover90 {cov:.3f} outside {TARGET_COVERAGE[0]}-{TARGET_COVERAGE[1]}")
    return missed


def fmt(value: Any, spec: str = ".1f") -> str:
    """A table cell; '-' for missing."""
    if value is None:
        return "-"
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def short_stop(reason: str | None) -> str:
    """'converged@1250' / 'cap' / '-' from the store's stop reason."""
    if not reason:
        return "-"
    if reason.startswith("converged"):
        return "plateau"
    if reason.startswith("reached niters"):
        return "cap"
    return reason.split(":")[0][:12]


def steps_cell(r: dict | None) -> str:
    """ms per step, or the worker's status."""
    if not r:
        return "-"
    if r.get("status") != "ok":
        return r.get("status", "-").split(" ")[0]
    return fmt(r["ms_per_step_median"])


def print_report(report: dict[str, Any]) -> None:
    """Machine block, the main table, target misses and stop reasons."""
    m = report["machine"]
    print("\n== machine " + "=" * 70)
    print(
        f"  cpu: {m['cpu_model']}, {m['cpu_count']} cpus (affinity {m['cpu_affinity']}), "
        f"RAM {m['ram_total_gb']} GB; torch {m['torch_version']}, pyro {m['pyro_version']}, "
        f"torch default threads {m['torch_default_threads']}, cuda {m['cuda_available']}"
    )
    start, end = m["git_at_start"], report.get("git_at_end") or {}
    print(
        f"  load average before {m['load_average_at_start']}  after "
        f"{report.get('load_average_at_end')}"
    )
    print(
        f"  git HEAD at start {str(start.get('commit'))[:10]} (sources modified: "
        f"{start.get('sources_modified')}), at end {str(end.get('commit'))[:10]} "
        f"(sources modified: {end.get('sources_modified')})"
    )
    a = report["args"]
    print(
        f"  screen: {a['cells']} NTC cells x {a['features']} features, {a['groups']} groups "
        f"(multinomial K={a['categories']}); steps: median of {a['steps']} after "
        f"{a['warmup']} warm-up; flow: fit defaults, nsamples={a['nsamples']}"
        + (f", niters={a['niters']}" if a["niters"] is not None else ", niters=null")
    )
    head = (
        f"  {'dist':<11} {'guide':<14} {'thr':>3} {'ours ms':>9} {'dense ms':>9} {'x':>7} "
        f"{'wall s':>7} {'fit s':>7} {'steps':>6} {'stop':<8} {'samp s':>6} {'RSS MB':>7} "
        f"{'corr':>7} {'RMSE':>6} {'cov90':>6}"
    )
    print("\n== per distribution " + "=" * 61)
    print(head)
    print("  " + "-" * (len(head) - 2))
    for row in report["rows"]:
        so, sd = row.get("steps_ours"), row.get("steps_dense")
        flow, rec = row.get("flow") or {}, row.get("recovery") or {}
        ok = flow.get("status") == "ok"
        guide = flow.get("guide") or (so or {}).get("guide") or "-"
        threads = (so or {}).get("threads") or flow.get("torch_threads_after_flow")
        wall = flow.get("flow_call_seconds") if ok else flow.get("status", "-")
        rss = max(flow.get("rss_peak_mb") or 0, flow.get("vm_hwm_mb") or 0) if ok else None
        print(
            f"  {row['distribution']:<11} {guide:<14} {fmt(threads, 'd'):>3} "
            f"{steps_cell(so):>9} {steps_cell(sd):>9} {fmt(row.get('speedup'), '.1f'):>7} "
            f"{fmt(wall):>7} {fmt(flow.get('fit_seconds')):>7} "
            f"{fmt(flow.get('niters_run'), 'd'):>6} {short_stop(flow.get('stop_reason')):<8} "
            f"{fmt(flow.get('sampling_seconds')):>6} {fmt(rss, '.0f'):>7} "
            f"{fmt(rec.get('corr'), '.5f'):>7} {fmt(rec.get('rmse'), '.3f'):>6} "
            f"{fmt(rec.get('coverage90'), '.3f'):>6}"
        )
    print(
        "  (ours/dense ms: median ms per SVI step; x = dense/ours; wall = flow call, ingest -> "
        "complete store;\n   fit/samp s = store fit_seconds/sampling_seconds; RSS = peak of "
        "the flow subprocess; corr/RMSE/cov90 = posterior alpha_y_add[:, 1:] vs truth)"
    )
    print_peer(report)
    print("\n== details " + "=" * 70)
    for row in report["rows"]:
        name, flow = row["distribution"], row.get("flow") or {}
        if flow.get("status") == "ok":
            stages = ", ".join(f"{k} {v['seconds']:.1f}" for k, v in flow["stages"].items())
            print(f"  {name}: stop: {flow['stop_reason']}")
            print(f"  {name}: stages (s): {stages}; process wall {flow['process_wall_seconds']} s")
        elif flow:
            extra = ""
            if flow.get("last_logged_step"):
                extra = (
                    f" (last logged SVI step {flow['last_logged_step']}/"
                    f"{flow['niters_cap']} at {flow['steps_per_second']} steps/s)"
                )
            print(
                f"  {name}: flow {flow.get('status')} after {flow['process_wall_seconds']} s"
                + extra
            )
        for key in ("steps_ours", "steps_dense"):
            r = row.get(key) or {}
            if r.get("status") == "ok":
                print(
                    f"  {name}: {key[6:]:<5} {r['likelihood']}: median {r['ms_per_step_median']}"
                    f" ms (mean {r['ms_per_step_mean']}, min {r['ms_per_step_min']}, max "
                    f"{r['ms_per_step_max']}, n={r['steps_timed']}), peak RSS "
                    f"{r['rss_peak_mb']} MB"
                )
            elif r:
                print(f"  {name}: {key[6:]:<5} {r.get('status')}")
        commits = {str(row[k].get("commit"))[:10] for k in ("git_before", "git_after")}
        print(
            f"  {name}: git {' -> '.join(sorted(commits))}; load average before "
            f"{row['load_average_before']} after "
            f"{row['load_average_after']}; targets missed: "
            f"{'; '.join(row['targets_missed']) or 'none'}"
        )
    print(f"\n  total benchmark wall: {report['total_seconds']:.0f} s")


def fit_stage_seconds(flow: dict[str, Any]) -> float | None:
    """The flow's fit stage wall: reading the fit cells, Laplace start, SVI, writing."""
    return (flow.get("stages") or {}).get("fit", {}).get("seconds")


PEER_LABELS = {"glmgampoi": "glmGamPoi", "deseq2": "PyDESeq2"}


def print_peer(report: dict[str, Any]) -> None:
    """The peers (glmGamPoi, PyDESeq2) on the negbinom cells, beside our default run."""
    for row in report["rows"]:
        peers = {k: row[f"peer_{k}"] for k in PEER_LABELS if row.get(f"peer_{k}")}
        if not peers:
            continue
        flow, ours = row.get("flow") or {}, row.get("recovery") or {}
        print("\n== peers (~cell_line, the same size factors, one core) " + "=" * 24)
        print(f"  {'':<10} {'fit s':>8} {'RSS MB':>8} {'corr':>8} {'RMSE':>7} {'cov90':>6}")
        rss = max(flow.get("rss_peak_mb") or 0, flow.get("vm_hwm_mb") or 0)
        _peer_line("ours", fit_stage_seconds(flow), rss, ours)
        for key, peer in peers.items():
            if peer.get("status") != "ok":
                print(f"  {PEER_LABELS[key]:<10} {peer.get('status')}")
                continue
            _peer_line(
                PEER_LABELS[key], peer.get("seconds"), peer.get("peak_rss_mb"), peer["recovery"]
            )
        bound = (row.get("data") or {}).get("cramer_rao_rmse")
        print(f"  {'bound':<10} {'':>8} {'':>8} {'':>8} {fmt(bound, '.3f'):>7}")
        for key, peer in peers.items():
            theirs = peer.get("recovery") or {}
            ratio = (ours.get("rmse") or 0) / theirs["rmse"] if theirs.get("rmse") else None
            print(
                f"  {PEER_LABELS[key]} fit s / ours: {fmt(row.get(f'peer_{key}_speedup'), '.2f')}x;"
                f" our RMSE / theirs: {fmt(ratio, '.2f')}"
            )


def _peer_line(label: str, seconds, rss, recovery: dict[str, Any]) -> None:
    print(
        f"  {label:<10} {fmt(seconds):>8} {fmt(rss, '.0f'):>8} "
        f"{fmt(recovery.get('corr'), '.5f'):>8} {fmt(recovery.get('rmse'), '.3f'):>7} "
        f"{fmt(recovery.get('coverage90'), '.3f'):>6}"
    )
