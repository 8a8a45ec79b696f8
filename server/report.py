"""The study report: one self-contained HTML file (inline SVG figures, no script, no network) from results.json.

Sections, in the order a clinician-statistician reads them:

1. headline (pooled external AUC / C-index of the radiomic signature beside tumour volume and clinical baselines)
   and any site marked missing, with its reason;
2. cohort: a "Table 1" per site (patients, events, clinical covariates) with every count under the site's minimum
   cell size shown as "<k";
3. harmonization: per-feature site effect (one-way ANOVA from per-site moments, BH-FDR 5%) before and after
   ComBat, the PCA of the site centroids, per-site mean ± SD of the signature's features;
4. the signature and the final models: ICC, univariate q-values, coefficients per SD (forest plot);
5. validation: forest plot of the held-out sites with the random-effects pooled estimate and I², per-site and
   pooled ROC with calibration (response) or Kaplan-Meier by risk group (survival), paired differences;
6. TRIPOD checklist and radiomics quality score items, filled from the study;
7. provenance: software versions, extraction parameter hash, study configuration, which sites answered which
   round trip.

Everything is computed from results.json (aggregates only). Every number printed says what it is.
"""
from __future__ import annotations

import html
import io
import json
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedrad.common.files import atomic_write_bytes  # noqa: E402
from fedrad.common import endpoints  # noqa: E402
from fedrad.common.text import plural  # noqa: E402
from fedrad.common.pipeline import MODEL_KINDS  # noqa: E402

LABELS = {"radiomics": "radiomic signature", "volume": "tumour volume alone", "clinical": "clinical covariates",
          "combined": "signature + clinical"}
COLORS = {"radiomics": "#1b6ca8", "volume": "#b5651d", "clinical": "#6a994e", "combined": "#7b2cbf"}
SITE_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf"]
STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8, "xtick.labelsize": 8,
         "ytick.labelsize": 8, "axes.spines.top": False, "axes.spines.right": False, "svg.fonttype": "none",
         "svg.hashsalt": "fedrad-report", "font.family": "DejaVu Sans", "axes.titleweight": "bold"}
NA = "–"


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------
_FIG_COUNTER = [0]


def _svg(fig, label: str) -> str:
    """The figure as inline SVG; its ids prefixed so that several figures can share one page."""
    buf = io.StringIO()
    with plt.rc_context(STYLE):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.find("<svg"):]
    _FIG_COUNTER[0] += 1
    prefix = f"f{_FIG_COUNTER[0]}-"
    text = re.sub(r'id="([^"]+)"', lambda m: f'id="{prefix}{m.group(1)}"', text)
    text = re.sub(r'url\(#([^)]+)\)', lambda m: f"url(#{prefix}{m.group(1)})", text)
    text = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{prefix}{m.group(1)}"', text)
    return text.replace("<svg ", f'<svg class="plot" role="img" aria-label="{html.escape(label)}" ', 1)


def _figure(svg: str, caption: str, fid: str) -> str:
    if not svg:
        return ""
    return f"<figure id='{fid}'>{svg}<figcaption>{caption}</figcaption></figure>"


def _e(x) -> str:
    return html.escape(str(x))


def _num(x, digits: int) -> str:
    """``x`` with ``digits`` decimals, never a negative zero ("-0.00" for -0.001 reads as a sign that is not there)."""
    text = f"{x:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _fmt(x, digits=3) -> str:
    return NA if x is None else _num(x, digits)


def _range(lo, hi, digits=3) -> str:
    """An interval "lo–hi", or "lo to hi" when a bound is negative (an en dash between negative numbers, as in
    "-0.44–-0.07", reads as a minus)."""
    a, b = _fmt(lo, digits), _fmt(hi, digits)
    return f"{a} to {b}" if a.startswith("-") or b.startswith("-") else f"{a}–{b}"


def _p(p) -> str:
    if p is None:
        return NA
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _metric_key(endpoint: dict) -> tuple[str, str, str]:
    ep = endpoints.of(endpoint)
    return ep.metric, ep.estimate, ep.metric_label


def _short(feature: str) -> str:
    return feature.removeprefix("original_")


def _table(rows: list[list], head: list[str], cls: str = "", raw: bool = False) -> str:
    """An HTML table; cells are escaped unless ``raw`` (then the caller escaped them)."""
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = []
    for r in rows:
        row_cls = ""
        if r and isinstance(r[0], dict):  # {"class": ...} as the first cell marks a row class
            row_cls = f" class='{r[0]['class']}'"
            r = r[1:]
        body.append(f"<tr{row_cls}>" + "".join(f"<td>{c if raw else _e(c)}</td>" for c in r) + "</tr>")
    return f"<table class='{cls}'><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _site_colors(results: dict) -> dict[str, str]:
    names = sorted(set(results.get("sites", {})) | set(results.get("missing_sites") or {}))
    return {s: SITE_COLORS[i % len(SITE_COLORS)] for i, s in enumerate(names)}


# ----------------------------------------------------------------------------------------------
# headline
# ----------------------------------------------------------------------------------------------
def headline(results: dict) -> list[str]:
    """One line per model: pooled external estimate with CI and heterogeneity (an association study: its own)."""
    if results["endpoint"].get("type") == "association":
        from fedrad.server.report_association import association_headline

        return association_headline(results)
    key, stat, label = _metric_key(results["endpoint"])
    lines = []
    for kind in MODEL_KINDS:
        p = results.get("pooled", {}).get(kind)
        if not p or p.get("pooled") is None:
            continue
        het = f", I² {p['i2'] * 100:.0f}%" if p.get("i2") is not None else ""
        lines.append(f"pooled external {label} of the {LABELS[kind]}: {p['pooled']:.3f} "
                     f"(95% CI {_range(p.get('ci_low'), p.get('ci_high'))}{het}, {p.get('k')} held-out sites)")
    volume = results.get("volume") or {}
    if "volume" in results and not volume.get("column"):
        lines.append(f"no tumour-volume baseline: {volume.get('reason') or 'no volume column'}")
    suspicious = results.get("outcome_like_features") or []
    if suspicious:
        lines.append(f"check the features: {', '.join(suspicious[:5])}{' …' if len(suspicious) > 5 else ''} look like "
                     "outcome or follow-up columns; if they are, list them in [selection] exclude")
    return lines + _verdict(results) + _implausible(results) + _leakage_lines(results) + _few_sites(results)


#: an external AUC, C-index or r at or above this is implausible for a radiomic model: probable leakage
IMPLAUSIBLE = 0.95


def _verdict(results: dict) -> list[str]:
    """One sentence: does the signature beat tumour volume and the clinical model, by the pooled paired
    difference at the held-out sites and its 95% CI."""
    ep = endpoints.of(results["endpoint"])
    paired = (results.get("pooled") or {}).get("paired") or {}
    clauses, k = [], None
    for pair, what in (("radiomics-volume", "tumour volume"), ("radiomics-clinical", "the clinical covariates")):
        d = paired.get(pair)
        if not d or d.get("pooled") is None:
            continue
        k = d.get("k", k)
        lo, hi = d.get("ci_low"), d.get("ci_high")
        est = f"{ep.paired_delta} {d['pooled']:+.3f}, 95% CI {_range(lo, hi)}"
        if lo is not None and lo > 0:
            clauses.append(f"the signature {ep.verdict_verb} better than {what} ({est})")
        elif hi is not None and hi < 0:
            clauses.append(f"the signature {ep.verdict_verb} worse than {what} ({est})")
        else:
            clauses.append(f"no evidence that the signature {ep.verdict_verb} better than {what} ({est})")
    if not clauses:
        return []
    return [f"verdict ({plural(k or 0, 'held-out site')}, paired differences pooled): " + "; ".join(clauses)]


def _implausible(results: dict) -> list[str]:
    """External estimates no radiomic model reaches honestly, with the checks to make."""
    ep = endpoints.of(results["endpoint"])
    _, _, label = _metric_key(results["endpoint"])
    found = []
    for site, metrics in sorted((results.get("external") or {}).items()):
        for kind in MODEL_KINDS:
            if kind in metrics:
                value = ep.headline(metrics[kind])[0]
                if value is not None and value >= IMPLAUSIBLE:
                    found.append(f"{LABELS[kind]} {value:.3f} at {site}")
    if not found:
        return []
    return [f"IMPLAUSIBLE: external {label} {', '.join(found[:6])}{' …' if len(found) > 6 else ''}: check for "
            "leakage (an outcome or follow-up column among the features or clinical covariates, the same patients "
            "at two sites, an outcome coded into a filename-derived column) before reporting it"]


def _leakage_lines(results: dict) -> list[str]:
    lines = []
    left = results.get("endpoint_like_excluded") or []
    if left:
        lines.append(f"left out of the features as endpoint or follow-up columns: {', '.join(left[:8])}"
                     f"{' …' if len(left) > 8 else ''} (list a real feature in [selection] allow)")
    leak = results.get("leakage") or {}
    withheld = leak.get("withheld") or {}
    if withheld:
        shown = ", ".join(f"{f} (training {leak.get('measure', 'AUC')} {v:.3f})" for f, v in list(withheld.items())[:6])
        lines.append(f"probable leakage withheld from the signature: {shown}; each predicts the outcome almost "
                     "perfectly on its own in the training sites: check the table ([selection] allow keeps one)")
    return lines


def _few_sites(results: dict) -> list[str]:
    ks = [p.get("k") for kind, p in (results.get("pooled") or {}).items() if kind in MODEL_KINDS and p]
    if ks and max(k or 0 for k in ks) == 2:
        return ["only 2 held-out sites, each model trained on the other site alone: the pooled estimate rests on two "
                "external estimates, its heterogeneity (I², τ) is not estimable and its CI says little about a new "
                "hospital; read the per-site estimates, and add sites before drawing conclusions"]
    return []


# ----------------------------------------------------------------------------------------------
# 1. cohort
# ----------------------------------------------------------------------------------------------
def _level_order(levels) -> list[str]:
    def key(v):
        try:
            return (0, float(v), "")
        except ValueError:
            return (2 if v == "missing" else 1, 0.0, v)
    return sorted(levels, key=key)


def _count_cell(v, n, small: bool, k) -> str:
    if v is None:
        return f"&lt;{_e(k)}" if small else "withheld<sup>‡</sup>"
    pct = f" ({100 * v / n:.0f}%)" if n else ""
    return f"{v}{pct}"


