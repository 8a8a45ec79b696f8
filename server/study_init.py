"""``fedrad study init TABLE...``: a commented ``study.toml`` drafted from the sites' feature tables.

The draft is a starting point a coordinator edits, not a decision: it names what the tables' columns look like
(an id column, binary outcome candidates, survival time/event pairs, clinical columns, a tumour-volume column)
and writes every section of :mod:`fedrad.server.study_config` with its keys commented, so that nothing has to be
looked up to change it. Detection uses the same rules the sites apply: identifier-like names
(:func:`fedrad.common.names.identifier_like`), endpoint-like names (:func:`fedrad.common.names.endpoint_like`)
and the volume column (:func:`fedrad.common.plan.volume_column`). The file validates as it is
(:func:`fedrad.server.study_config.load_study`); a deployment still needs the ``[coordinator]`` key line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

#: column names (lower case) of clinical covariates a study usually adjusts for
CLINICAL_NAMES = ("age", "sex", "gender", "stage", "t_stage", "n_stage", "m_stage", "grade", "smoking", "smoker",
                  "bmi", "ecog", "performance_status", "hpv", "histology")
#: name tokens of a survival time column (with an endpoint-like name)
TIME_TOKENS = frozenset({"time", "times", "months", "month", "days", "day", "years", "year", "weeks", "futime",
                         "duration", "followup", "fu"})
#: name tokens of a survival event column (a 0/1 column)
EVENT_TOKENS = frozenset({"event", "events", "status", "death", "dead", "died", "censor", "censored", "fustat",
                          "vital", "progression", "recurrence", "relapse"})


#: name tokens of radiomic feature classes (pyradiomics, MIRP, LIFEx): such a column is a feature, not an outcome
FEATURE_CLASSES = frozenset({"shape", "shape2d", "firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm", "morph",
                             "stat", "ih", "ivh", "cm", "rlm", "szm", "dzm", "ngt", "ngl", "loc", "histo",
                             "conventional", "discretized"})


class InitError(ValueError):
    """A table cannot be read, or the tables have no columns in common (the message names which)."""


@dataclass
class Columns:
    """What the tables' shared columns look like."""

    id: str | None = None
    binary: list[str] = field(default_factory=list)
    survival: list[tuple[str, str]] = field(default_factory=list)  # (time, event)
    continuous: list[str] = field(default_factory=list)  # numeric non-feature candidates (scores)
    clinical: list[str] = field(default_factory=list)
    categorical: list[str] = field(default_factory=list)
    volume: str | None = None
    n_features: int = 0


def read_table(path: Path, rows: int = 2000) -> pd.DataFrame:
    """The first ``rows`` rows of a CSV or parquet feature table."""
    path = Path(path)
    if not path.is_file():
        raise InitError(f"table {path} not found")
    try:
        if path.suffix.lower() == ".parquet":
            return pd.read_parquet(path).head(rows)
        return pd.read_csv(path, nrows=rows)
    except Exception as exc:  # a table pandas cannot parse: say which and why, in one line
        raise InitError(f"cannot read table {path}: {' '.join(str(exc).split())[:300]}") from None


def _binary(s: pd.Series) -> bool:
    values = set(pd.unique(s.dropna()))
    return len(values) == 2 and values <= {0, 1, True, False, 0.0, 1.0}


