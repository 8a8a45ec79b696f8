"""A wide study (6 sites, 1,000 features, 1,000 patients) against its floor: pooled neuroCombat on the same folds.

    python -m benchmarks.wide                         # in-process study, pooled neuroCombat, the pooled pipeline
    python -m benchmarks.wide --runtime deployment    # and the same study on a real SuperLink + 6 SuperNodes
    python -m benchmarks.wide --baseline REV          # and the in-process study of git revision REV (same run)

The sites hold synthetic tables built like ``tests/test_study.py::make_sites``, but wide: 1,000 pyradiomics-named
features (a few carry the outcome's biology, the rest noise), each site with its own additive and multiplicative
effect per feature, age and sex as ComBat covariates, a binary outcome. The study runs with the defaults
(leave-one-site-out, ComBat fit inside each fold, the data-driven penalty path).

Printed, every figure in seconds and as a ratio:

* every phase of the in-process study (``fedrad.local.run_study_in_process``), its wall time and the CPU time of
  this process (every site and the coordinator run in it; on a shared machine the CPU time is the steadier figure);
* pooled neuroCombat (the reference implementation) fit on the training rows of each of the study's 7 folds
  (``final`` and one per held-out site): the floor of the harmonization phase;
* fedrad's pooled pipeline on the same 6 held-out folds (``fedrad.server.study_pooled.pooled_loso``); its metrics
  and signatures against the study's (max difference);
* with ``--runtime deployment``: the study on ``LoopbackDeployment`` (fedrad's fast site runtime), its results
  against the in-process run's;
* with ``--baseline REV``: the in-process study of revision REV (exported with ``git archive``, run in a
  subprocess of this interpreter), its phases beside this tree's and its results' max difference from this
  tree's (0: identical).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

SIZES = (150, 180, 200, 160, 140, 170)  # 1,000 patients
N_FEATURES = 1000


def make_wide_sites(root: Path, seed: int = 0, sizes=SIZES, p: int = N_FEATURES) -> tuple[dict, list[dict], dict]:
    """Six sites' tables, node configs and the study configuration (defaults but for the columns)."""
    from fedrad.server.study_config import _merge, validate

    rng = np.random.default_rng(seed)
    shift, scale = rng.normal(0, 1.0, (len(sizes), p)), np.exp(rng.normal(0, 0.25, (len(sizes), p)))
    nodes, tables = [], {}
    for k, n in enumerate(sizes):
        bio = rng.normal(size=(n, 3))
        age, sex = np.round(rng.normal(60, 8, n)), rng.choice(["F", "M"], n)  # whole years: float32-exact
        X = rng.normal(size=(n, p))
        X[:, :3] += 1.5 * bio
        X[:, 3:6] += 0.5 * bio  # correlated with the informative ones (redundancy filter)
        X += 0.02 * (age[:, None] - 60) + 0.3 * (sex == "M")[:, None]
        X = X * scale[k] + shift[k]  # the site effect
        lp = 1.2 * bio[:, 0] - 0.8 * bio[:, 1] + 0.5 * bio[:, 2]
        d = pd.DataFrame(X, columns=[f"original_glcm_F{i:04d}" for i in range(p - 1)] + ["original_firstorder_Mean"])
        d["original_shape_VoxelVolume"] = np.exp(rng.normal(7, 0.5, n) + 0.2 * bio[:, 0])
        d["age"], d["sex"], d["stage"] = age, sex, rng.integers(1, 5, n)
        d["response"] = (rng.random(n) < 1 / (1 + np.exp(-lp))).astype(int)
        d["case_id"] = [f"s{k}-{i}" for i in range(n)]
        name = f"site{k}"
        path = root / name / "features.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        d.to_parquet(path)
        tables[name] = d
        nodes.append({"site-name": name, "table": str(path), "workdir": str(root / name / "work"),
                      "min-cell-size": 10})
    cfg = validate(_merge({"study": {"name": "wide", "min_sites": 3},
                           "endpoint": {"type": "response", "outcome": "response"},
                           "harmonization": {"covariates": ["age", "sex"], "categorical": ["sex"]},
                           "model": {"clinical": ["age", "stage"]}}))
    return cfg, nodes, tables


COMPARED = ("external", "pooled", "selection", "signature", "penalties", "sites")


def digest(res: dict) -> dict:
    """The results a change must leave identical, as results.json holds them."""
    from fedrad.common.messages import to_plain

    return json.loads(json.dumps(to_plain({k: res.get(k) for k in COMPARED})))


def max_difference(a, b) -> tuple[float, str]:
    """Largest absolute numeric difference between two digests and where (inf when names or text differ)."""
    import math

    if a == b:
        return 0.0, ""
    from fedrad.server.study_pooled import flatten_metrics

    fa, fb = flatten_metrics(a), flatten_metrics(b)
    if fa.keys() != fb.keys():
        return math.inf, f"numeric fields {sorted(fa.keys() ^ fb.keys())[:5]}"
    where = max(fa, key=lambda k: abs(fa[k] - fb[k]), default="")
    diff = abs(fa[where] - fb[where]) if where else 0.0
    return (diff, where) if diff > 0 else (math.inf, "text (names, labels) differs")


