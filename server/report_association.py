"""The association study's report section (:mod:`fedrad.server.association`): a heat map of the feature x marker
matrix, a forest plot of every top pair across sites, the table of the FDR survivors, feature-class enrichment.

Helpers (figures as inline SVG, tables, number formats) come from :mod:`fedrad.server.report`."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from fedrad.common.metrics import SPEARMAN_Z_VARIANCE, _correlation_entry
from fedrad.server.report import NA, STYLE, _e, _figure, _fmt, _p, _short, _site_colors, _svg, _table

#: rows of the heat map: the features with the strongest association (smallest p over the markers)
HEATMAP_FEATURES = 40


def _ranked_features(assoc: dict) -> list[str]:
    def best(f):
        ps = [assoc["pairs"][m][f].get("p") for m in assoc["markers"]]
        ps = [p for p in ps if p is not None]
        return min(ps) if ps else 2.0

    return sorted(assoc["features"], key=lambda f: (best(f), f))


def association_headline(results: dict) -> list[str]:
    assoc = results.get("association") or {}
    if not assoc:
        return []
    surv = assoc["survivors"]
    lines = [f"{len(surv)} of {assoc['n_tests']} feature × marker pairs associated at Benjamini-Hochberg FDR "
             f"{assoc['fdr']:g} ({len(assoc['features'])} features × {len(assoc['markers'])} markers; partial "
             f"correlation adjusted for {', '.join(assoc['adjust']) or 'no covariates'}, one intercept per site; "
             f"discovery sites {', '.join(assoc['discovery'])})"]
    for f, m in surv[:3]:
        e = assoc["pairs"][m][f]
        vol = e.get("volume_adjusted") or {}
        text = (f"{_short(f)} with {m}: partial r {e['r']:+.3f} (95% CI {_fmt(e['ci_low'])} to {_fmt(e['ci_high'])}), "
                f"q {_p(e['q'])}")
        if vol:
            text += (f"; adjusted for tumour volume r {_fmt(vol.get('r'))}, p {_p(vol.get('p'))}"
                     if vol.get("r") is not None else "; it is the volume column")
        rep = e.get("replication")
        if rep:
            text += (f"; replication r {_fmt(rep.get('r'))}, p {_p(rep.get('p'))}: "
                     + ("replicated" if rep.get("replicated") else "not replicated"))
        lines.append(text)
    return lines


def heatmap_figure(assoc: dict) -> str:
    feats = _ranked_features(assoc)[:HEATMAP_FEATURES]
    markers = assoc["markers"]
    if not feats:
        return ""
    r = np.array([[assoc["pairs"][m][f].get("r") if assoc["pairs"][m][f].get("r") is not None else np.nan
                   for m in markers] for f in feats], dtype=float)
    sig = {(f, m) for f, m in assoc["survivors"]}
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(max(5.6, 2.6 + 1.1 * len(markers)), 0.26 * len(feats) + 1.6))
        lim = max(0.1, float(np.nanmax(np.abs(r))) if np.isfinite(r).any() else 0.1)
        im = ax.imshow(np.ma.masked_invalid(r), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        for i, f in enumerate(feats):
            for j, m in enumerate(markers):
                if (f, m) in sig:
                    ax.text(j, i, "●", ha="center", va="center", fontsize=7, color="black")
        ax.set_xticks(range(len(markers)), markers, rotation=30, ha="right")
        ax.set_yticks(range(len(feats)), [_short(f) for f in feats], fontsize=7)
        cbar = fig.colorbar(im, ax=ax, fraction=0.08, pad=0.03)
        cbar.set_label("partial correlation (site-stratified, adjusted)")
        ax.set_title(f"Feature × marker associations ({len(feats)} strongest features)", loc="left", fontsize=9)
        fig.tight_layout()
    return _svg(fig, "association heat map")


def forest_figure(results: dict) -> str:
    assoc = results["association"]
    top = assoc["survivors"][: int(assoc.get("top", 6))]
    if not top:
        return ""
    colors = _site_colors(results)
    sites = sorted({s for f, m in top for s in assoc["pairs"][m][f]["spearman"]["sites"]})
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(8.6, 0.26 * len(top) * (len(sites) + 2.2) + 1.0))
        y, ticks, names, heads = 0.0, [], [], []
        for f, m in top:
            sp = assoc["pairs"][m][f]["spearman"]
            heads.append(len(ticks))
            ticks.append(y)
            names.append(f"{_short(f)} ~ {m}")
            y -= 1
            for s in sites:
                e = sp["sites"].get(s)
                ci = (_correlation_entry(e["rho"], e["n"], SPEARMAN_Z_VARIANCE, 0.95, "rho")
                      if e and e.get("rho") is not None else {})
                if ci.get("ci_low") is not None:
                    lo, hi = ci["ci_low"], ci["ci_high"]
                    ax.plot([lo, hi], [y, y], color=colors.get(s, "grey"), lw=1.3)
                    ax.plot(e["rho"], y, "s", color=colors.get(s, "grey"), ms=4)
                    role = " (replication)" if s in assoc["replication"] else ""
                    ax.text(1.01, y, f"{e['rho']:+.2f} (n={e['n']}){role}", transform=ax.get_yaxis_transform(),
                            va="center", fontsize=7)
                ticks.append(y)
                names.append(s)
                y -= 1
            if sp.get("pooled") is not None:
                lo, hi, v = sp["ci_low"], sp["ci_high"], sp["pooled"]
                ax.fill([lo, v, hi, v], [y, y + 0.38, y, y - 0.38], color="black")
                het = f"; I² {100 * sp['i2']:.0f}%" if sp.get("i2") is not None else ""
                ax.text(1.01, y, f"{v:+.2f} ({lo:+.2f} to {hi:+.2f}){het}", transform=ax.get_yaxis_transform(),
                        va="center", fontsize=7, fontweight="bold")
            ticks.append(y)
            names.append("pooled (random effects)")
            y -= 1.2
        ax.axvline(0, color="grey", ls=":", lw=1)
        ax.set_yticks(ticks, names)
        for i in heads:
            ax.get_yticklabels()[i].set_fontweight("bold")
        ax.set_ylim(y + 0.5, 0.6)
        ax.set_xlim(-1, 1)
        ax.set_xlabel("Spearman ρ at each site (95% CI, Fisher z); diamond: DerSimonian-Laird pooled (discovery sites)")
        ax.set_title("Top associations across sites", loc="left")
        fig.tight_layout()
    return _svg(fig, "forest plot of the top associations")


def survivors_table(assoc: dict) -> str:
    rows = []
    for f, m in assoc["survivors"]:
        e = assoc["pairs"][m][f]
        sp, vol, rep = e.get("spearman") or {}, e.get("volume_adjusted") or {}, e.get("replication")
        rows.append([_short(f), m, f"{e['r']:+.3f} ({_fmt(e['ci_low'])} to {_fmt(e['ci_high'])})",
                     _fmt(e.get("coef_per_sd")), _p(e["p"]), _p(e["q"]),
                     (f"{sp['pooled']:+.3f} ({_fmt(sp['ci_low'])} to {_fmt(sp['ci_high'])})"
                      if sp.get("pooled") is not None else NA),
                     NA if sp.get("i2") is None else f"{100 * sp['i2']:.0f}%",
                     (f"{vol['r']:+.3f} (p {_p(vol.get('p'))})" if vol.get("r") is not None else
                      ("volume itself" if "volume_adjusted" in e else NA)),
                     (NA if not rep else f"{_fmt(rep.get('r'))} (p {_p(rep.get('p'))}) "
                      + ("replicated" if rep.get("replicated") else "not replicated"))])
    head = ["feature", "marker", "partial r (95% CI)", "marker change per SD of the feature", "p", "q (BH)",
            "pooled Spearman ρ (95% CI)", "I²", "adjusted for volume: r", "replication"]
    return _table(rows, head) if rows else "<p>No pair passes the FDR threshold.</p>"


def enrichment_table(assoc: dict) -> str:
    rows = [[r["family"], r["name"], r["features"], r["significant"], f"{r['expected']:.1f}", _p(r["p"]),
             _p(r.get("q"))] for r in assoc["enrichment"] if r["features"]]
    return _table(rows, ["family", "name", "features tested", "associated", "expected", "p (hypergeometric, "
                         "P(X ≥ associated))", "q (BH over families)"])


def association_section(results: dict) -> str:
    assoc = results.get("association") or {}
    if not assoc:
        return "<p>No association results.</p>"
    rep = (f" Pairs passing the FDR on the discovery sites were tested on the replication sites "
           f"({_e(', '.join(assoc['replication']))}): replicated when the partial correlation there has the same sign "
           f"and p &lt; {assoc['replication_p']:g}." if assoc["replication"] else "")
    withheld = assoc.get("withheld") or {}
    held = (" Withheld for a level under the site's minimum cell size: "
            + "; ".join(f"{_e(s)}: {_e(', '.join(ms))}" for s, ms in withheld.items()) + "." if withheld else "")
    parts = [f"<p>Every radiomic feature (harmonized with ComBat) against every molecular marker: the coefficient of "
             f"the feature in the linear model of the marker (a 0/1 status: linear probability model) with one "
             f"intercept per site and the covariates {_e(', '.join(assoc['adjust']) or 'none')}, as a partial "
             f"correlation with its t-test, computed exactly from each site's within-site cross-products (no row "
             f"left a site); Benjamini-Hochberg over all {assoc['n_tests']} pairs"
             + (f"; beside it the same effect also adjusted for tumour volume ({_e(_short(assoc['volume']))})"
                if assoc.get("volume") else "")
             + f". Discovery sites: {_e(', '.join(assoc['discovery']))}.{rep}{held}</p>",
             _figure(heatmap_figure(assoc), "Partial correlation of each feature (rows: the strongest by p) with each "
                     "marker, site-stratified and adjusted; ● marks a pair passing the FDR.", "fig-association-heatmap"),
             _figure(forest_figure(results), "The top pairs: each site's Spearman correlation with its 95% CI (Fisher "
                     "z, SE √(1.06/(n−3))) and the random-effects pooled estimate with I².", "fig-association-forest"),
             f"<h3>Pairs passing Benjamini-Hochberg FDR {assoc['fdr']:g}</h3>", survivors_table(assoc),
             "<h3>Feature-class enrichment of the associated features</h3>",
             "<p>Are some feature families over-represented among the features in a passing pair? Hypergeometric "
             "test against all tested features (no permutation).</p>", enrichment_table(assoc)]
    return "".join(parts)