def missing_data_text(results: dict, any_excluded: bool) -> str:
    """TRIPOD item 9: the complete-case rule for outcome / clinical / covariates and the feature rule (dropped
    above max_missing, the rest imputed per fold with the training sites' mean), with counts."""
    rows = ("patients with a missing outcome, a negative time, or a missing clinical or covariate value excluded "
            "(complete case; per site and reason in Cohort)" if any_excluded
            else "no patient excluded for missing outcome, clinical or covariate values")
    miss = results.get("missing")
    if not miss:
        return rows
    dropped, imputed = miss.get("dropped") or {}, miss.get("imputed") or []
    share = float(miss.get("max_missing", 0.2))
    parts = [rows]
    if dropped:
        shown = "; ".join(f"{_e(f)} ({_e(w)})" for f, w in list(dropped.items())[:6])
        parts.append(f"{len(dropped)} feature(s) dropped as missing in more than {share:.0%} of a site's patients: "
                     f"{shown}" + (" …" if len(dropped) > 6 else ""))
    if imputed:
        cells = miss.get("cells") or {}
        per_site = ", ".join(f"{_e(s)} {c}" for s, c in sorted(cells.items()) if c)
        parts.append(f"{miss.get('n_cells', 0)} missing cell(s) of {len(imputed)} feature(s) ({per_site}) imputed "
                     "inside each validation fold with the training sites' mean (a held-out site never informs "
                     "it; fewer than k missing cells of a feature at a site get that site's own mean); ComBat, "
                     "selection and models ran on the imputed tables")
    if not dropped and not imputed:
        parts.append(f"no missing feature values among {miss.get('n_features', NA)} features")
    return "; ".join(parts)


def _pooled_count(values: list, total: int) -> str:
    released = [v for v in values if v is not None]
    s = sum(released)
    if len(released) == len(values):
        return f"{s} ({100 * s / total:.0f}%)" if total else str(s)  # total 0: a plain count
    return f"≥ {s}<sup>§</sup>"


def cohort_table(results: dict) -> str:
    """Table 1 per site: patients, outcome, clinical covariates; small cells as "<k"."""
    from fedrad.common.report_stats import combine_moments

    ep = results["endpoint"]
    info = results.get("sites", {})
    cohort = results.get("cohort") or {}
    sites = sorted(info)
    missing = results.get("missing_sites") or {}
    head = ["characteristic"] + sites + ["all sites"] + [f"{s} (missing)" for s in missing if s not in info]
    n_missing_cols = len(head) - 2 - len(sites)
    blank = [NA] * n_missing_cols
    ns = [int(info[s].get("n") or 0) for s in sites]
    total = sum(ns)
    rows: list[list] = [[{"class": "strong"}, "patients in the study (complete outcome and clinical data), n"]
                        + [str(n) for n in ns] + [str(total)] + blank]
    dropped = [info[s].get("n_dropped_incomplete") for s in sites]

    def under_k(s):
        return f"&lt;{_e((cohort.get(s) or {}).get('k', 'k'))}"

    reasons = list(dict.fromkeys(r for s in sites for r in (info[s].get("exclusions") or {})))
    if reasons:  # one row per reason of the complete-case rule (TRIPOD item 9)
        for reason in reasons:
            counts = [(info[s].get("exclusions") or {}).get(reason, 0) for s in sites]
            rows.append([f"excluded: {_e(reason)}, n"] + [(str(c) if c is not None else under_k(s))
                                                          for s, c in zip(sites, counts)]
                        + [_pooled_count(counts, 0)] + blank)
    elif any(d != 0 for d in dropped):
        rows.append(["excluded for missing outcome or clinical values, n"]
                    + [(str(d) if d is not None else under_k(s)) for s, d in zip(sites, dropped)]
                    + [_pooled_count(dropped, 0)] + blank)
    extraction = [info[s].get("extraction") for s in sites]
    if any(extraction):
        rows.append(["images extracted at the site / cases in its manifest"]
                    + [f"{x['extracted']} / {x['cases']}" if x else NA for x in extraction] + [NA] + blank)
    names = endpoints.of(ep).outcome_labels()
    for key, label in names.items():
        vals, cells = [], []
        for s, n in zip(sites, ns):
            c = cohort.get(s)
            if c:
                v = c["outcome"][key]
                cells.append(_count_cell(v, n, key in c.get("outcome_under_k", []), c.get("k", "k")))
            else:  # results.json of an older study: the prepare reply's counts
                v = info[s].get("n_events" if key == "events" else "n_nonevents")
                cells.append(_count_cell(v, n, v is None, "k"))
            vals.append(v)
        rows.append([label] + cells + [_pooled_count(vals, total)] + blank)
    fu = [(cohort.get(s) or {}).get("follow_up") for s in sites]
    if any(fu):  # survival: the sites' observed times
        rows.append([f"observed time ({ep['time']}, events and censored), mean ± SD"]
                    + [f"{_num(f['mean'], 1)} ± {_num(f['sd'], 1)}" if f and f.get("sd") is not None else NA
                       for f in fu]
                    + [NA] + blank)
    marker_names = list(dict.fromkeys(m for s in sites for m in ((cohort.get(s) or {}).get("markers") or {})))
    for m in marker_names:  # association study: each marker's positives, or mean ± SD
        vals = [((cohort.get(s) or {}).get("markers") or {}).get(m) or {} for s in sites]
        if any("positives" in v for v in vals):
            rows.append([f"marker {_e(m)} = 1, n (%)"] + [_count_cell(v.get("positives"), n, True,
                                                                      (cohort.get(s) or {}).get("k", "k"))
                                                           for s, v, n in zip(sites, vals, ns)] + [NA] + blank)
        else:
            rows.append([f"marker {_e(m)}, mean ± SD"]
                        + [f"{_num(v['mean'], 2)} ± {_num(v['sd'], 2)}" if v.get("sd") is not None else NA
                           for v in vals] + [NA] + blank)
    osum = [(cohort.get(s) or {}).get("outcome_summary") for s in sites]
    if any(osum):  # continuous outcome: the sites' mean and SD
        rows.append([f"outcome ({_e(ep['outcome'])}), mean ± SD"]
                    + [f"{_num(o['mean'], 2)} ± {_num(o['sd'], 2)}" if o and o.get("sd") is not None else NA
                       for o in osum]
                    + [NA] + blank)
    columns = list(dict.fromkeys(c for s in sites for c in list((cohort.get(s) or {}).get("continuous", {}))
                                 + list((cohort.get(s) or {}).get("counts", {}))))
    for col in columns:
        counted = all(col in (cohort.get(s) or {}).get("counts", {}) for s in sites)
        if not counted:  # mean ± SD
            ms = [(cohort.get(s) or {}).get("continuous", {}).get(col) or {} for s in sites]
            cells = [f"{_num(m['mean'], 1)} ± {_num(m['sd'], 1)}" if m.get("mean") is not None else
                     f"&lt;{_e((cohort.get(s) or {}).get('k', 'k'))} values" for s, m in zip(sites, ms)]
            pooled = NA
            if all(m.get("mean") is not None for m in ms):
                N, mean, var = combine_moments(np.array([[m["n"]] for m in ms]), np.array([[m["mean"]] for m in ms]),
                                               np.array([[m["sd"] ** 2] for m in ms]))
                pooled = f"{_num(mean[0], 1)} ± {_num(math.sqrt(var[0]), 1)}"
            rows.append([f"{_e(col)}, mean ± SD"] + cells + [pooled] + blank)
            continue
        rows.append([{"class": "group"}, f"{_e(col)}, n (%)"] + [""] * (len(sites) + 1) + blank)
        levels = _level_order({lv for s in sites for lv in cohort[s]["counts"][col]})
        for lv in levels:
            vals, cells = [], []
            for s, n in zip(sites, ns):
                c = cohort[s]
                v = c["counts"][col].get(lv, 0)
                vals.append(v)
                cells.append(_count_cell(v, n, lv in c.get("under_k", {}).get(col, []), c.get("k", "k")))
            rows.append([f"&nbsp;&nbsp;&nbsp;{_e(lv)}"] + cells + [_pooled_count(vals, total)] + blank)
    html_table = _table(rows, head, cls="cohort", raw=True)
    ks = sorted({str((cohort.get(s) or {}).get("k")) for s in sites if cohort.get(s)})
    notes = [f"&lt;k: fewer than k patients (k = the site's minimum cell size: {', '.join(ks) or 'k'}); the count "
             "never left the site.",
             "‡ withheld so that a count under k cannot be derived from the site's total (complementary "
             "suppression); the count itself is at least k.",
             "§ sum over the sites that released the cell (withheld cells not included).",
             "Percentages are of the site's patients. Means and SDs (ddof 1) are computed at each site; the all-sites "
             "column combines them exactly from (n, mean, SD)."]
    for s, reason in missing.items():
        notes.append(f"<b>{_e(s)} (missing)</b>: {_e(reason)}")
    return html_table + "<p class='note'>" + "<br>".join(notes) + "</p>"


# ----------------------------------------------------------------------------------------------
# 2. harmonization
# ----------------------------------------------------------------------------------------------
def site_effect_figure(results: dict) -> str:
    eff = results.get("site_effect")
    if not eff:
        return ""
    colors = _site_colors(results)
    with plt.rc_context(STYLE):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.6, 3.9), gridspec_kw={"width_ratios": [1, 1.45]})
        bars, labels, colors_b = [], [], []
        for key, lab, col in (("before", "raw features\n(before ComBat)", "#9e9e9e"),
                              ("after", "harmonized\n(after ComBat)", "#1b6ca8")):
            e = eff.get(key)
            if e and e.get("share_significant") is not None:
                bars.append(100 * e["share_significant"])
                labels.append(lab)
                colors_b.append(col)
        x = np.arange(len(bars))
        ax1.bar(x, bars, color=colors_b, width=0.6)
        for xi, key in zip(x, [k for k in ("before", "after") if eff.get(k)]):
            e = eff[key]
            ax1.text(xi, 100 * e["share_significant"] + 2, f"{100 * e['share_significant']:.0f}%\n"
                     f"({e['n_significant']} of {e['n_tested']})", ha="center", va="bottom", fontsize=8)
        ax1.set_xticks(x, labels)
        ax1.set_ylim(0, 118)
        ax1.set_xlim(-0.7, max(len(bars) - 0.3, 0.7))
        ax1.set_ylabel("features with a site effect (%)")
        ax1.set_title("Site effect per feature", loc="left")
        pca = eff.get("pca", {})
        if pca.get("before"):
            before, after = np.array(pca["before"]), np.array(pca["after"]) if pca.get("after") else None
            for i, s in enumerate(pca["sites"]):
                c = colors.get(s, "#444")
                ax2.scatter(*before[i], s=70, facecolor="white", edgecolor=c, linewidth=1.8, zorder=3)
                ax2.annotate(s, before[i], xytext=(6, 5), textcoords="offset points", fontsize=8, color=c)
                if after is not None:
                    ax2.annotate("", xy=after[i], xytext=before[i],
                                 arrowprops={"arrowstyle": "->", "color": c, "lw": 1.0, "alpha": 0.7})
                    ax2.scatter(*after[i], s=55, color=c, zorder=4)
            ax2.axhline(0, color="#ddd", lw=0.8, zorder=0)
            ax2.axvline(0, color="#ddd", lw=0.8, zorder=0)
            evr = pca.get("explained_variance_ratio", [0, 0])
            ax2.set_xlabel(f"PC1 of the raw site centroids ({100 * evr[0]:.0f}% of their variance), pooled-SD units")
            ax2.set_ylabel(f"PC2 ({100 * evr[1]:.0f}%)")
            ttl = "Site centroids: open = raw"
            if after is not None:
                ttl += ", filled = harmonized"
            ax2.set_title(ttl, loc="left")
            pts = before if after is None else np.vstack([before, after])
            span = np.ptp(pts, axis=0).max() or 1.0
            lo, hi = pts.min(axis=0) - 0.15 * span, pts.max(axis=0) + 0.15 * span
            ax2.set_xlim(lo[0], hi[0])
            ax2.set_ylim(min(lo[1], -0.3 * span), max(hi[1], 0.3 * span))
        else:
            ax2.text(0.5, 0.5, pca.get("reason", "PCA not available"), ha="center", va="center",
                     transform=ax2.transAxes, wrap=True)
            ax2.set_axis_off()
        fig.tight_layout()
    return _svg(fig, "site effect before and after ComBat; PCA of site centroids")


