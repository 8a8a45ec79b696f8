"""The study report: one self-contained HTML file (inline SVG figures) from results.json.

What a reader sees first: the headline (pooled external AUC / C-index of the radiomic signature next to tumour
volume and clinical baselines), then figures — a forest plot of every held-out site with the random-effects
pooled estimate per model, the pooled ROC (or Kaplan-Meier by risk group) from binned counts, and the per-site
paired differences against the baselines — and then tables: sites, signature, penalties, calibration, round
trips. Every number says what it is.
"""
from __future__ import annotations

import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedrad.common.pipeline import MODEL_KINDS  # noqa: E402

LABELS = {"radiomics": "radiomic signature", "volume": "tumour volume alone", "clinical": "clinical covariates",
          "combined": "signature + clinical"}
COLORS = {"radiomics": "#1b6ca8", "volume": "#b5651d", "clinical": "#6a994e", "combined": "#7b2cbf"}


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.find("<svg"):]


def _metric_key(endpoint: dict) -> tuple[str, str, str]:
    return ("auc", "auc", "AUC") if endpoint["type"] == "response" else ("c_index", "c", "C-index")


def _fmt(x, digits=3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def forest_plot(results: dict) -> str:
    key, stat, label = _metric_key(results["endpoint"])
    ext, pooled = results.get("external", {}), results.get("pooled", {})
    sites = sorted(ext)
    kinds = [k for k in MODEL_KINDS if k in pooled]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * (len(sites) + 2) * len(kinds) / 1.6 + 1.5))
    y, ticks, names = 0.0, [], []
    for kind in kinds:
        for s in sites:
            est = ext[s].get(kind, {}).get(key, {})
            v, lo, hi = est.get(stat), est.get("ci_low"), est.get("ci_high")
            if v is not None:
                ax.plot([lo if lo is not None else v, hi if hi is not None else v], [y, y], color=COLORS[kind], lw=1.4)
                ax.plot(v, y, "s", color=COLORS[kind], ms=5)
            ticks.append(y)
            names.append(f"{s}")
            y -= 1
        p = pooled[kind]
        if p.get("pooled") is not None:
            lo, hi, v = p.get("ci_low", p["pooled"]), p.get("ci_high", p["pooled"]), p["pooled"]
            ax.fill([lo, v, hi, v], [y, y + 0.35, y, y - 0.35], color=COLORS[kind])
        ticks.append(y)
        names.append(f"pooled: {LABELS[kind]}")
        y -= 1.6
    ax.axvline(0.5, color="grey", ls=":", lw=1)
    ax.set_yticks(ticks, names, fontsize=8)
    ax.set_xlabel(f"external {label} at the held-out site (95% CI); pooled = random effects (DerSimonian-Laird)")
    ax.set_xlim(0.3, 1.0)
    ax.set_title(f"Leave-one-site-out validation: {label} by held-out site", fontsize=10)
    return _svg(fig)


def curve_plot(results: dict) -> str:
    pooled = results.get("pooled", {})
    kinds = [k for k in MODEL_KINDS if k in pooled]
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    if results["endpoint"]["type"] == "response":
        for kind in kinds:
            roc = pooled[kind].get("roc", {})
            if "fpr" in roc:
                ax.plot(roc["fpr"], roc["tpr"], color=COLORS[kind],
                        label=f"{LABELS[kind]} (binned AUC {roc['auc_binned']:.2f})")
        ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
        ax.set_xlabel("1 − specificity (pooled over held-out sites)")
        ax.set_ylabel("sensitivity")
        ax.set_title("Pooled external ROC from binned counts", fontsize=10)
    else:
        kind = "radiomics" if "radiomics" in pooled else (kinds[0] if kinds else None)
        for group, ls in (("high", "-"), ("low", "--")):
            km = pooled.get(kind, {}).get(f"km_{group}") if kind else None
            if km and km.get("time"):
                ax.step(km["time"], km["survival"], where="post", ls=ls, color=COLORS[kind],
                        label=f"{group} risk ({LABELS[kind]})")
        ax.set_xlabel("time (units of the study's time column)")
        ax.set_ylabel("survival probability (pooled Kaplan-Meier)")
        ax.set_ylim(0, 1.02)
        ax.set_title("Pooled external Kaplan-Meier by predicted risk group", fontsize=10)
    ax.legend(fontsize=7, loc="lower right" if results["endpoint"]["type"] == "response" else "lower left")
    return _svg(fig)