def detect(tables: list[pd.DataFrame]) -> Columns:
    """The roles of the columns every table has (a column missing at one site cannot be used)."""
    from fedrad.common.names import endpoint_like, identifier_like, name_tokens
    from fedrad.common.plan import IDENTIFYING_COLUMNS, volume_column

    shared = [c for c in tables[0].columns if all(c in t.columns for t in tables[1:])]
    if not shared:
        raise InitError("the tables have no column in common: every site's table needs the same column names")
    df = pd.concat([t[shared] for t in tables], ignore_index=True)
    cols = Columns()
    ids = [c for c in shared if str(c).lower() in IDENTIFYING_COLUMNS or identifier_like(c)]
    cols.id = next((c for c in ids if str(c).lower() in ("case_id", "patient_id")), ids[0] if ids else None)
    numeric = [c for c in shared if pd.api.types.is_numeric_dtype(df[c]) and c not in ids]
    lower = {str(c).lower(): c for c in shared}
    cols.clinical = [lower[n] for n in CLINICAL_NAMES if n in lower]
    cols.categorical = [c for c in cols.clinical if not pd.api.types.is_numeric_dtype(df[c])]
    used = set(ids) | set(cols.clinical)
    events = [c for c in numeric if _binary(df[c]) and set(name_tokens(c)) & EVENT_TOKENS]
    times = [c for c in numeric if c not in events and endpoint_like(c) and set(name_tokens(c)) & TIME_TOKENS
             and (df[c].dropna() >= 0).all()]
    for event in events:
        head = name_tokens(event)[0]
        time = next((t for t in times if name_tokens(t)[0] == head), None)
        if time is not None:
            cols.survival.append((time, event))
            used |= {time, event}
    cols.binary = [c for c in numeric if c not in used and _binary(df[c])]
    used |= set(cols.binary)
    cols.volume = volume_column(df[[c for c in numeric if c not in used]])
    rest = [c for c in numeric if c not in used and c != cols.volume]
    # a numeric column that is no pyradiomics-style feature (IMAGE_CLASS_NAME): a score, a lab value
    cols.continuous = [c for c in rest if not (set(name_tokens(c)) & FEATURE_CLASSES)]
    cols.n_features = len([c for c in rest if c not in cols.continuous])
    return cols


def site_names(paths: list[Path]) -> list[str]:
    """A site name per table: the file names when they differ (hosp_a.csv, hosp_b.csv), else the folders'
    (site1/features.csv, site2/features.csv); as bare TOML keys, made unique."""
    import re

    raw = [p.stem for p in paths] if len({p.stem for p in paths}) == len(paths) else [p.parent.name for p in paths]
    names: list[str] = []
    for r in raw:
        name = re.sub(r"[^A-Za-z0-9_-]+", "-", r).strip("-") or "site"
        base, k = name, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def _list(items) -> str:
    return "[" + ", ".join(json.dumps(str(i)) for i in items) + "]"