def feature_moments_figure(results: dict, max_features: int = 4) -> str:
    fm = results.get("feature_moments")
    if not fm or not fm.get("before"):
        return ""
    feats = fm["features"][:max_features]
    sites = sorted(fm["before"])
    colors = _site_colors(results)
    eff = results.get("site_effect", {})
    with plt.rc_context(STYLE):
        ncol = len(feats)
        fig, axes = plt.subplots(1, ncol, figsize=(2.45 * ncol + 0.6, 3.3), squeeze=False)
        for j, (f, ax) in enumerate(zip(feats, axes[0])):
            idx = fm["features"].index(f)
            for i, s in enumerate(sites):
                for key, dx, style in (("before", -0.17, "o"), ("after", 0.17, "s")):
                    m = (fm.get(key) or {}).get(s)
                    if not m or m["mean"][idx] is None:
                        continue
                    c = "#9e9e9e" if key == "before" else colors.get(s, "#444")
                    ax.errorbar(i + dx, m["mean"][idx], yerr=m["sd"][idx] or 0, fmt=style, color=c, ms=4.5,
                                capsize=2.5, lw=1.2)
            ax.set_xticks(range(len(sites)), sites, rotation=45, ha="right")
            ax.set_xlim(-0.6, len(sites) - 0.4)
            fs = []
            for key in ("before", "after"):
                e = eff.get(key)
                if e and f in e["features"]:
                    fs.append(_fmt(e["f"][e["features"].index(f)], 1))
            title = _short(f)
            title = title if len(title) <= 28 else title[:26] + "…"
            ax.set_title(f"{title}\nsite-effect F: {' → '.join(fs)}", fontsize=8, loc="left",
                         fontweight="normal")
            if j == 0:
                ax.set_ylabel("feature value, site mean ± SD")
        fig.tight_layout()
    return _svg(fig, "per-site mean and SD of features before and after harmonization")


def _balance_text(results: dict) -> str:
    """Covariate balance across sites (standardized mean differences, site vs the other sites) and a warning for
    an imbalanced covariate ComBat does not model."""
    bal = results.get("covariate_balance")
    if not bal or not bal.get("columns"):
        return ""
    sites = sorted(results.get("sites", {}))
    rows = []
    for col, c in bal["columns"].items():
        rows.append([col, "yes" if c["modelled"] else "no"]
                    + [_fmt(c["smd"].get(s), 2) if c["smd"].get(s) is not None else NA for s in sites]
                    + [_fmt(c["max_abs"], 2) if c["max_abs"] is not None else NA])
    out = (f"<h3>Covariate balance across sites</h3><p>Standardized mean difference of each site against the other "
           f"sites pooled (from the cohort description; a categorical or ordinal column: its largest level "
           f"difference). ComBat is only valid when the covariates that differ between sites are balanced or "
           f"modelled; |SMD| above {bal['threshold']:g} counts as imbalanced.</p>"
           + _table(rows, ["covariate", "modelled by ComBat"] + sites + ["largest |SMD|"]))
    bad = bal.get("unmodelled_imbalanced") or []
    if bad:
        out += (f"<div class='alert'><b>Imbalanced covariate(s) ComBat does not model:</b> {_e(', '.join(bad))}. "
                "Part of their real difference between sites can be removed as a site effect; add them to "
                "[harmonization] covariates (or check that they do not affect the features).</div>")
    return out


def harmonization_section(results: dict) -> str:
    eff = results.get("site_effect")
    cfg = (results.get("provenance") or {}).get("config", {})
    harm = cfg.get("harmonization", {})
    if not eff:
        return "<p>Site-effect statistics are not available in these results (study run with an older fedrad).</p>"
    b, a = eff["before"], eff.get("after")
    text = (f"<p><b>Site effect</b> = for each radiomic feature, a one-way ANOVA F test of “all sites have the same "
            f"mean”, computed from each site's n, mean and variance of the feature (sent with the study's existing "
            f"round trips: raw table when preparing, harmonized table when harmonizing; final fold, all "
            f"{len(b['sites'])} sites). "
            f"Features with a significant site effect (Benjamini-Hochberg FDR {100 * eff['fdr']:.0f}%): "
            f"<b>{b['n_significant']} of {b['n_tested']} ({100 * b['share_significant']:.0f}%) before ComBat</b>")
    if a:
        text += f", <b>{a['n_significant']} of {a['n_tested']} ({100 * a['share_significant']:.0f}%) after</b>."
    else:
        text += f"; after: not available ({_e(eff.get('after_reason') or 'no harmonized table')})."
    untested = b.get("n_untested", 0)
    if untested:
        text += f" {untested} feature(s) could not be tested (constant, or withheld by a site)."
    text += "</p>"
    sb, sa = eff.get("scale_before"), eff.get("scale_after")
    if sb:
        def share(e, test):
            v = e[test]
            return (f"{v['n_significant']} of {v['n_tested']} ({100 * v['share_significant']:.0f}%)"
                    if v.get("share_significant") is not None else NA)

        text += (f"<p><b>Multiplicative site effect</b> (do the sites' variances differ? from each site's variance "
                 f"and the mean and variance of |x − site mean|, sent with the same moments): Levene's test "
                 f"(mean-centred) significant for <b>{share(sb, 'levene')} before ComBat</b>"
                 + (f", <b>{share(sa, 'levene')} after</b>" if sa else "")
                 + f"; Bartlett's test {share(sb, 'bartlett')} before" + (f", {share(sa, 'bartlett')} after" if sa
                                                                       else "")
                 + " (BH-FDR 5%; Bartlett assumes normal features, Levene does not).</p>")
    if harm and not harm.get("enabled", True):
        text += "<p>Harmonization is disabled in this study: the models use the raw features.</p>"
    elif harm:
        cov = ", ".join(harm.get("covariates", [])) or "none"
        batches = ((results.get("harmonization") or {}).get("final") or {}).get("batch_sizes")
        final = (results.get("harmonization") or {}).get("final") or {}
        text += f"<p>Method: {_e(results.get('harmonization_method') or 'ComBat')}.</p>"
        if isinstance(harm.get("batch"), list):
            text += (f"<p>Nested ComBat (Horng et al., Sci Rep 2022): one pass per batch column, "
                     f"{_e(', then '.join(harm['batch']))}, each on the previous pass's output, fitted inside every "
                     "fold.</p>")
        elif harm.get("batch") and harm.get("shared_batches"):
            text += (f"<p>ComBat batches: the scanner models (column {_e(harm['batch'])}), one batch per model "
                     f"across the sites that have it (a model with fewer than k patients at a site joined that "
                     f"site's other batch)" + (f", {len(batches)} batches in the final fit" if batches else "")
                     + ".</p>")
        elif harm.get("batch"):
            text += (f"<p>ComBat batches: the scanners within each site (column {_e(harm['batch'])}; a scanner "
                     f"with fewer than k patients at a site joined that site's other batch)"
                     + (f", {len(batches)} batches in the final fit" if batches else "") + ".</p>")
        if final.get("covbat_n_pc"):
            text += (f"<p>CovBat (Chen et al., Hum Brain Mapp 2022) after ComBat: the first {final['covbat_n_pc']} "
                     f"principal components of the ComBat residuals ({100 * final['covbat_explained']:.0f}% of their "
                     "variance, final fit) had their location and scale harmonized across batches, which removes "
                     "site differences in the features' covariance; fitted inside every fold.</p>")
        text += (f"<p>ComBat settings: covariates preserved: {_e(cov)}; "
                 f"{'parametric' if harm.get('parametric') else 'non-parametric'} empirical Bayes; "
                 f"{'location only' if harm.get('mean_only') else 'location and scale'}. Site differences that "
                 "remain after ComBat can reflect case mix in the covariates it preserves.</p>")
    text += _balance_text(results)
    pca = eff.get("pca", {})
    if pca.get("spread_before") is not None:
        text += (f"<p>Spread of the site centroids (root mean square distance from the pooled mean, in pooled-SD "
                 f"units, over {pca['n_features']} features): {pca['spread_before']:.3f} raw"
                 + (f", {pca['spread_after']:.3f} harmonized" if pca.get("spread_after") is not None else "")
                 + ".</p>")
    fig1 = _figure(site_effect_figure(results),
                   "Left: share of the features whose site means differ (ANOVA F test, BH-FDR 5%). Right: each "
                   "site's mean feature vector (standardized with the raw pooled mean and SD), on the first two "
                   "principal components of the raw centroids; arrows go from the raw to the harmonized centroid "
                   "(projected on the same axes).", "fig-harmonization")
    fm = results.get("feature_moments") or {}
    fig2 = _figure(feature_moments_figure(results),
                   "Per-site mean ± SD (computed at each site) of the signature's features (first shown) and of the "
                   "features with the largest raw site effect: grey circles raw, coloured squares harmonized. "
                   "F = ANOVA F statistic of the site effect, raw and harmonized.", "fig-feature-moments")
    rows = []
    for f in fm.get("features", []):
        cells = [_short(f), "yes" if f in fm.get("signature", []) else ""]
        for key in ("before", "after"):
            e = eff.get(key)
            if e and f in e["features"]:
                j = e["features"].index(f)
                cells += [_fmt(e["f"][j], 1), _p(e["p"][j]), _p(e["q"][j])]
            else:
                cells += [NA, NA, NA]
        rows.append(cells)
    table = _table(rows, ["feature", "in signature", "F raw", "p raw", "q raw (BH)", "F harmonized",
                          "p harmonized", "q harmonized (BH)"]) if rows else ""
    return text + fig1 + fig2 + table