def run_local(root: Path, profile: Path | None = None) -> dict:
    """The in-process study on fresh site folders under ``root``: its phases' seconds, wall time and digest."""
    from fedrad.local import run_study_in_process
    from fedrad.server.study import Study

    cfg, nodes, _ = make_wide_sites(root)
    marks: list = []  # (phase, process CPU time at its end): each phase's CPU seconds
    phase_end = Study._phase

    def mark(self, name, t0, rounds0):
        marks.append((name, time.process_time()))
        return phase_end(self, name, t0, rounds0)

    Study._phase = mark
    prof = None
    if profile is not None:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        res = run_study_in_process(cfg, nodes)
    finally:
        Study._phase = phase_end
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    cpu_phases = {name: end - start for (name, end), start in zip(marks, [c0] + [m[1] for m in marks])}
    if prof is not None:
        prof.disable()
        prof.dump_stats(str(profile))
    return {"wall": wall, "cpu": cpu, "cpu_phases": cpu_phases,
            "phases": {p["phase"]: p["seconds"] for p in res["phases"]},
            "round_trips": res["round_trips"], "digest": digest(res)}


def run_deployment(root: Path) -> dict:
    from benchmarks.rounds import run_deployment as deploy

    cfg, nodes, _ = make_wide_sites(root)
    rounds, wall = deploy(cfg, nodes, root, fast=True)
    res = json.loads((root / "out" / "results.json").read_text())
    return {"wall": wall, "phases": {p["phase"]: p["seconds"] for p in res["phases"]}, "round_trips": rounds,
            "digest": digest(res)}


def folds_of(tables: dict) -> dict[str, list[str]]:
    """The study's validation folds and their training sites."""
    sites = sorted(tables)
    return {"final": sites, **{f"loso:{s}": [t for t in sites if t != s] for s in sites}}


def neurocombat_folds(cfg: dict, tables: dict) -> tuple[float, float]:
    """Seconds (wall, CPU) of pooled neuroCombat fit (and applied) on the training rows of each of the study's
    folds."""
    from neuroCombat import neuroCombat

    from fedrad.common.plan import candidate_features, study_plan

    feats = candidate_features(tables["site0"], study_plan(cfg)["study"])
    total = cpu = 0.0
    for train in folds_of(tables).values():
        pooled = pd.concat([tables[s].assign(site=s) for s in train], ignore_index=True)
        data = np.ascontiguousarray(pooled[feats].to_numpy(dtype=float).T)
        covars = pooled[["site", "age", "sex"]].copy()
        t0, c0 = time.perf_counter(), time.process_time()
        with contextlib.redirect_stdout(io.StringIO()):
            neuroCombat(data, covars, "site", categorical_cols=["sex"], continuous_cols=["age"])
        total, cpu = total + time.perf_counter() - t0, cpu + time.process_time() - c0
    return total, cpu


def pooled_pipeline(cfg: dict, tables: dict) -> tuple[float, dict]:
    """Seconds of fedrad's pooled pipeline on the 6 held-out folds, and each fold's result."""
    from fedrad.server.study_pooled import pooled_loso

    t0 = time.perf_counter()
    out = {s: pooled_loso(cfg, tables, s) for s in sorted(tables)}
    return time.perf_counter() - t0, out


def twin_difference(study: dict, twins: dict) -> tuple[float, str, bool]:
    """Largest relative difference between the study's external metrics and the pooled twin's; signatures equal."""
    from fedrad.server.study_pooled import flatten_metrics

    worst, where, same = 0.0, "", True
    for site, twin in twins.items():
        got, want = flatten_metrics(study["external"][site]), flatten_metrics(twin["metrics"])
        if set(got) != set(want):
            return float("inf"), "fields differ", False
        for k in got:
            d = abs(got[k] - want[k]) / max(1.0, abs(want[k]))
            if d > worst:
                worst, where = d, f"{site}: {k}"
        same &= study["selection"][f"loso:{site}"]["selected"] == twin["signature"]
    return worst, where, same