def draft_study(tables: list[Path], out: Path) -> str:
    """The text of a commented study.toml for ``tables`` (one site each), to be written to ``out``."""
    paths = [Path(t) for t in tables]
    frames = [read_table(p) for p in paths]
    cols = detect(frames)
    names = site_names(paths)
    rel = [str(p.resolve()) for p in paths]  # absolute: a rehearsal reads them from wherever it is started
    response = next((c for c in cols.binary if "response" in str(c).lower()), cols.binary[0] if cols.binary else None)
    if response is not None:
        endpoint = f'type = "response"\noutcome = "{response}"'
        kind = "response"
    elif cols.survival:
        endpoint = f'type = "survival"\ntime = "{cols.survival[0][0]}"\nevent = "{cols.survival[0][1]}"'
        kind = "survival"
    elif cols.continuous:
        endpoint = f'type = "continuous"\noutcome = "{cols.continuous[0]}"'
        kind = "continuous"
    else:
        raise InitError("no outcome column found (a 0/1 column, a survival time + event pair, or a numeric score): "
                        "add the outcome to the tables, or write study.toml from examples/")
    others = [c for c in cols.binary if c != response] + [c for pair in cols.survival for c in pair]
    if kind == "survival":
        others = [c for c in others if c not in cols.survival[0]]
    alternatives = []
    if cols.binary:
        alternatives += [f'# type = "response"; outcome = "{c}"' for c in cols.binary if c != response]
    alternatives += [f'# type = "survival"; time = "{t}"; event = "{e}"' for t, e in cols.survival]
    alternatives += [f'# type = "continuous"; outcome = "{c}"' for c in cols.continuous[:5]
                     if not (kind == "continuous" and c == cols.continuous[0])]
    if kind != "response" and response:
        alternatives.insert(0, f'# type = "response"; outcome = "{response}"')
    covariates = [c for c in cols.clinical if str(c).lower() in ("age", "sex", "gender")]
    categorical = [c for c in cols.categorical if c in covariates]
    lines = [
        f"# study.toml drafted by `fedrad study init` from {len(paths)} table(s); edit, then",
        "#   fedrad study run study.toml --runtime local      (a rehearsal with the tables below, on this machine)",
        "#   fedrad site approve study.toml --config site.toml (at each site), then",
        "#   fedrad study run study.toml --home COORD          (the real study over the joined sites)",
        "# Every key: fedrad/server/study_config.py; complete examples: examples/ in the fedrad repository.",
        f"# Detected: id column {cols.id or 'none'}; outcome candidates (0/1) {', '.join(cols.binary) or 'none'}; "
        f"survival pairs {', '.join(f'{t}/{e}' for t, e in cols.survival) or 'none'};",
        f"#   clinical {', '.join(cols.clinical) or 'none'}; volume {cols.volume or 'none'}; "
        f"{cols.n_features} candidate feature column(s).",
        "",
        "[coordinator]",
        "# The coordinator's public signing key: sites answer only requests signed by it, and `fedrad site",
        "# approve` refuses a plan without one. Paste the line `fedrad coordinator keys --home COORD` prints:",
        '# key = "ssh-ed25519 AAAA..."',
        "",
        "[study]",
        f'name = "{kind} study"',
        'output = "results"                  # results.json and report.html (relative to this file)',
        f"min_sites = {min(3, max(2, len(paths)))}"
        "                        # quorum: fewer answering sites stop the study",
        '# kind = "association"              # radiogenomics (features x markers, see [association]) instead',
        "",
        "[endpoint]",
        *endpoint.splitlines(),
        *(["# alternatives found in the tables:"] + alternatives if alternatives else []),
        "",
        "# The sites taking part; `table` is for rehearsals on this machine only (a deployment ignores it: each",
        "# site's data comes from its own site.toml, never from the plan). source = \"ALIAS\" picks one of a",
        "# site's [sources] instead of its default table.",
        *[f'[sites.{n}]\ntable = "{r}"' for n, r in zip(names, rel)],
        "",
        "[harmonization]                     # ComBat across sites (batch = a site, or a site column: scanner)",
        f"enabled = {'true' if len(paths) > 1 else 'false'}",
        f"covariates = {_list(covariates)}   # biological covariates ComBat preserves",
        f"categorical = {_list(categorical)}",
        '# batch = "scanner"                 # batches within sites',
        "",
        "[selection]",
        "# Features: every numeric column that is no id, endpoint, clinical or endpoint-like column.",
        f"exclude = {_list(others)}   # the tables' other outcome columns: never features",
        *([f"# numeric columns named like no radiomic feature (scores, lab values?): "
           f"{', '.join(map(str, cols.continuous[:8]))}", "#   add those that are no features to exclude"]
          if cols.continuous else []),
        "fdr = 0.05                          # univariate screening, Benjamini-Hochberg",
        "redundancy = 0.9                    # |r| above which one of a pair is dropped",
        "max_features = 10",
        '# feature_columns = ["original_*"]  # only these (glob patterns)',
        "",
        "[model]",
        'penalty = "l2"                      # "l2", "l1", "elasticnet"',
        f"clinical = {_list([c for c in cols.clinical if c not in cols.categorical])}"
        "   # numeric covariates of the clinical baseline and the composite model",
        (f'volume = "{cols.volume}"' if cols.volume else "# volume = \"original_shape_VoxelVolume\"")
        + "   # the volume baseline's column",
        "# grid = [0.01, 0.1, 1.0]           # a fixed penalty grid instead of the data-driven path",
        "",
        "[validation]",
        "loso = true                         # leave-one-site-out external validation",
        "inner_folds = 3                     # federated k-fold CV within the training sites (penalty choice)",
        "seed = 0",
        "",
        "# [association]                     # with [study] kind = \"association\"",
        f"# markers = {_list(cols.binary[:2] or ['marker'])}",
        "# volume_adjusted = true",
    ]
    return "\n".join(lines) + "\n"