def paired_plot(results: dict) -> str:
    ext = results.get("external", {})
    sites = sorted(ext)
    pairs = sorted({p for s in sites for p in ext[s].get("paired", {})})
    if not pairs:
        return ""
    label = _metric_key(results["endpoint"])[2]
    fig, ax = plt.subplots(figsize=(7.5, 0.4 * len(sites) * len(pairs) + 1.2))
    y, ticks, names = 0, [], []
    for pair in pairs:
        a, b = pair.split("-")
        for s in sites:
            d = ext[s]["paired"].get(pair, {})
            if d.get("diff") is not None:
                ax.plot([d.get("ci_low", d["diff"]), d.get("ci_high", d["diff"])], [y, y], color=COLORS[a], lw=1.3)
                ax.plot(d["diff"], y, "o", color=COLORS[a], ms=4)
            ticks.append(y)
            names.append(f"{s}: {LABELS[a]} − {LABELS[b]}")
            y -= 1
        y -= 0.6
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(ticks, names, fontsize=7)
    ax.set_xlabel(f"paired difference in external {label} (95% CI) — right of 0: the first model is better")
    ax.set_title("Does the signature add to tumour volume and clinical covariates?", fontsize=10)
    return _svg(fig)


def _table(rows: list[list], head: list[str]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def headline(results: dict) -> list[str]:
    """One line per model: pooled external estimate with CI and heterogeneity."""
    key, stat, label = _metric_key(results["endpoint"])
    lines = []
    for kind in MODEL_KINDS:
        p = results.get("pooled", {}).get(kind)
        if not p or p.get("pooled") is None:
            continue
        het = f", I² {p['i2'] * 100:.0f}%" if p.get("i2") is not None else ""
        lines.append(f"pooled external {label} of the {LABELS[kind]}: {p['pooled']:.3f} "
                     f"(95% CI {_fmt(p.get('ci_low'))}–{_fmt(p.get('ci_high'))}{het}, {p.get('k')} held-out sites)")
    return lines


def write_report(results: dict, path: str | Path) -> Path:
    key, stat, label = _metric_key(results["endpoint"])
    ext = results.get("external", {})
    site_rows = []
    for s, info in sorted(results.get("sites", {}).items()):
        m = ext.get(s, {})
        cells = [s, info.get("n"), info.get("n_events") if info.get("n_events") is not None else "< k"]
        for kind in MODEL_KINDS:
            est = m.get(kind, {}).get(key, {}) if m else {}
            cells.append(f"{_fmt(est.get(stat))} ({_fmt(est.get('ci_low'), 2)}–{_fmt(est.get('ci_high'), 2)})"
                         if est.get(stat) is not None else "–")
        site_rows.append(cells)
    calib = []
    if results["endpoint"]["type"] == "response":
        for s in sorted(ext):
            r = ext[s].get("radiomics", {})
            c = r.get("calibration", {})
            calib.append([s, _fmt(r.get("brier")), _fmt(c.get("intercept")), _fmt(c.get("slope"))])
    pen_rows = [[f, kind, v["value"]] for f, kinds in sorted(results.get("penalties", {}).items())
                for kind, v in kinds.items() if f == "final"]
    phase_rows = [[p["phase"], p["round_trips"], p["seconds"]] for p in results.get("phases", [])]
    sig = results.get("signature", [])
    sel = results.get("selection", {}).get("final", {})
    title = html.escape(str(results.get("study", "fedrad study")))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{title}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:4px 8px}"
        "th{background:#f2f2f2}.headline{background:#eef5fb;padding:0.8em 1.2em;border-radius:6px}"
        "figure{margin:1.5em 0}</style></head><body>",
        f"<h1>{title}</h1>",
        "<p>Multi-center validation with fedrad: features were extracted at each hospital, harmonized with "
        "federated ComBat, selected and modelled inside each validation fold from aggregates only; no image or "
        "patient row left a site.</p>",
        "<div class='headline'><b>Headline</b><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in headline(results))
        + "</ul></div>",
        "".join(f"<p><b>Missing site {html.escape(str(s))}</b>: {html.escape(str(r))} — the study was run again "
                "without it.</p>" for s, r in (results.get("missing_sites") or {}).items()),
        f"<figure>{forest_plot(results)}</figure>",
        f"<figure>{curve_plot(results)}</figure>",
        f"<figure>{paired_plot(results)}</figure>",
        f"<h2>Sites and external {label} (held out in turn)</h2>",
        _table(site_rows, ["site", "patients", "events"] + [LABELS[k] for k in MODEL_KINDS]),
        "<h2>Radiomic signature (final model, all sites)</h2>",
        f"<p>{len(sig)} features: {html.escape(', '.join(sig))}. "
        f"{sel.get('n_passed_fdr', 0)} of {sel.get('n_candidates', 0)} candidate features passed the "
        f"Benjamini-Hochberg FDR{' (none did: the most associated feature was kept)' if sel.get('fallback') else ''}; "
        f"{len(sel.get('dropped_redundant', []))} dropped as redundant.</p>",
    ]
    if calib:
        parts += ["<h2>Calibration of the signature at held-out sites</h2>",
                  _table(calib, ["site", "Brier score", "calibration-in-the-large (intercept)", "calibration slope"])]
    parts += ["<h2>Penalties chosen by federated inner cross-validation (final models)</h2>",
              _table(pen_rows, ["fold", "model", "penalty value"]),
              "<h2>Protocol cost</h2>",
              _table(phase_rows, ["phase", "round trips", "seconds"]),
              f"<p>{results.get('round_trips')} round trips in {results.get('seconds')} s.</p>",
              "</body></html>"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(path)
    return path