# ----------------------------------------------------------------------------------------------
# 3. signature and models
# ----------------------------------------------------------------------------------------------
def model_coefficients(endpoint: dict, params: dict) -> tuple[list[tuple], str]:
    """``[(feature, coefficient per SD, ci_low, ci_high)]`` of a final model and what the numbers are."""
    return endpoints.of(endpoint).coefficients(params)


def coefficient_figure(results: dict) -> tuple[str, str]:
    fms = results.get("final_models") or {}
    kinds = [k for k in ("radiomics", "combined") if k in fms]
    if not kinds:
        return "", ""
    ep = results["endpoint"]
    coefs = {k: model_coefficients(ep, fms[k]["params"]) for k in kinds}
    feats = list(dict.fromkeys(f for k in kinds for f, *_ in coefs[k][0]))
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(8.2, 0.36 * len(feats) + 1.3))
        for ki, k in enumerate(kinds):
            off = (ki - (len(kinds) - 1) / 2) * 0.22
            for f, b, lo, hi in coefs[k][0]:
                y = -feats.index(f) + off
                if lo is not None:
                    ax.plot([lo, hi], [y, y], color=COLORS[k], lw=1.5)
                ax.plot(b, y, "s", color=COLORS[k], ms=5, label=LABELS[k] if f == coefs[k][0][0][0] else None)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks([-i for i in range(len(feats))], [_short(f) for f in feats])
        unit = endpoints.of(ep).effect_unit
        ax.set_xlabel(f"{unit} per 1 SD of the feature (95% interval, approximate)")
        ax.set_title("Final models (all sites): coefficients", loc="left")
        ax.legend(loc="best", frameon=False)
        fig.tight_layout()
    return _svg(fig, "coefficients of the final models"), coefs[kinds[0]][1]


def signature_section(results: dict) -> str:
    sig = results.get("signature", [])
    sel = results.get("selection", {}).get("final", {})
    cfg = (results.get("provenance") or {}).get("config", {})
    icc_threshold = (cfg.get("selection") or {}).get("icc_threshold")
    icc = sel.get("icc") or {}
    fms = results.get("final_models") or {}
    ep = results["endpoint"]
    coefs = {k: dict((f, (b, lo, hi)) for f, b, lo, hi in model_coefficients(ep, fms[k]["params"])[0])
             for k in ("radiomics", "combined") if k in fms}
    text = (f"<p>{len(sig)} features selected from {results.get('n_candidate_features', NA)} candidates "
            f"(final fold, all sites): {sel.get('n_passed_fdr', 0)} of {sel.get('n_candidates', 0)} passed the "
            f"univariate score test at Benjamini-Hochberg FDR "
            f"{100 * float((cfg.get('selection') or {}).get('fdr', 0.05)):.0f}%"
            f"{' (none did: the most associated feature was kept)' if sel.get('fallback') else ''}; "
            f"{len(sel.get('dropped_redundant', []))} dropped as redundant (|r| above the threshold).")
    if icc_threshold is not None:
        text += (f" Robustness filter: features with ICC(1,1) &lt; {icc_threshold} across image perturbations were "
                 f"dropped first ({sel.get('n_not_robust', 0)} features).")
    text += "</p>"
    rows = []
    for i, f in enumerate(sig, 1):
        row = [str(i), _e(_short(f)), _p((sel.get("q_values") or {}).get(f))]
        if icc_threshold is not None:
            row.append(_fmt(icc.get(f)))
        for k in ("radiomics", "combined"):
            if k in coefs and f in coefs[k]:
                b, lo, hi = coefs[k][f]
                row.append(f"{b:+.3f}" + (f" ({lo:+.2f} to {hi:+.2f})" if lo is not None else ""))
            elif k in coefs:
                row.append(NA)
        rows.append(row)
    unit = endpoints.of(ep).effect_short
    head = ["#", "feature", "univariate q-value (BH)"] + (["ICC(1,1) across perturbations"]
                                                          if icc_threshold is not None else [])
    head += [f"{LABELS[k]}: {unit} per SD (95% CI)" for k in ("radiomics", "combined") if k in coefs]
    table = _table(rows, head, raw=True)
    note = ("<p class='note'>Robustness (ICC) not available: this study has no robustness filter ([selection] "
            "icc_threshold unset, no perturbed feature tables at the sites).</p>" if icc_threshold is None else
            "<p class='note'>ICC(1,1): intraclass correlation of the feature across image and mask perturbations, "
            "pooled over the sites' perturbed tables (1 = perfectly robust).</p>")
    svg, what = coefficient_figure(results)
    clin = [f for f in (fms.get("combined") or {}).get("features", []) if f not in sig]
    fig = _figure(svg, f"Coefficients: {_e(what)}. The combined model adds the clinical covariates "
                       f"({_e(', '.join(clin)) or 'none'}).", "fig-coefficients")
    intercept = ""
    p = (fms.get("radiomics") or {}).get("params") or {}
    if p.get("intercept") is not None:  # a model with an intercept on the original scale (logistic)
        intercept = (f"<p class='note'>Radiomic model on the original feature scale (for applying it): intercept "
                     f"{p['intercept']:+.4f}; coefficients "
                     + "; ".join(f"{_e(_short(f))} {c:+.4g}" for f, c in zip(p["feature_names"], p["coef"]))
                     + ". Features are harmonized with the study's ComBat reference first.</p>")
    elif endpoints.of(ep).model_note:
        intercept = f"<p class='note'>{_e(endpoints.of(ep).model_note)}</p>"
    return text + table + note + fig + intercept


# ----------------------------------------------------------------------------------------------
# 4. validation
# ----------------------------------------------------------------------------------------------
def _bold_heads(ax, heads: dict[int, str]) -> None:
    """Group headings among the y tick labels: bold, coloured, no tick mark."""
    labels, marks = ax.get_yticklabels(), ax.yaxis.get_major_ticks()
    for i, color in heads.items():
        labels[i].set_fontweight("bold")
        labels[i].set_color(color)
        marks[i].tick1line.set_visible(False)


def forest_plot(results: dict) -> str:
    key, stat, label = _metric_key(results["endpoint"])
    kind_of = endpoints.of(results["endpoint"])
    ext, pooled = results.get("external", {}), results.get("pooled", {})
    sites = sorted(ext)
    kinds = [k for k in MODEL_KINDS if k in pooled]
    if not kinds:
        return ""
    with plt.rc_context(STYLE):
        n_rows = len(kinds) * (len(sites) + 2.2)
        fig, ax = plt.subplots(figsize=(9.4, 0.24 * n_rows + 1.0))
        y, ticks, names = 0.0, [], []
        heads = {}
        for kind in kinds:
            heads[len(ticks)] = COLORS[kind]
            ticks.append(y)
            names.append(LABELS[kind])
            y -= 1
            for s in sites:
                est = ext[s].get(kind, {}).get(key, {})
                v, lo, hi = est.get(stat), est.get("ci_low"), est.get("ci_high")
                if v is not None:
                    ax.plot([lo if lo is not None else v, hi if hi is not None else v], [y, y], color=COLORS[kind],
                            lw=1.3)
                    ax.plot(v, y, "s", color=COLORS[kind], ms=4.5)
                    txt = f"{_num(v, 3)} ({_range(lo, hi, 2)})"
                else:
                    txt = f"undefined: {est.get('reason') or 'no estimate'}"[:40]
                ax.text(1.01, y, txt, transform=ax.get_yaxis_transform(), va="center", fontsize=7.5)
                n, ev = ext[s].get("n"), ext[s].get("n_events")
                ticks.append(y)
                names.append(f"{s} (n={n}, {kind_of.events_word} {ev if ev is not None else '<k'})"
                             if kind_of.events_word else f"{s} (n={n})")
                y -= 1
            p = pooled[kind]
            if p.get("pooled") is not None:
                lo, hi, v = p.get("ci_low", p["pooled"]), p.get("ci_high", p["pooled"]), p["pooled"]
                ax.fill([lo, v, hi, v], [y, y + 0.38, y, y - 0.38], color=COLORS[kind])
                if p.get("pi_low") is not None:
                    ax.plot([p["pi_low"], p["pi_high"]], [y, y], color=COLORS[kind], lw=0.8, ls=(0, (2, 2)))
                het = (f"; I² {100 * p['i2']:.0f}%, τ² {p['tau2']:.3f}" if p.get("i2") is not None else "")
                ax.text(1.01, y, f"{_num(v, 3)} ({_range(lo, hi, 2)}){het}", transform=ax.get_yaxis_transform(),
                        va="center", fontsize=7.5, fontweight="bold")
            ticks.append(y)
            names.append("pooled (random effects)")
            y -= 1.2
        ax.axvline(kind_of.null_value, color="grey", ls=":", lw=1)
        ax.set_yticks(ticks, names)
        _bold_heads(ax, heads)
        ax.set_ylim(y + 0.5, 0.6)
        ax.set_xlabel(f"external {label} at the held-out site (95% CI); diamond: DerSimonian-Laird pooled estimate "
                      f"(95% CI), dashed: 95% prediction interval")
        lows = [ext[s].get(k, {}).get(key, {}).get("ci_low") for s in sites for k in kinds]
        lows = [v for v in lows if v is not None]
        ax.set_xlim(min([kind_of.null_value - 0.1] + [v - 0.02 for v in lows]), 1.0)
        ax.set_title(f"Leave-one-site-out validation: {label} by held-out site", loc="left")
        fig.tight_layout()
    return _svg(fig, f"forest plot of external {label}")


