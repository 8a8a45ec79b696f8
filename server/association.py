"""A radiogenomic association study (``[study] kind = "association"``), run by the coordinator over a Federation.

Which radiomic features associate with a tumour's molecular phenotype (markers: an immune score, a mutation
status, ...): every feature x marker pair's effect, site-stratified and adjusted for the study's covariates
(``[model] clinical``) and, beside it, also for tumour volume ("is it just volume?"), exactly from aggregates
(:mod:`fedrad.common.association`); every site's Spearman correlation, pooled by Fisher-z random effects with I²;
Benjamini-Hochberg over the whole matrix; survivors tested again on the replication sites when the plan names
them; feature-class enrichment of the associated features.

==============  =========================================================================================  ======
phase           what happens                                                                               rounds
==============  =========================================================================================  ======
prepare         as a prediction study (the markers are the study's outcome columns: complete-case rule)     1
harmonization   ComBat fitted on every site (one fold: ``final``), each site harmonizes itself              2
association     each site sends the association aggregates of its harmonized table                          1
==============  =========================================================================================  ======
"""
from __future__ import annotations

import time

import numpy as np

from fedrad.common.association import enrichment, partial_effects, pool_spearman
from fedrad.common.messages import to_plain
from fedrad.common.selection import benjamini_hochberg
from fedrad.server.study import Study, StudyError

#: the replication rule: same sign as in discovery and a two-sided p below this on the replication sites
REPLICATION_P = 0.05


class AssociationStudy(Study):
    """Prepare, harmonize, associate (every decision from :mod:`fedrad.common.association`)."""

    def phases(self) -> list:
        return [self.prepare, self.harmonize, self.associate]

    def _score_specs(self) -> dict:  # no selection: the harmonization round carries no score tests
        return {}

    def _site_groups(self) -> tuple[list[str], list[str]]:
        acfg = self.cfg["association"]
        discovery = [s for s in acfg["discovery"] if s in self.sites] or list(self.sites)
        replication = [s for s in acfg["replication"] if s in self.sites]
        if acfg["discovery"] and not [s for s in acfg["discovery"] if s in self.sites]:
            raise StudyError(f"none of the discovery sites ({', '.join(acfg['discovery'])}) answered")
        return discovery, replication

    def associate(self) -> None:
        t0, r0 = time.monotonic(), self.fed.rounds
        acfg = self.cfg["association"]
        markers = list(acfg["markers"])
        adjust = list(self.cfg["model"]["clinical"])
        volume = self.volume if acfg["volume_adjusted"] else None
        feats = list(self.candidates) + ([self.volume] if self.volume and self.volume not in self.candidates else [])
        replies = self.fed.ask("study_associate", {"table": self.tables["final"], "features": feats},
                               phase="association")
        discovery, replication = self._site_groups()
        d_aggs = [dict(replies[s], site=s) for s in discovery]
        r_aggs = [dict(replies[s], site=s) for s in replication]
        all_aggs = [dict(replies[s], site=s) for s in self.sites]
        vol_index = [feats.index(volume)] if volume in feats else []
        pairs: dict[str, dict] = {}
        pvals = {}
        for m in markers:
            eff = partial_effects(d_aggs, m, adjust, feats)
            eff_vol = partial_effects(d_aggs, m, adjust + [volume], feats, exclude=vol_index) if volume else None
            spear = pool_spearman(all_aggs, m, feats)
            spear_d = pool_spearman(d_aggs, m, feats) if replication else spear
            pairs[m] = {}
            for f in feats:
                row = {k: _num(eff.loc[f, k]) for k in ("r", "coef_per_sd", "t", "p", "ci_low", "ci_high")}
                row.update(n=int(eff.loc[f, "n"]), sites=int(eff.loc[f, "sites"]))
                if eff_vol is not None:
                    row["volume_adjusted"] = {k: _num(eff_vol.loc[f, k]) for k in ("r", "coef_per_sd", "p",
                                                                                  "ci_low", "ci_high")}
                sp = {k: v for k, v in spear_d[f].items() if k != "sites"}
                sp["sites"] = spear[f]["sites"]
                row["spearman"] = sp
                pairs[m][f] = row
                if row["p"] is not None:
                    pvals[(f, m)] = row["p"]
        if not pvals:
            raise StudyError("no feature x marker pair has an estimate (every marker withheld or too few patients)")
        keys = list(pvals)
        q = benjamini_hochberg(np.array([pvals[k] for k in keys]))
        fdr = float(acfg["fdr"])
        survivors = []
        for (f, m), qv in zip(keys, q):
            pairs[m][f]["q"] = float(qv)
            if qv <= fdr:
                survivors.append((f, m))
        if replication and survivors:
            for m in markers:
                rep = partial_effects(r_aggs, m, adjust, feats)
                for f in feats:
                    if (f, m) not in survivors:
                        continue
                    p_r, r_r = _num(rep.loc[f, "p"]), _num(rep.loc[f, "r"])
                    ok = (p_r is not None and r_r is not None and p_r < REPLICATION_P
                          and np.sign(r_r) == np.sign(pairs[m][f]["r"]))
                    pairs[m][f]["replication"] = {"r": r_r, "p": p_r, "n": int(rep.loc[f, "n"]),
                                                  "sites": int(rep.loc[f, "sites"]), "replicated": bool(ok)}
        survivors.sort(key=lambda fm: (pairs[fm[1]][fm[0]]["p"], fm))
        hit_features = {f for f, _ in survivors}
        withheld = {s: list(replies[s].get("withheld_markers") or []) for s in self.sites
                    if replies[s].get("withheld_markers")}
        for s, ms in withheld.items():
            self.log(f"site {s}: marker(s) {', '.join(ms)} withheld (a level with fewer patients than the site's "
                     "minimum cell size); their pairs use the other sites")
        self.results["association"] = to_plain({
            "markers": markers, "features": feats, "adjust": adjust, "volume": volume, "discovery": discovery,
            "replication": replication, "fdr": fdr, "replication_p": REPLICATION_P, "pairs": pairs,
            "n_tests": len(keys), "survivors": [[f, m] for f, m in survivors], "withheld": withheld,
            "enrichment": enrichment(feats, hit_features),
            "enrichment_by_marker": {m: enrichment(feats, {f for f, mm in survivors if mm == m}) for m in markers},
            "top": int(acfg["top"])})
        self.log(f"association: {len(survivors)} of {len(keys)} feature x marker pairs pass BH-FDR {fdr}"
                 + (f"; {sum(1 for f, m in survivors if pairs[m][f].get('replication', {}).get('replicated'))} "
                    f"replicate on {', '.join(replication)}" if replication else ""))
        self._phase("association", t0, r0)


def _num(v):
    v = float(v)
    return v if np.isfinite(v) else None
