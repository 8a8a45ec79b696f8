"""The ``fedrad`` command line: thin wrappers that parse options and call client/server/common.

Command groups: ``site`` (a hospital's site agent), ``coordinator`` (the operator of the Flower
SuperLink), ``study`` (multi-center validation studies), plus ``demo-data`` and ``demo``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from fedrad import __version__

app = typer.Typer(
    help="fedrad: federated radiomics for multi-center validation studies. "
    "Images and patient rows stay at each hospital; only aggregates travel.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
site_app = typer.Typer(help="Site agent (run at a hospital): check a data manifest, extract radiomic features.",
                       no_args_is_help=True)
coordinator_app = typer.Typer(
    help="Coordinator operator: SuperLink, certificates, site registration. "
    "(Stub: filled by the study-runtime and security issues.)", no_args_is_help=True)
study_app = typer.Typer(
    help="Multi-center validation studies: define, run, report. (Stub: filled by the study issue.)",
    no_args_is_help=True)
app.add_typer(site_app, name="site")
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(study_app, name="study")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"fedrad: error: {message}", err=True)
    raise typer.Exit(code)


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the fedrad version and exit.")) -> None:
    if version:
        typer.echo(f"fedrad {__version__}")
        raise typer.Exit(0)


@app.command("demo-data")
def demo_data(
    out: Path = typer.Option(..., "--out", help="Directory to write the synthetic cohort into."),
    sites: int = typer.Option(5, "--sites", min=1, help="Number of hospitals (sites)."),
    patients: int = typer.Option(100, "--patients", min=1, help="Patients per site."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the cohort is deterministic for a seed."),
) -> None:
    """Write a synthetic multi-site cohort (NIfTI images + masks, one manifest per site)."""
    from fedrad.client.demo_data import write_demo_cohort

    try:
        manifests = write_demo_cohort(out, n_sites=sites, n_patients=patients, seed=seed, progress=True)
    except (FileExistsError, ValueError) as exc:
        _fail(str(exc))
    for m in manifests:
        typer.echo(f"site manifest: {m}")


@app.command("demo")
def demo() -> None:
    """Run a full demo study end to end. (Stub: filled by the study issue; use demo-data + site extract.)"""
    _fail("`fedrad demo` is not implemented yet; run `fedrad demo-data` then `fedrad site extract`.", 1)


@site_app.command("check")
def site_check(
    manifest: Path = typer.Argument(..., help="Site data manifest (CSV)."),
    spacing_tol: float = typer.Option(1e-3, "--spacing-tol", help="Relative tolerance for spacing mismatch."),
    origin_tol: float = typer.Option(1e-2, "--origin-tol", help="Absolute tolerance (mm) for origin mismatch."),
    direction_tol: float = typer.Option(1e-3, "--direction-tol", help="Absolute tolerance for direction cosines."),
    outcomes: Optional[str] = typer.Option(
        None, "--outcomes", help="Comma-separated outcome columns that must be present and non-missing."),
) -> None:
    """Validate a manifest without extracting; print every problem; exit 1 if any case is unusable."""
    from fedrad.client.manifest import CheckTolerances, check_manifest, format_problems

    tol = CheckTolerances(spacing_rel=spacing_tol, origin_abs=origin_tol, direction_abs=direction_tol)
    try:
        report = check_manifest(manifest, tolerances=tol,
                                outcome_columns=[c for c in outcomes.split(",") if c] if outcomes else None,
                                progress=True)
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(format_problems(report))
    raise typer.Exit(1 if report.unusable_cases else 0)


@site_app.command("extract")
def site_extract(
    manifest: Path = typer.Argument(..., help="Site data manifest (CSV)."),
    params: Optional[str] = typer.Option(
        None, "--params", help="pyradiomics parameter file: 'ct' (default), 'mr' (shipped files) or a YAML path."),
    out: Path = typer.Option(..., "--out", help="Output table: .parquet or .csv."),
    jobs: int = typer.Option(0, "--jobs", help="Worker processes (default: number of cores)."),
    cache_dir: Optional[Path] = typer.Option(
        None, "--cache-dir", help="Feature cache directory (default: .fedrad-cache next to the manifest)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the feature cache."),
) -> None:
    """Extract pyradiomics features for every case of a manifest (in parallel, cached, crash-safe)."""
    from fedrad.client.extract import extract_manifest

    try:
        result = extract_manifest(manifest, params=params, out=out, jobs=jobs or None,
                                  cache_dir=cache_dir, use_cache=not no_cache, progress=True)
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(result.summary())
    raise typer.Exit(0 if result.n_ok > 0 else 1)


def _csv_list(text: Optional[str]) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()] if text else []


def _read_table(path: Path):
    import pandas as pd

    if not path.is_file():
        _fail(f"input table {path} not found")
    if path.suffix.lower() == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path, float_precision="round_trip")


@app.command("harmonize")
def harmonize(
    input: Path = typer.Argument(..., help="Feature table (.csv or .parquet), one row per case."),
    batch_col: str = typer.Option(..., "--batch-col", help="Column naming the batch (site/scanner)."),
    out: Path = typer.Option(..., "--out", help="Output table (.csv or .parquet): same columns and row order."),
    covariates: Optional[str] = typer.Option(None, "--covariates", help="Covariates to preserve, comma-separated."),
    categorical: Optional[str] = typer.Option(None, "--categorical", help="Which covariates are categorical."),
    features: Optional[str] = typer.Option(
        None, "--features", help="Columns to harmonize (default: pyradiomics-named columns, else all numeric)."),
    ref_batch: Optional[str] = typer.Option(None, "--ref-batch", help="Reference batch, left unchanged."),
    nonparametric: bool = typer.Option(False, "--nonparametric", help="Non-parametric empirical Bayes."),
    mean_only: bool = typer.Option(False, "--mean-only", help="Adjust location only, not scale."),
    no_eb: bool = typer.Option(False, "--no-eb", help="No empirical Bayes shrinkage (eb=False)."),
    federated: bool = typer.Option(
        False, "--federated", help="Each batch becomes a site; the federated protocol runs through Flower's "
        "message layer in-process (aggregates only between sites and coordinator)."),
    min_cell_size: Optional[int] = typer.Option(
        None, "--min-cell-size", help="Smallest batch a site describes (default 10 with --federated, else 2)."),
) -> None:
    """ComBat harmonization of a feature table (pooled, or federated with identical results)."""
    from fedrad.client.extract import write_table
    from fedrad.common.combat import CombatError
    from fedrad.local import harmonize_table
    from fedrad.server.federation import SiteError

    df = _read_table(input)
    cats = _csv_list(categorical)
    covs = list(dict.fromkeys(_csv_list(covariates) + cats))
    ref = ref_batch
    if ref is not None and batch_col in df.columns and df[batch_col].dtype.kind in "if":
        ref = type(df[batch_col].iloc[0].item())(ref_batch)
    if out.suffix.lower() not in (".csv", ".parquet"):
        _fail(f"output {out} must end in .csv or .parquet")
    try:
        result, info = harmonize_table(
            df, batch_col, _csv_list(features) or None, covs, cats, ref_batch=ref, eb=not no_eb,
            parametric=not nonparametric, mean_only=mean_only, federated=federated, min_cell_size=min_cell_size,
            log=lambda line: typer.echo(f"coordinator: {line}", err=True))
    except (CombatError, SiteError, ValueError) as exc:
        _fail(str(exc))
    write_table(result, out, {"harmonization": info["mode"]})
    ref_d = info["reference"]
    n_feat = len(ref_d.get("features", []))
    excluded = ref_d.get("excluded_features") or {}
    mode = (f"federated, {info['round_trips']} round trips" if info["mode"] == "federated" else "pooled")
    typer.echo(f"harmonized: {out} ({n_feat} features x {len(result)} rows, "
               f"{df[batch_col].nunique()} batches, {mode})")
    if excluded:
        shown = "; ".join(f"{k}: {v}" for k, v in list(excluded.items())[:5])
        typer.echo(f"left unchanged (zero variance): {len(excluded)} features ({shown})")


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