def roc_figure(results: dict) -> str:
    from fedrad.common import metrics

    ext, pooled = results.get("external", {}), results.get("pooled", {})
    if "radiomics" not in pooled:
        return ""
    colors = _site_colors(results)
    with plt.rc_context(STYLE):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.4, 4.3))
        for s in sorted(ext):
            tab = ext[s].get("radiomics", {}).get("roc_bins") or {}
            if tab.get("pos_counts") is None:
                continue
            try:
                fpr, tpr, auc = metrics.pooled_roc([tab])
            except ValueError:
                continue
            ax1.plot(fpr, tpr, color=colors.get(s), lw=1.2, marker=".", ms=3,
                     label=f"{s} (binned AUC {auc:.2f})")
        roc = pooled["radiomics"].get("roc", {})
        if "fpr" in roc:
            ax1.plot(roc["fpr"], roc["tpr"], color="black", lw=2.2,
                     label=f"pooled (binned AUC {roc['auc_binned']:.2f})")
        for kind in MODEL_KINDS:
            r = pooled.get(kind, {}).get("roc", {})
            if "fpr" in r:
                ax2.plot(r["fpr"], r["tpr"], color=COLORS[kind], lw=1.8,
                         label=f"{LABELS[kind]} (binned AUC {r['auc_binned']:.2f})")
        for ax, title in ((ax1, "Radiomic signature: ROC at each held-out site"),
                          (ax2, "Pooled external ROC, every model")):
            ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
            ax.set_xlabel("1 − specificity")
            ax.set_ylabel("sensitivity")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.01)
            ax.set_aspect("equal")
            ax.set_title(title, loc="left")
            ax.legend(loc="lower right", frameon=False, fontsize=7)
        fig.tight_layout()
    return _svg(fig, "ROC curves per site and pooled")


def calibration_figure(results: dict) -> str:
    ext, pooled = results.get("external", {}), results.get("pooled", {})
    kinds = [k for k in ("radiomics", "combined") if k in pooled]
    if not kinds or not any((ext[s].get(k) or {}).get("calibration_bins") for s in ext for k in kinds):
        return ""
    colors = _site_colors(results)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(kinds), figsize=(4.7 * len(kinds), 4.5), squeeze=False)
        for kind, ax in zip(kinds, axes[0]):
            for s in sorted(ext):
                cb = (ext[s].get(kind) or {}).get("calibration_bins") or {}
                if cb.get("n") is None:
                    continue
                pts = [(m, e / c, c) for c, e, m in zip(cb["n"], cb["events"], cb["mean_predicted"]) if c]
                if not pts:
                    continue
                xs, ys, cs = zip(*pts)
                ax.plot(xs, ys, color=colors.get(s), lw=0.9, alpha=0.8)
                ax.scatter(xs, ys, s=[8 + 1.5 * c for c in cs], color=colors.get(s), alpha=0.75, label=s,
                           edgecolor="white", linewidth=0.5)
            pc = pooled[kind].get("calibration_bins") or {}
            if pc.get("n"):
                ax.plot(pc["mean_predicted"], pc["observed"], color="black", lw=2, marker="D", ms=4,
                        label="pooled (site bins grouped by tenths)")
            ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_aspect("equal")
            ax.set_xlabel("mean predicted probability in the bin")
            ax.set_ylabel("observed proportion positive in the bin")
            ax.set_title(f"Calibration at held-out sites: {LABELS[kind]}", loc="left", fontsize=9)
            ax.legend(loc="upper left", frameon=False, fontsize=7)
        fig.tight_layout()
    return _svg(fig, "calibration plots")


def decision_curve_figure(results: dict) -> str:
    """Pooled net benefit of every model at the decision-curve thresholds, against treating everyone and no one
    (Vickers & Elkin 2006), from the held-out sites' released true / false positives (response) or treated groups'
    Kaplan-Meier survival at the plan's horizon (survival; Vickers et al. 2008)."""
    pooled = results.get("pooled", {})
    curves = {k: pooled[k].get("decision_curve") for k in MODEL_KINDS if k in pooled}
    curves = {k: c for k, c in curves.items() if c and any(v is not None for v in c.get("net_benefit", []))}
    if not curves:
        return ""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7.4, 4.4))
        first = next(iter(curves.values()))
        t = np.asarray(first["thresholds"], dtype=float)
        alln = np.array([np.nan if v is None else v for v in first["treat_all"]], dtype=float)
        ax.plot(t, alln, color="grey", ls="--", lw=1.2, label="treat all")
        ax.axhline(0.0, color="black", lw=1.0, label="treat none")
        top = 0.0
        for kind, c in curves.items():
            nb = np.array([np.nan if v is None else v for v in c["net_benefit"]], dtype=float)
            full = np.array(c.get("exact") or [False] * len(nb), dtype=bool)
            ax.plot(t, nb, color=COLORS[kind], lw=1.6, label=LABELS[kind])
            ax.plot(t[full], nb[full], "o", color=COLORS[kind], ms=3.5)
            ax.plot(t[~full], nb[~full], "o", mfc="white", color=COLORS[kind], ms=3.5)
            top = max(top, float(np.nanmax(nb)) if np.isfinite(nb).any() else 0.0)
        ax.set_ylim(-0.05, max(0.05, top * 1.15, float(np.nanmax(alln)) * 1.05 if np.isfinite(alln).any() else 0))
        horizon = first.get("horizon")
        ax.set_xlabel("threshold probability (treat when the predicted probability is at least this)"
                      if horizon is None else
                      f"threshold probability (treat when the predicted risk of an event by {horizon:g} is at least "
                      "this)")
        ax.set_ylabel("net benefit (pooled held-out sites)")
        ax.set_title("Decision curves at the held-out sites" + ("" if horizon is None else
                                                                 f", risk by time {horizon:g}"), loc="left")
        ax.legend(loc="upper right", frameon=False, fontsize=7)
        fig.tight_layout()
    return _svg(fig, "decision curves")


def survival_decision_curve(results: dict) -> str:
    """The survival decision-curve figure with its caption: the horizon and the baseline rule ("" without a
    ``[validation] dca_horizon``)."""
    base = results.get("decision_baseline") or {}
    if not base:
        return ""
    h = float(base["horizon"])
    return _figure(decision_curve_figure(results),
                   f"Decision curves at time {h:g} (units of the time column; [validation] dca_horizon): net benefit "
                   f"= (1 − S(t | treated)) · m/n − S(t | treated) · m/n · p/(1 − p) of treating the m patients whose "
                   f"predicted risk of an event by t = {h:g}, 1 − exp(−H₀(t) · exp(lp)), is at least p (Vickers et "
                   "al., BMC Med Inform Decis Mak 2008), summed over the held-out sites with each site's own "
                   "Kaplan-Meier survival S of its treated group; treat all: the same with everyone. H₀ is not the "
                   f"held-out site's own (that would recalibrate on the test data): {_e(base.get('rule', ''))}. Each "
                   "site released, per threshold, only the size of the treated group and its Kaplan-Meier survival "
                   "at t, for groups of 0 or at least k patients, 0 or at least k apart; filled points: every site "
                   "released the threshold (exact), open points: interpolated between a site's released thresholds; "
                   "no point: above some site's last released threshold.", "fig-decision")


def calibration_groups_figure(results: dict) -> str:
    """Continuous outcome: each held-out site's calibration groups (mean observed against mean predicted)."""
    ext, pooled = results.get("external", {}), results.get("pooled", {})
    kinds = [k for k in ("radiomics", "combined") if k in pooled]
    if not kinds or not any(((ext[s].get(k) or {}).get("calibration_groups") or {}).get("n") for s in ext
                            for k in kinds):
        return ""
    colors = _site_colors(results)
    outcome = results["endpoint"].get("outcome", "outcome")
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(kinds), figsize=(4.7 * len(kinds), 4.5), squeeze=False)
        for kind, ax in zip(kinds, axes[0]):
            values = []
            for s in sorted(ext):
                g = (ext[s].get(kind) or {}).get("calibration_groups") or {}
                if not g.get("n"):
                    continue
                ax.plot(g["mean_pred"], g["mean_obs"], color=colors.get(s), lw=0.9, alpha=0.8)
                ax.scatter(g["mean_pred"], g["mean_obs"], s=[8 + 1.5 * c for c in g["n"]], color=colors.get(s),
                           alpha=0.75, label=s, edgecolor="white", linewidth=0.5)
                values += list(g["mean_pred"]) + list(g["mean_obs"])
            if values:
                lo, hi = min(values), max(values)
                pad = 0.05 * (hi - lo or 1.0)
                ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", ls=":", lw=1)
                ax.set_xlim(lo - pad, hi + pad)
                ax.set_ylim(lo - pad, hi + pad)
            ax.set_aspect("equal")
            ax.set_xlabel(f"mean predicted {outcome} in the group")
            ax.set_ylabel(f"mean observed {outcome} in the group")
            ax.set_title(f"Calibration at held-out sites: {LABELS[kind]}", loc="left", fontsize=9)
            ax.legend(loc="upper left", frameon=False, fontsize=7)
        fig.tight_layout()
    return _svg(fig, "calibration plots")


def continuous_metrics_table(results: dict) -> str:
    """Continuous outcome: prediction error and calibration of the radiomic signature per held-out site and pooled
    (RMSE and R² from the summed squares, Spearman on Fisher's z)."""
    ext, pooled = results.get("external", {}), results.get("pooled", {})
    rows = []
    for s in sorted(ext):
        r = ext[s].get("radiomics") or {}
        c = r.get("calibration") or {}
        sp = r.get("spearman") or {}
        rows.append([s, _fmt(r.get("r2")), _fmt(r.get("rmse")), _fmt(r.get("mae")), _fmt(c.get("in_the_large")),
                     _fmt(c.get("slope")), f"{_fmt(sp.get('rho'))} ({_range(sp.get('ci_low'), sp.get('ci_high'), 2)})",
                     c.get("reason") or ""])
    p = pooled.get("radiomics") or {}
    sp = p.get("spearman") or {}
    rows.append(["pooled", _fmt(p.get("r2")), _fmt(p.get("rmse")), NA, NA, NA,
                 f"{_fmt(sp.get('pooled'))} ({_range(sp.get('ci_low'), sp.get('ci_high'), 2)})" if sp else NA,
                 "R² = 1 − ΣSSE/ΣSST (each site's SST about its own mean); RMSE = √(ΣSSE/Σn); Spearman: "
                 "random effects on Fisher's z"])
    return ("<h3>Prediction error and calibration of the radiomic signature at held-out sites</h3>"
            + _table(rows, ["held-out site", "R² (out of sample)", "RMSE", "MAE",
                            "calibration-in-the-large (observed − predicted mean)", "calibration slope (1 = perfect)",
                            "Spearman ρ (95% CI)", "note"]))