def run_baseline(rev: str, tmp: Path) -> dict:
    """The in-process study of git revision ``rev``: its tree exported to ``tmp``, run in a subprocess."""
    repo = Path(__file__).resolve().parent.parent
    src = tmp / "src"
    src.mkdir(parents=True)
    tar = subprocess.run(["git", "-C", str(repo), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=tar, check=True)
    pkg = tmp / "pkg"  # the package layout of pyproject.toml's package-dir
    (pkg / "fedrad").mkdir(parents=True)
    subprocess.run(["cp", "-r", *[str(p) for p in (src / "fedrad").iterdir()], str(pkg / "fedrad")], check=True)
    for sub in ("server", "client", "common"):
        subprocess.run(["cp", "-r", str(src / sub), str(pkg / "fedrad" / sub)], check=True)
    out = tmp / "baseline.json"
    env = {**os.environ, "PYTHONPATH": f"{pkg}{os.pathsep}{repo}"}
    code = ("import json, sys; from pathlib import Path; import fedrad; "
            f"assert fedrad.__file__.startswith({str(pkg)!r}), fedrad.__file__; "
            "from benchmarks.wide import run_local; "
            f"Path({str(out)!r}).write_text(json.dumps(run_local(Path({str(tmp / 'run')!r}))))")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=str(tmp))
    return json.loads(out.read_text())


def phase_line(label: str, run: dict, base: dict | None = None) -> str:
    parts = []
    for name, secs in run["phases"].items():
        part = f"{name} {secs:.2f} s"
        if base and base["phases"].get(name):
            part += f" ({secs / base['phases'][name]:.2f} x)"
        parts.append(part)
    line = f"{label}: wall {run['wall']:.1f} s"
    if base:
        line += f" ({run['wall'] / base['wall']:.2f} x baseline)"
    if "cpu" in run:  # the machine is shared: the study's own CPU time says what it costs
        line += f", CPU {run['cpu']:.1f} s" + (f" ({run['cpu'] / base['cpu']:.2f} x)" if base and "cpu" in base else "")
    line += f", {run['round_trips']} round trips; " + ", ".join(parts)
    if run.get("cpu_phases"):
        line += "; CPU " + ", ".join(
            f"{name} {secs:.2f} s" + (f" ({secs / base['cpu_phases'][name]:.2f} x)"
                                      if base and base.get("cpu_phases", {}).get(name) else "")
            for name, secs in run["cpu_phases"].items())
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", choices=["local", "deployment"], default="local")
    ap.add_argument("--baseline", metavar="REV", help="also run the in-process study of this git revision")
    ap.add_argument("--profile", metavar="FILE", help="cProfile the in-process study into FILE")
    ap.add_argument("--no-pooled", action="store_true", help="skip the pooled pipeline (the slowest reference)")
    args = ap.parse_args()
    print(f"{len(SIZES)} sites, {sum(SIZES)} patients, {N_FEATURES} features; {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory(prefix="fedrad-wide-") as tmp:
        root = Path(tmp)
        base = run_baseline(args.baseline, root / "baseline") if args.baseline else None
        if base:
            print(phase_line(f"baseline {args.baseline} in-process", base), flush=True)
        local = run_local(root / "local", Path(args.profile) if args.profile else None)
        print(phase_line("in-process", local, base), flush=True)
        if base:
            diff, where = max_difference(base["digest"], local["digest"])
            print(f"results vs baseline {args.baseline}: max |difference| {diff:.1e}"
                  + (f" at {where}" if diff else " (identical)"), flush=True)
        cfg, _, tables = make_wide_sites(root / "tables")
        floor, floor_cpu = neurocombat_folds(cfg, tables)
        harm, harm_cpu = local["phases"]["harmonization"], local["cpu_phases"]["harmonization"]
        print(f"pooled neuroCombat over the {len(folds_of(tables))} folds: {floor:.2f} s (CPU {floor_cpu:.2f} s); "
              f"in-process harmonization phase {harm:.2f} s = {harm / floor:.1f} x neuroCombat, CPU {harm_cpu:.2f} s "
              f"= {harm_cpu / floor_cpu:.1f} x"
              + (f" (baseline {base['phases']['harmonization'] / floor:.1f} x, CPU "
                 f"{base['cpu_phases']['harmonization'] / floor_cpu:.1f} x)" if base else ""), flush=True)
        if not args.no_pooled:
            secs, twins = pooled_pipeline(cfg, tables)
            worst, where, same = twin_difference(local["digest"], twins)
            print(f"pooled pipeline (fedrad.server.study_pooled) on the {len(twins)} held-out folds: {secs:.1f} s; "
                  f"in-process study {local['wall']:.1f} s = {local['wall'] / secs:.2f} x; external metrics vs the "
                  f"pooled twin: max relative difference {worst:.1e} ({where}), signatures "
                  f"{'equal' if same else 'DIFFER'}",
                  flush=True)
        if args.runtime == "deployment":
            dep = run_deployment(root / "deployment")
            print(phase_line("deployment (fast site runtime)", dep), flush=True)
            diff, where = max_difference(local["digest"], dep["digest"])
            print(f"deployment wall {dep['wall']:.1f} s = {dep['wall'] / local['wall']:.2f} x in-process; results vs "
                  f"in-process: max |difference| {diff:.1e}" + (f" at {where}" if diff else " (identical)"),
                  flush=True)


if __name__ == "__main__":
    main()
