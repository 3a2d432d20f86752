"""The table: one row per scenario x server, medians of the reps and spread."""

import statistics


def _values(rows, key, sub=None):
    out = []
    for r in rows:
        v = r.get(key)
        if sub is not None and isinstance(v, dict):
            v = v.get(sub)
        if isinstance(v, (int, float)):
            out.append(v)
    return out


def spread(values, fmt="%.0f"):
    """``median (min-max)``, or ``median`` alone for one value, ``-`` for none."""
    if not values:
        return "-"
    med = fmt % statistics.median(values)
    if len(values) == 1:
        return med
    return "%s (%s-%s)" % (med, fmt % min(values), fmt % max(values))


def _fmt_for(values):
    return "%.2f" if values and max(values) < 10 else "%.0f" if values and max(
        values) >= 100 else "%.1f"


def summarize(results):
    """Group results by (scenario, server), in the order they first ran."""
    groups = {}
    for r in results:
        groups.setdefault((r["scenario"], r["server"]), []).append(r)
    return groups


def row(scenario, server, rows):
    def col(key, sub=None):
        vals = _values(rows, key, sub)
        return spread(vals, _fmt_for(vals))

    failed = [r for r in rows if r.get("failed")]
    errors = _values(rows, "errors")
    if all(r.get("verified_ok") for r in rows):
        found = _values(rows, "found")
        verified = "%d/%d" % (sum(found), sum(_values(rows, "expected"))) if found else "ok"
    else:
        verified = "; ".join(r["verified"] for r in rows if not r.get("verified_ok"))
    extra = []
    if any("kib_per_conn" in r for r in rows):
        extra.append("%s idle: KiB/conn PSS %s, USS %s, RSS %s; NOOP p99 %s ms (%s ms "
                     "with none)" % (
                         spread(_values(rows, "idle_connections")), col("kib_per_conn", "pss"),
                         col("kib_per_conn", "uss"), col("kib_per_conn", "rss"),
                         col("noop_p99_ms"), col("noop_p99_quiet_ms")))
        capped = [r["idle_capped"] for r in rows if r.get("idle_capped")]
        if capped:
            extra.append("(%s)" % capped[0])
    if any("end_to_end_msgs_per_s" in r for r in rows):
        extra.append("end to end %s msgs/s; backlog max %s, at load end %s" % (
            col("end_to_end_msgs_per_s"), col("backlog_max"), col("backlog_when_load_ended")))
    if any(r.get("settle_s", 0) > 0.5 for r in rows):
        extra.append("in mailboxes %s s after the load" % col("settle_s"))
    samples = [x for r in rows for x in r.get("error_samples", [])]
    if samples:
        extra.append("first error: %s" % samples[0].replace("\n", " ")[:120])
    problems = [x for r in rows for x in r.get("log_problems", [])]
    if problems:
        extra.append("server log: %s" % problems[0])
    if failed:
        extra.append("FAILED: " + "; ".join(r["failed"] for r in failed))
    return [scenario, server, col("msgs_per_s"), col("p50_ms"), col("p99_ms"),
            col("cpu_ms_per_msg"), str(int(sum(errors))) if errors else "-", verified,
            " ".join(extra)]


HEADER = ["scenario", "server", "msgs/s", "p50 ms", "p99 ms", "CPU ms/msg", "errors",
          "verified", "notes"]


def table(results):
    rows = [row(sc, sv, rs) for (sc, sv), rs in summarize(results).items()]
    return format_rst([HEADER] + rows)


def ratios(results, num="upasmail", den="postfix", key="msgs_per_s"):
    """Per scenario: [(rep, ratio)], and the median of the ratios."""
    out = {}
    by = {}
    for r in results:
        by[(r["scenario"], r["server"], r["rep"])] = r
    for (sc, sv, rep), r in sorted(by.items()):
        if sv != num:
            continue
        other = by.get((sc, den, rep))
        a, b = r.get(key), other and other.get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
            out.setdefault(sc, []).append((rep, a / b))
    return {sc: {"per_rep": [round(x, 2) for _, x in v],
                 "median": round(statistics.median(x for _, x in v), 2)}
            for sc, v in out.items()}


def ratio_table(results, pairs):
    rows = [["scenario", "ratio", "per rep", "median"]]
    for num, den, key in pairs:
        for sc, v in ratios(results, num, den, key).items():
            rows.append([sc, "%s / %s (%s)" % (num, den, key),
                         " ".join("%.2f" % x for x in v["per_rep"]), "%.2f" % v["median"]])
    return format_rst(rows) if len(rows) > 1 else ""


def format_rst(rows):
    """An RST simple table (valid in bench/README.rst as printed)."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    rule = "  ".join("=" * w for w in widths)
    lines = [rule, "  ".join(str(c).ljust(w) for c, w in zip(rows[0], widths)).rstrip(),
             rule]
    for r in rows[1:]:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    lines.append(rule)
    return "\n".join(lines)