def km_figure(results: dict) -> str:
    from fedrad.common import metrics

    ext, pooled = results.get("external", {}), results.get("pooled", {})
    kind = "radiomics" if "radiomics" in pooled else None
    if kind is None:
        return ""
    sites = sorted(ext)
    panels = sites + ["pooled"]
    ncol = min(4, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    time_col = results["endpoint"].get("time", "time")
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrow, ncol, figsize=(2.5 * ncol + 0.5, 2.45 * nrow + 0.7), squeeze=False,
                                 sharex=True, sharey=True)
        for ax in axes.flat[len(panels):]:
            ax.set_axis_off()
        for name, ax in zip(panels, axes.flat):
            for group, color in (("high", "#c0392b"), ("low", "#2471a3")):
                if name == "pooled":
                    km = pooled[kind].get(f"km_{group}")
                    label = None
                else:
                    tab = (ext[name].get(kind) or {}).get("km", {}).get(group)
                    km = metrics.pooled_km([tab]) if tab else None
                    label = None
                if km and km.get("time") is not None:
                    t, surv, risk = (np.asarray(km[c], dtype=float) for c in ("time", "survival", "at_risk"))
                    keep = risk > 0  # nobody left at risk: the curve ends
                    ax.step(t[keep], surv[keep], where="post", color=color, lw=1.6,
                            label=f"{group} predicted risk" if name == panels[0] else label)
                elif name != "pooled":
                    ax.text(0.5, 0.1 if group == "low" else 0.2, f"{group}-risk group < k patients: withheld",
                            transform=ax.transAxes, ha="center", fontsize=6.5, color=color)
            title = "pooled (held-out sites)" if name == "pooled" else name
            if name != "pooled":
                rs = (ext[name].get(kind) or {}).get("risk_split") or {}
                if rs.get("hr") is not None:
                    title += f": HR {rs['hr']:.1f}, log-rank p {_p(rs.get('logrank_p'))}"
            ax.set_title(title, loc="left", fontsize=8)
            ax.set_ylim(0, 1.02)
        for ax in axes.flat[:len(panels)]:
            ax.tick_params(labelbottom=True, labelleft=True)
            ax.set_xlabel(f"{time_col}", fontsize=7.5)
        for ax in axes[:, 0]:
            ax.set_ylabel("survival (Kaplan-Meier)")
        fig.tight_layout(rect=(0, 0, 1, 0.95))
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper right", ncol=2, frameon=False, fontsize=8)
        fig.suptitle("Radiomic signature: Kaplan-Meier by predicted risk group at each held-out site",
                     x=0.01, ha="left", fontsize=10, fontweight="bold")
    return _svg(fig, "Kaplan-Meier curves by predicted risk group")


CURVES = {"response": roc_figure, "survival": km_figure, "continuous": calibration_groups_figure}


def curve_plot(results: dict) -> str:
    """Per-site and pooled ROC (response) or Kaplan-Meier by risk group (survival)."""
    return CURVES[results["endpoint"]["type"]](results)


def paired_plot(results: dict) -> str:
    ext = results.get("external", {})
    sites = sorted(ext)
    from fedrad.common.pipeline import PAIRS

    present = {p for s in sites for p in ext[s].get("paired", {})}
    pairs = [f"{a}-{b}" for a, b in PAIRS if f"{a}-{b}" in present]
    if not pairs:
        return ""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(8.6, 0.27 * (len(sites) + 1.5) * len(pairs) + 1.0))
        y, ticks, names, heads = 0, [], [], {}
        for pair in pairs:
            a, b = pair.split("-")
            heads[len(ticks)] = COLORS[a]
            ticks.append(y)
            names.append(f"{LABELS[a]} − {LABELS[b]}")
            y -= 1
            for s in sites:
                d = ext[s]["paired"].get(pair, {})
                if d.get("diff") is not None:
                    ax.plot([d.get("ci_low", d["diff"]), d.get("ci_high", d["diff"])], [y, y], color=COLORS[a],
                            lw=1.3)
                    ax.plot(d["diff"], y, "o", color=COLORS[a], ms=4)
                    ax.text(1.01, y, f"{d['diff']:+.3f} (p {_p(d.get('p'))})", transform=ax.get_yaxis_transform(),
                            va="center", fontsize=7.5)
                ticks.append(y)
                names.append(s)
                y -= 1
            y -= 0.5
        ax.axvline(0, color="grey", lw=1)
        ax.set_yticks(ticks, names)
        _bold_heads(ax, heads)
        ax.set_ylim(y + 0.5, 0.6)
        ax.set_xlabel(f"paired {endpoints.of(results['endpoint']).paired_words} at the held-out site (95% CI); right "
                      "of 0: the first model is better")
        ax.set_title("Does the signature add to tumour volume and clinical covariates?", loc="left")
        fig.tight_layout()
    return _svg(fig, "paired differences")


def validation_section(results: dict) -> str:
    key, stat, label = _metric_key(results["endpoint"])
    ext = results.get("external", {})
    kind_of = endpoints.of(results["endpoint"])
    response = kind_of.type == "response"
    parts = []
    if not ext:
        return "<p>No leave-one-site-out validation in this study ([validation] loso = false).</p>"
    pooled = results.get("pooled", {})
    p = pooled.get("radiomics") or {}
    if p.get("pooled") is not None:
        parts.append(f"<p>Each site was held out in turn: harmonization, selection and models were fitted on the "
                     f"other sites, and the held-out site computed the metrics on its own rows. Pooled external "
                     f"{label} of the radiomic signature {_num(p['pooled'], 3)} (95% CI "
                     f"{_range(p.get('ci_low'), p.get('ci_high'))}); heterogeneity between sites I² "
                     f"{NA if p.get('i2') is None else format(100 * p['i2'], '.0f') + '%'} (share of the variation "
                     f"between "
                     f"sites beyond chance), τ² {_fmt(p.get('tau2'))} (between-site variance, {kind_of.pool_scale} "
                     f"scale), "
                     f"Cochran's Q p {_p(p.get('q_p'))}.</p>")
    parts.append(_figure(forest_plot(results),
                         f"External {label} of every model at every held-out site with its 95% CI "
                         f"({kind_of.ci_words}), and the random-effects pooled estimate (DerSimonian-Laird on the "
                         f"{kind_of.pool_scale} scale) with I² and τ².", "fig-forest"))
    if response:
        parts.append(_figure(roc_figure(results),
                             "ROC curves from the probability-binned counts the held-out sites released (bins merged "
                             "until each holds at least k patients); pooled curve: counts summed over sites "
                             "(interpolated within merged bins). Binned AUCs are close to, not equal to, the exact "
                             "AUCs in the forest plot.", "fig-roc"))
        parts.append(_figure(decision_curve_figure(results),
                             "Decision curves: net benefit = TP/n − FP/n · t/(1 − t) of treating the patients whose "
                             "predicted probability is at least t, summed over the held-out sites, from the same "
                             "probability-binned counts as the ROC curves (nothing else is released); filled points: "
                             "t is a bin edge at every site (exact), open points: inside a bin some site merged to "
                             "reach k patients (interpolated within it). Above both reference lines, the model "
                             "helps decide at that threshold.", "fig-decision"))
        parts.append(_figure(calibration_figure(results),
                             "Calibration: in each released probability bin of a held-out site, the observed share "
                             "of positives against the mean predicted probability (point area ∝ patients in the "
                             "bin); black: the sites' bins grouped by tenths of predicted probability. The dotted "
                             "diagonal is perfect calibration.", "fig-calibration"))
    elif kind_of.type == "continuous":
        parts.append(_figure(calibration_groups_figure(results),
                             "Calibration: at each held-out site the patients were sorted by their prediction and cut "
                             "into groups of at least k; each point is a group's mean observed against its mean "
                             "predicted outcome (area ∝ patients). The dotted diagonal is perfect calibration.",
                             "fig-calibration"))
    else:
        parts.append(_figure(km_figure(results),
                             "Kaplan-Meier curves of the high- and low-risk groups (linear predictor above / at or "
                             "below the training mean) at each held-out site and pooled, from the binned counts the "
                             "sites released (a group under k patients is withheld). HR: hazard ratio high vs low "
                             "(Cox, Efron ties).", "fig-km"))
        parts.append(survival_decision_curve(results))
        parts.append("<p class='note'>Calibration plot not available for a site-stratified Cox model: each site has "
                     "its own baseline hazard, so the model predicts relative, not absolute, risk.</p>")
    parts.append(_figure(paired_plot(results),
                         f"Paired {kind_of.paired_words} at each held-out site (same patients).", "fig-paired"))
    rows = []
    for s in sorted(ext):
        m = ext[s]
        cells = [s, m.get("n")] + ([m.get("n_events") if m.get("n_events") is not None else "<k"]
                                   if kind_of.events_word else [])
        for kind in MODEL_KINDS:
            est = (m.get(kind) or {}).get(key, {})
            cells.append(f"{_fmt(est.get(stat))} ({_range(est.get('ci_low'), est.get('ci_high'), 2)})"
                         if est.get(stat) is not None else NA)
        rows.append(cells)
    parts.append(f"<h3>External {label} by held-out site (95% CI)</h3>")
    parts.append(_table(rows, ["held-out site", "patients"] + ([kind_of.events_word] if kind_of.events_word else [])
                        + [LABELS[k] for k in MODEL_KINDS]))
    if response:
        calib = []
        for s in sorted(ext):
            r = ext[s].get("radiomics", {})
            c = r.get("calibration", {})
            calib.append([s, _fmt(r.get("brier")), _fmt(c.get("intercept")), _fmt(c.get("slope")),
                          c.get("reason") or ""])
        parts.append("<h3>Calibration of the radiomic signature at held-out sites</h3>")
        parts.append(_table(calib, ["held-out site", "Brier score (0 = perfect)", "calibration-in-the-large "
                                    "(intercept; 0 = perfect)", "calibration slope (1 = perfect)", "note"]))
    elif kind_of.type == "continuous":
        parts.append(continuous_metrics_table(results))
    else:
        hr = []
        for s in sorted(ext):
            rs = (ext[s].get("radiomics") or {}).get("risk_split") or {}
            ci = rs.get("hr_ci") or [None, None]
            hr.append([s, _fmt(rs.get("hr"), 2), _range(ci[0], ci[1], 2), _p(rs.get("logrank_p")),
                       rs.get("reason") or ""])
        parts.append("<h3>Risk groups of the radiomic signature at held-out sites</h3>")
        parts.append(_table(hr, ["held-out site", "hazard ratio high vs low risk", "95% CI", "log-rank p", "note"]))
    parts.append(_subgroup_table(results))
    parts.append(_penalty_section(results))
    return "".join(parts)


