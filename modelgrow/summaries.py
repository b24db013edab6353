"""One-paragraph summaries of command reports, as the CLI and the demo print them."""

from __future__ import annotations


def format_fit(fit: dict) -> str:
    if not fit.get("loss_curve") and "eval" not in fit:
        return f"fit: {fit.get('note', 'no steps')}"
    ev, drift = fit["eval"], fit["drift"]
    loss = f"eval loss {ev['before']:.4f} -> {ev['after']:.4f}" if ev["before"] is not None else "no eval"
    return (f"fit: {fit['steps']} steps of {fit['objective']} ({fit['task']}) on {fit['device']} x{fit['world_size']}, "
            f"lr {fit['lr']:g}, batch {fit['batch_size']} x {fit['seq_len']}: {loss}; "
            f"operator drift {drift['relative']:.3g}; {fit['wall_s']:.1f}s, peak memory {fit['peak_memory']['bytes'] / 2**20:,.0f} MiB")


def format_plan(report: dict) -> str:
    plan, promise = report["plan"], report["promise"]
    rows = [f"{plan['architecture']} ({plan['class']}) · operator {report['operator']['name']} · depth mode {plan['depth_mode']}",
            f"{'':12}{'source':>12}{'target':>12}"]
    for key in ("residual", "layers", "heads", "kv_heads", "head_dim", "ffn", "vocab", "experts"):
        old, new = plan["source"].get(key), plan["target"].get(key)
        if old is None and new is None:  # vision models have no vocabulary, dense ones no experts
            continue
        rows.append(f"{key:12}{'-' if old is None else format(old, ','):>12}{'-' if new is None else format(new, ','):>12}")
    ratio = plan["target_params"] / max(1, plan["source_params"])
    rows.append(f"{'parameters':12}{plan['source_params']:>12,}{plan['target_params']:>12,}  ({ratio:.2f}x)")
    up = plan.get("upcycle")
    if up:
        rows.append(f"sparse upcycling into {up['architecture']} ({up['class']}): {up['experts']} experts, top-{up['top_k']}, "
                    f"router {up['router_init']}")
    new = plan.get("new_layers") or []
    if new:
        rows.append(f"new layers: {', '.join(map(str, new))} (growth_map.json; train only these: modelgrow train --train new)")
    exact = "yes" if promise["exact"] else "no"
    rows.append(f"function-preserving: {exact}" + "".join(f"\n  - {n}" for n in promise["notes"]))
    if report.get("estimate"):
        rows.append(format_estimate(report["estimate"]))
    return "\n".join(rows)


def format_estimate(e: dict) -> str:
    """The pre-flight estimate (modelgrow.preflight) in one line."""
    from .checkpoint.sizes import format_size

    have = []
    if e.get("free_disk_bytes") is not None:
        have.append(f"{format_size(e['free_disk_bytes'])} free at {e['disk_path']}")
    if e.get("available_memory_bytes") is not None:
        have.append(f"{format_size(e['available_memory_bytes'])} of memory available")
    checked = f" ({'; '.join(have)})" if have else "" if e.get("checked") else " (not checked: --no-preflight)"
    return (f"estimate: {e['params']:,} parameters, {format_size(e['disk_bytes'])} on disk, about "
            f"{format_size(e['peak_memory_bytes'])} of memory at the peak{checked}")


def format_verify(v: dict) -> str:
    if "skipped" in v:
        return f"verify: skipped ({v['skipped']})"
    verdict = "matches" if v["passed"] else "differs from"
    cast = v.get("cast")
    alone = f"; the {cast['dtype']} cast alone: {cast['max_abs_diff']:.3g}" if cast else ""
    first = v.get("first_divergent_block")
    where = (f"; block {first['layer']} (from source block {first['source_layer']}) departs first, by "
             f"{first['max_abs_diff']:.3g}" if first else "")
    return (f"verify: grown model {verdict} the source: max |Δ {v['output']}| = {v['max_abs_diff']:.3g} "
            f"(tolerance {v['tolerance']:.3g}, batch {v['batch']} × {v['seq']} tokens{alone}){where}")


def format_train(r: dict) -> str:
    mode = "full-rank" if r["mode"] == "full-rank" else f"ReLoRA r={r['relora']['rank']}, {r['restarts']} merges"
    val = r["val_loss"]
    loss = f"val loss {val['before']:.4f} -> {val['after']:.4f}" if val["before"] is not None and val["after"] is not None else "no validation"
    out = r["output"]
    size = sum(f["bytes"] for f in out["files"])
    return (f"trained {r['steps']} steps ({mode}) on {r['device']} x{r['world_size']}, batch {r['options']['batch_size']} x "
            f"{r['seq_len']}: {loss}; {r['trainable_params']:,} of {r['total_params']:,} parameters trained, optimizer state "
            f"{r['optimizer_state_bytes']:,} bytes\nwrote {out['path']} ({len(out['files'])} files, {size:,} bytes) in {r['wall_s']:.1f}s")


def convert_summary(report: dict, output, *, quiet: bool, show_plan: bool) -> list[tuple[str, bool]]:
    """What `convert` (and a recipe's convert stage) prints about its report, in order:
    (line, whether it is a warning, which always goes to standard error)."""
    lines = []
    if "fit" in report and not quiet:
        lines.append((format_fit(report["fit"]), False))
    if show_plan:
        lines.append((format_plan(report), False))
    if "verify" in report:
        lines.append((format_verify(report["verify"]), False))
    for name, why in report.get("tagalong", {}).get("left_behind", {}).items():
        lines.append((f"warning: {name} was not copied: {why}", True))
    if output is not None:
        files = report["output"]["files"]
        lines.append((f"wrote {output} ({len(files)} files, {sum(f['bytes'] for f in files):,} bytes) "
                      f"in {report['timings']['total_s']:.1f}s", False))
    return lines