def _subgroup_table(results: dict) -> str:
    """TRIPOD+AI fairness: each model's headline statistic by subgroup level, pooled over the held-out sites that
    released the level (a level, or the rest of a site, under k patients is withheld there)."""
    sub = (results.get("pooled") or {}).get("subgroups") or {}
    if not sub:
        return ""
    key, stat, label = _metric_key(results["endpoint"])
    kinds = [k for k in MODEL_KINDS if k in (results.get("pooled") or {})]
    rows = []
    for col, levels in sub.items():
        for level, e in levels.items():
            if not e.get("sites"):  # no held-out site released the level: withheld, not zero patients
                rows.append([f"{col} = {level}", "withheld (< k)", "withheld (< k)"] + [NA for _ in kinds])
                continue
            cells = [f"{col} = {level}", e.get("sites", 0), e.get("n", 0)]
            for kind in kinds:
                p = e.get(kind) or {}
                cells.append(f"{_num(p['pooled'], 3)} ({_range(p.get('ci_low'), p.get('ci_high'), 2)})"
                             if p.get("pooled") is not None else NA)
            rows.append(cells)
    if not rows:
        return ""
    return (f"<h3>External {label} by subgroup (pooled over the held-out sites)</h3><p>Performance across "
            f"subgroups (TRIPOD+AI): every held-out site computed each model's {label} within each level of the "
            f"study's categorical and clinical columns; a level with fewer than k patients (or outcome cells), or "
            f"whose complement at the site is under k, is withheld there. Pooled by random effects as the "
            f"whole-site estimate.</p>"
            + _table(rows, ["subgroup", "sites", "patients"] + [LABELS[k] for k in kinds]))


def _penalty_section(results: dict) -> str:
    """The chosen penalties (final models) and every fold's choice at an end of its path or grid, flagged."""
    penalties = results.get("penalties") or {}
    if not penalties:
        return ""
    mode = results.get("penalty_mode")
    path = isinstance(mode, dict)
    what = endpoints.of(results["endpoint"]).penalty_name
    edge_text = {"strongest": "strongest end: the optimum may be a stronger penalty",
                 "weakest": "weakest end: the optimum may be a weaker penalty"}
    rows = []
    for kind, v in (penalties.get("final") or {}).items():
        values = v.get("path") or []
        where = f"{v['index'] + 1} of {len(values)}" if "index" in v and values else ""
        span = f"{values[0]:.3g} – {values[-1]:.3g}" if values else ""
        rows.append([LABELS.get(kind, kind), f"{v['value']:.3g}", where, span, edge_text.get(v.get("edge"), "")])
    parts = ["<h3>Penalties chosen by federated inner cross-validation (final models)</h3>"]
    if path:
        parts.append(f"<p>Each fold and model has its own penalty path: {mode['path_size']} values over "
                     f"{_fmt(mode['path_decades'], 1)} decades, from the penalty at which every coefficient is zero "
                     "(computed from the training sites' gradient at zero, glmnet style) towards weaker ones; the "
                     "inner cross-validation chose among them.</p>")
    parts.append(_table(rows, ["model", f"chosen {what}", "position (1 = strongest)",
                               "path (strongest – weakest)" if path else "grid (strongest – weakest)", "note"]))
    edges = [(fold, kind, v["edge"]) for fold, kinds in sorted(penalties.items()) for kind, v in kinds.items()
             if v.get("edge")]
    total = sum(len(k) for k in penalties.values())
    if edges:
        listed = "; ".join(f"{fold} {LABELS.get(kind, kind)} ({edge})" for fold, kind, edge in edges[:8])
        more = f" and {len(edges) - 8} more" if len(edges) > 8 else ""
        fix = "[model] path_decades" if path else "[model] grid (or remove it for the data-driven path)"
        parts.append(f"<p class='note'><b>Flag:</b> the chosen penalty is at an end of the {'path' if path else 'grid'} in "
                     f"{len(edges)} of {total} (fold, model) choices: {_e(listed)}{more}. The optimum may lie "
                     f"beyond it; widen {fix}.</p>")
    else:
        parts.append(f"<p>Every one of the {total} (fold, model) choices is interior to its "
                     f"{'path' if path else 'grid'}.</p>")
    return "".join(parts)


# ----------------------------------------------------------------------------------------------
# 5. TRIPOD and RQS
# ----------------------------------------------------------------------------------------------
def rqs_items(results: dict) -> list[tuple[str, str, str, str]]:
    """``(item, points available, points met by this study, how)`` of the radiomics quality score (Lambin et
    al., Nat Rev Clin Oncol 2017), for what the study itself shows; the rest is for the authors."""
    from fedrad.server.checklists import _cfg

    cfg = _cfg(results)
    sel_cfg = cfg.get("selection") or {}
    kind = endpoints.of(results["endpoint"])
    clinical = (cfg.get("model") or {}).get("clinical") or []
    n_ext = len(results.get("external", {}))
    icc = sel_cfg.get("icc_threshold") is not None
    calib_met = kind.calibrated and any((m.get("radiomics") or {}).get("calibration", {}).get("slope") is not None
                                 for m in results.get("external", {}).values())
    val = (5 if n_ext >= 3 else 4 if n_ext == 2 else 3 if n_ext == 1 else 0)
    dca_curve = ((results.get("pooled") or {}).get("radiomics") or {}).get("decision_curve") or {}
    dca = any(v is not None for v in dca_curve.get("net_benefit", []))
    horizon = dca_curve.get("horizon")
    return [
        ("1. Image protocol quality", "+1 / +2", "authors", "acquisition protocols: not known to fedrad"),
        ("2. Multiple segmentations / perturbations", "+1", "+1" if icc else "0",
         f"ICC(1,1) across image and mask perturbations, threshold {sel_cfg.get('icc_threshold')}" if icc
         else "no robustness filter in this study"),
        ("3. Phantom study", "+1", "authors", "fedrad's extraction is checked against the IBSI phantoms (software, "
                                              "not the study's scanners)"),
        ("4. Imaging at multiple time points", "+1", "authors", ""),
        ("5. Feature reduction or multiple-testing adjustment", "−3 / +3", "+3",
         "score tests with Benjamini-Hochberg FDR, redundancy filter, size cap"),
        ("6. Multivariable analysis with non-radiomic features", "+1", "+1" if clinical else "0",
         f"combined model with {', '.join(clinical)}" if clinical else "no clinical covariates"),
        ("7. Biological correlates", "+1", "authors", ""),
        ("8. Cut-off analyses", "+1", "+1" if kind.risk_groups else "0",
         "risk groups at the pre-specified training mean" if kind.risk_groups else ""),
        ("9. Discrimination statistics and resampling", "+1 / +2", "+2",
         f"{kind.metric_label} with CIs; penalty by inner cross-validation"),
        ("10. Calibration statistics and resampling", "+1 / +2", "+1" if calib_met else "0",
         "calibration intercept and slope at held-out sites" if calib_met else
         "no calibration for a site-stratified Cox model" if not kind.calibrated else "calibration undefined"),
        ("11. Prospective study registered", "+7", "authors", ""),
        ("12. Validation", "−5 … +5", f"+{val}" if val else "−5",
         f"leave-one-site-out on {n_ext} distinct institutes" if n_ext else "no validation"),
        ("13. Comparison to 'gold standard'", "+2", "+2" if clinical else "0",
         "paired comparison with the clinical and tumour-volume models" if clinical else
         "paired comparison with tumour volume only"),
        ("14. Potential clinical utility", "+2", "+2" if dca else "0",
         ("decision-curve analysis at the held-out sites (net benefit against treat-all / treat-none"
          + (f", risk of an event by time {horizon:g})" if horizon is not None else ")")) if dca
         else "no decision-curve analysis (computed for a binary response, and for a survival endpoint with "
              "[validation] dca_horizon)"),
        ("15. Cost-effectiveness analysis", "+1", "0", ""),
        ("16. Open science and data", "+1 … +4", "authors", "fedrad is open source (Apache-2.0); data sharing: "
                                                            "authors"),
    ]


def _rqs_total(items) -> int:
    total = 0
    for _, _, met, _ in items:
        m = re.fullmatch(r"([+−-])(\d+)", met)
        if m:
            total += int(m.group(2)) * (-1 if m.group(1) in "−-" else 1)
    return total


def _status_tag(status: str) -> str:
    from fedrad.server import checklists as cl

    cls = {cl.REPORTED: "ok", cl.PARTLY: "part", cl.AUTHORS: "todo", cl.NOT_APPLICABLE: "na"}[status]
    return f"<span class='tag {cls}'>{_e(status)}</span>"


def checklist_section(results: dict) -> str:
    """TRIPOD+AI (main checklist and abstract), the METRICS score and the radiomics quality score."""
    from fedrad.server import checklists as cl

    dropped = [v.get("n_dropped_incomplete") for v in (results.get("sites") or {}).values()]
    missing_words = missing_data_text(results, any(d != 0 for d in dropped))
    items = cl.tripod_ai_items(results, missing_words)
    rows = [[item, _e(topic), _status_tag(status), _e(what)] for item, topic, status, what in items]
    counts = {s: sum(r[2] == s for r in items if r[0]) for s in cl.STATUSES}
    tripod = ("<h3 id='tripod'>TRIPOD+AI checklist (Collins et al., BMJ 2024;385:e078378), prediction model "
              "development and external validation</h3>"
              f"<p>Of its {len(cl.TRIPOD_AI_ITEMS)} items and parts, this report covers "
              f"{counts[cl.REPORTED]} and part of {counts[cl.PARTLY]}; {counts[cl.AUTHORS]} are for the authors "
              f"and {counts[cl.NOT_APPLICABLE]} do not apply. Topics are paraphrased: the statement's wording is "
              "at tripod-statement.org.</p>"
              + _table(rows, ["item", "topic", "status", "from this study"], cls="checklist", raw=True))
    abstract_rows = [[item, _e(topic), _status_tag(status), _e(what)]
                     for item, topic, status, what in cl.tripod_ai_abstract_items(results, headline(results))]
    tripod += ("<h3 id='tripod-abstract'>TRIPOD+AI for Abstracts (13 items, topics paraphrased)</h3>"
               + _table(abstract_rows, ["abstract item", "topic", "status", "from this study"], cls="checklist",
                        raw=True))
    tripod += metrics_section(results)
    items = rqs_items(results)
    def tag(met: str) -> str:
        return "ok" if met.startswith("+") else "todo" if met == "authors" else "na"

    rq_rows = [[_e(i), _e(av), f"<span class='tag {tag(met)}'>{_e(met)}</span>", _e(how)] for i, av, met, how in items]
    total = _rqs_total(items)
    rqs = ("<h3 id='rqs'>Radiomics quality score (Lambin et al. 2017)</h3>"
           f"<p>Points this study shows by itself: <b>{total} of 36</b> (items marked “authors” depend on the "
           "study's documentation and can add to it).</p>"
           + _table(rq_rows, ["RQS item", "points available", "met here", "how"], cls="checklist", raw=True))
    return tripod + rqs


def metrics_section(results: dict) -> str:
    """METRICS: every item with the run's answer, and the score with the authors' items "no" and "yes"."""
    from fedrad.server import checklists as cl

    items = cl.metrics_items(results)
    summary = cl.metrics_summary(results, items)
    low, high = summary["low"], summary["high"]
    tags = {cl.YES: "ok", cl.NO: "na", cl.AUTHORS_DECIDE: "todo", cl.INAPPLICABLE: "na"}
    rows = [[f"#{item.number}", _e(item.category), _e(item.title), f"{item.weight:.4f}",
             f"<span class='tag {tags[answer]}'>{_e(answer)}</span>", _e(how)]
            for item, answer, how in items]
    known = cl.metrics_conditions(results)
    conds = "; ".join(f"{_e(q)} <b>{'yes' if v else 'no'}</b>" + ("" if v is not None else " (authors; the tool's "
                                                                                               "default)")
                      for q, v in ((cl.METRICS_CONDITIONS[c], known[c]) for c in cl.METRICS_CONDITIONS))
    return ("<h3 id='metrics'>METRICS, methodological radiomics score (Kocak et al., Insights Imaging "
            "2024;15:8)</h3>"
            f"<p>METRICS score from what this run shows, the other items answered “no” as the online tool does: "
            f"<b>{low['score']:.1f}%</b> ({_e(low['band'])}; {low['yes_weight']:.4f} of the applicable weight "
            f"{low['applicable_weight']:.4f}). With every item marked “authors” answered “yes”: at most "
            f"<b>{high['score']:.1f}%</b> ({_e(high['band'])}). The run answers {summary['n_yes']} items yes and "
            f"{summary['n_no']} no; {summary['n_authors']} are for the authors. Score = weights of the applicable "
            "items answered yes / weights of the applicable items; bands: very low &lt; 20%, low &lt; 40%, "
            "moderate &lt; 60%, good &lt; 80%, excellent ≥ 80%.</p>"
            f"<p>Conditions: {conds}.</p>"
            + _table(rows, ["METRICS item", "category", "item", "weight", "answer", "how"], cls="checklist",
                     raw=True))


# ----------------------------------------------------------------------------------------------
# 6. provenance
# ----------------------------------------------------------------------------------------------
def provenance_section(results: dict) -> str:
    prov = results.get("provenance") or {}
    parts = []
    coord = prov.get("coordinator") or {}
    sites = prov.get("sites") or {}
    names = ["fedrad", "pyradiomics", "flwr", "numpy", "python"]
    if coord or sites:
        rows = [[n, coord.get(n) or NA] + [(sites[s] or {}).get(n) or NA for s in sorted(sites)] for n in names]
        parts.append(_table(rows, ["software", "coordinator"] + sorted(sites)))
    parts.append(f"<p>Extraction parameter hash (identical at every site, checked): "
                 f"<code>{_e(prov.get('params_hash') or 'none: the sites supplied feature tables')}</code>. "
                 f"Report of the run finished {_e(prov.get('finished_utc', NA))}.</p>")
    params = prov.get("params")
    if params:
        parts.append(f"<p>The hash is that of fedrad's shipped parameter file <code>{_e(params['file'])}</code>: "
                     f"image types {_e(', '.join(params['image_types']))}; feature classes "
                     f"{_e(', '.join(params['feature_classes']))}; settings "
                     + "; ".join(f"<code>{_e(k)}</code> {_e(json.dumps(v))}" for k, v in params["settings"].items())
                     + ".</p>")
    elif prov.get("params_hash"):
        parts.append("<p>The sites used a parameter file of their own (not one shipped with fedrad): the authors "
                     "publish it with the hash above.</p>")
    history = results.get("rounds") or []
    if history:
        rows = []
        for r in history:
            failed = "; ".join(f"{s}: {why}" for s, why in r.get("failed", {}).items())
            phase = r.get("phase") or ""
            if r["request"] == "study_prepare" and r["round"] > 1:
                phase += " (restart)"
            row = [r["round"], phase, r["request"], f"{len(r['answered'])} of {len(r['asked'])}: "
                   + ", ".join(r["answered"]), failed or "", _fmt(r.get("seconds"), 2)]
            rows.append(([{"class": "fail"}] if failed else []) + row)
        parts.append("<h3>Round trips: which sites answered</h3>")
        parts.append(_table(rows, ["round trip", "phase", "request", "sites answered", "sites failed (reason)",
                                   "seconds"], cls="rounds"))
    phase_rows = [[p["phase"], p["round_trips"], p["seconds"]] for p in results.get("phases", [])]
    parts.append("<h3>Protocol cost (the final, complete run)</h3>")
    parts.append(_table(phase_rows, ["phase", "round trips", "seconds"]))
    trips = results.get("round_trips")
    parts.append(f"<p>{plural(trips, 'round trip') if isinstance(trips, int) else f'{trips} round trips'} in total "
                 "(including any run restarted after a site "
                 f"was lost), {results.get('seconds')} s.</p>")
    if prov.get("config"):
        parts.append("<details><summary>Study configuration (study.toml as validated)</summary><pre>"
                     + _e(json.dumps(prov["config"], indent=1)) + "</pre></details>")
    return "".join(parts)


# ----------------------------------------------------------------------------------------------
# the page
# ----------------------------------------------------------------------------------------------
CSS = """
body{font-family:"Segoe UI",system-ui,-apple-system,"DejaVu Sans",sans-serif;max-width:1060px;margin:0 auto;
padding:1.5em 2em 4em;color:#1f2933;line-height:1.45;background:#fff}
h1{font-size:1.7em;margin:0.2em 0 0.1em}h2{font-size:1.3em;margin-top:2.2em;border-bottom:2px solid #1b6ca8;
padding-bottom:0.2em}h3{font-size:1.05em;margin-top:1.6em}
.sub{color:#52606d;margin:0 0 1em}
nav{font-size:0.9em;margin:0.8em 0 1.2em;color:#52606d}nav a{margin-right:1em;color:#1b6ca8;text-decoration:none}
table{border-collapse:collapse;margin:0.8em 0;font-size:0.86em;font-variant-numeric:tabular-nums}
td,th{border-bottom:1px solid #e4e7eb;padding:4px 9px;text-align:left;vertical-align:top}
th{background:#f5f7fa;border-bottom:2px solid #cbd2d9;font-weight:600}
tbody tr:nth-child(even){background:#fafbfc}
table.cohort td:not(:first-child),table.cohort th:not(:first-child){text-align:right;white-space:nowrap}
tr.strong td{font-weight:600}tr.group td{font-weight:600;background:#f5f7fa}
tr.fail td{background:#fdecea}
.headline{background:#eef5fb;border-left:4px solid #1b6ca8;padding:0.7em 1.2em;border-radius:4px}
.headline ul{margin:0.3em 0;padding-left:1.2em}
.alert{background:#fff4e5;border-left:4px solid #e67e22;padding:0.6em 1.2em;border-radius:4px;margin:1em 0}
figure{margin:1.4em 0;padding:0}figure svg.plot{max-width:100%;height:auto;display:block}
figcaption{font-size:0.85em;color:#52606d;margin-top:0.3em;max-width:60em}
.note{font-size:0.82em;color:#52606d}
.tag{display:inline-block;padding:0 6px;border-radius:3px;font-size:0.85em;white-space:nowrap}
.tag.ok{background:#e3f4e8;color:#1e6b34}.tag.part{background:#fff4d6;color:#7a5b00}
.tag.todo{background:#eef0f3;color:#52606d}.tag.na{background:#f5f5f5;color:#9aa5b1}
pre{background:#f5f7fa;padding:0.8em;font-size:0.8em;overflow-x:auto}
code{font-size:0.9em}
@media print{body{max-width:none}h2{page-break-after:avoid}figure{page-break-inside:avoid}}
"""


def write_report(results: dict, path: str | Path) -> Path:
    """Write report.html (self-contained: inline SVG figures and CSS, no script, nothing fetched)."""
    ep = results["endpoint"]
    title = _e(results.get("study", "fedrad study"))
    info = results.get("sites", {})
    n = sum(int(v.get("n") or 0) for v in info.values())
    outcome = endpoints.of(ep).describe()
    prov = results.get("provenance") or {}
    version = (prov.get("coordinator") or {}).get("fedrad")
    missing = results.get("missing_sites") or {}
    alert = ""
    if missing:
        alert = ("<div class='alert'><b>Site(s) marked missing</b> — the study was run again without them:<ul>"
                 + "".join(f"<li><b>{_e(s)}</b>: {_e(r)}</li>" for s, r in missing.items()) + "</ul></div>")
    association = ep.get("type") == "association"
    if association:
        from fedrad.server.report_association import association_section

        sections = [
            ("cohort", "1. Cohort", cohort_table(results)),
            ("harmonization", "2. Harmonization across sites", harmonization_section(results)),
            ("association", "3. Radiogenomic associations", association_section(results)),
            ("provenance", "4. Provenance", provenance_section(results)),
        ]
        kind_text = "Multi-center radiogenomic association study"
    else:
        sections = [
            ("cohort", "1. Cohort", cohort_table(results)),
            ("harmonization", "2. Harmonization across sites", harmonization_section(results)),
            ("signature", "3. Radiomic signature and final models", signature_section(results)),
            ("validation", "4. External validation (leave one site out)", validation_section(results)),
            ("checklists", "5. Reporting checklists", checklist_section(results)),
            ("provenance", "6. Provenance", provenance_section(results)),
        ]
        kind_text = "Multi-center radiomics study"
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{title}</title><style>{CSS}</style></head><body>",
        f"<h1>{title}</h1>",
        f"<p class='sub'>{kind_text}, {'' if association else 'endpoint '}{_e(outcome)}: {len(info)} sites, {n} "
        f"patients. Features were extracted at each hospital and harmonized with federated ComBat"
        + (", and every feature x marker association computed from aggregates only"
           if association else ", selected and modelled inside each validation fold from aggregates only")
        + "; no image or patient row left a site. "
        f"fedrad {_e(version or '')}.</p>",
        "<nav>" + "".join(f"<a href='#{sid}'>{_e(name)}</a>" for sid, name, _ in sections) + "</nav>",
        "<div class='headline'><b>Headline</b><ul>" + "".join(f"<li>{_e(x)}</li>" for x in headline(results))
        + "</ul></div>",
        alert,
    ]
    for sid, name, body in sections:
        parts.append(f"<section id='{sid}'><h2>{_e(name)}</h2>{body}</section>")
    parts.append("</body></html>")
    path = Path(path)
    atomic_write_bytes(path, "\n".join(parts).encode("utf-8"))
    return path
