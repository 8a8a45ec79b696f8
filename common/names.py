"""Column names a site must not take at face value: identifier-like names, identifier-like values, and names that
hide or imitate characters on a terminal.

*Identifier-like names* are matched token by token (a name is split on ``_``, ``-``, ``.``, spaces and other
punctuation, then on camelCase and digit boundaries, case-insensitively): ``MRN``, ``patient_dob``,
``BirthDate``, ``zip_code``, ``patientName`` match; ``original_shape_Elongation`` or ``original_glcm_Idmn``
do not (``name`` or ``dob`` inside a word is not a token). Such a column is never a candidate feature, and a plan
that names one as a variable is refused at approval unless the site's ``[columns]`` allow-list names it.

*Identifier-like values*: integer columns whose every value is a date ``yyyymmdd`` (1900-2100) are never
candidate features; near-unique integer columns (record numbers) are reported at approval.

*Unsafe names*: every name an operator reads at approval is printed with non-ASCII and control characters
escaped (:func:`shown`); a name holding a control or bidirectional-formatting character (which can reorder or
hide what a terminal shows) is refused, and a non-ASCII name is accepted only when the site's allow-list names it
exactly (it may imitate an ASCII name, e.g. a Cyrillic ``а`` in ``аge``).
"""
from __future__ import annotations

import re
import unicodedata

import numpy as np

#: whole name tokens that identify or date a patient
IDENTIFIER_TOKENS = frozenset({
    "mrn", "dob", "dod", "yob", "birth", "birthdate", "birthday", "dateofbirth", "deathdate",
    "zip", "zipcode", "postcode", "postal", "postalcode",
    "name", "names", "firstname", "lastname", "surname", "forename", "fullname", "givenname", "familyname",
    "initials", "address", "street", "phone", "telephone", "mobile", "fax", "email", "mail",
    "ssn", "nhs", "nhsnumber", "accession", "insurance", "passport", "identifier", "pid",
    "patientid", "subjectid", "personid", "recordid", "patientnumber",
    "date", "dates", "datetime", "timestamp", "yyyymmdd", "ddmmyyyy", "mmddyyyy"})
#: a token naming a person or record, followed by one saying "its number" (``patient_id``, ``record_no``)
_WHO = frozenset({"patient", "pat", "subject", "subj", "person", "participant", "record", "hospital", "medical",
                  "case", "study"})
_NUMBER = frozenset({"id", "ids", "number", "no", "nr", "num", "code", "key"})
_TOKEN = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")
#: bidirectional formatting characters (they reorder what a terminal shows)
BIDI = frozenset(chr(c) for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C])
#: letters of other scripts that look like ASCII ones (the usual Cyrillic and Greek look-alikes)
_LOOKALIKE = str.maketrans("аеорсухіјѕԁһӏԛԝАВЕКМНОРСТХІЈЅΑΒΕΖΗΙΚΜΝΟΡΤΥΧονα",
                           "aeopcyxijsdhlqwABEKMHOPCTXIJSABEZHIKMNOPTYXova")


def name_tokens(name) -> list[str]:
    """The lower-case tokens of a column name: split on every non-alphanumeric character, then on camelCase and
    digit boundaries (``patientDOB_2`` -> patient, dob, 2)."""
    return [t.lower() for part in re.split(r"[^A-Za-z0-9]+", str(name)) for t in _TOKEN.findall(part)]


def identifier_like(name) -> bool:
    """Whether a column name (or the ASCII name it imitates) has a token that identifies or dates a patient."""
    for text in {str(name), imitated(name)}:
        tokens = name_tokens(text)
        if any(t in IDENTIFIER_TOKENS for t in tokens):
            return True
        if any(a in _WHO and b in _NUMBER for a, b in zip(tokens, tokens[1:])):
            return True
    return False


def shown(name) -> str:
    """``name`` as printed at approval: printable ASCII as is, a backslash doubled, everything else escaped
    (``\\u0430ge``, ``\\u202e``, ``\\x1b``)."""
    out = []
    for ch in str(name):
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif 32 <= code < 127:
            out.append(ch)
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def quoted(name) -> str:
    return f"'{shown(name)}'"


def unsafe_character(name) -> str | None:
    """The first control, format or bidirectional character of ``name`` (Unicode category Cc or Cf), else None."""
    for ch in str(name):
        if ch in BIDI or unicodedata.category(ch) in ("Cc", "Cf"):
            return ch
    return None


def is_ascii(name) -> bool:
    return all(32 <= ord(ch) < 127 for ch in str(name))


def imitated(name) -> str:
    """The ASCII text a name may pass for: look-alike letters mapped, accents stripped (``аge`` -> ``age``)."""
    text = unicodedata.normalize("NFKD", str(name).translate(_LOOKALIKE))
    return "".join(ch for ch in text if not unicodedata.combining(ch))


def unsafe_reason(name) -> str | None:
    """Why ``name`` cannot be shown to an operator as it is: a control character, or non-ASCII text."""
    bad = unsafe_character(name)
    if bad is not None:
        kind = "a bidirectional-formatting" if bad in BIDI else "a control"
        return f"contains {kind} character (U+{ord(bad):04X}) that can hide or reorder what a terminal shows"
    if not is_ascii(name):
        fake = imitated(name)
        like = f"; it may imitate '{fake}'" if is_ascii(fake) and fake != name else ""
        return f"contains non-ASCII characters{like}"
    return None


# --- endpoint-like names ------------------------------------------------------------------------------------------
#: whole column names (case-insensitive) that are endpoint or follow-up columns: lifelines' ``T``/``E``, a bare ``y``
ENDPOINT_NAMES = frozenset({"t", "e", "y", "time", "times", "event", "events", "status", "death", "dead",
                            "censor", "censored", "label", "target", "outcome", "response", "duration", "futime",
                            "fustat", "ttp", "os", "pfs", "dfs", "rfs", "efs"})
#: name tokens that denote an endpoint or follow-up column of any kind (survival, response, recurrence)
ENDPOINT_TOKENS = frozenset({
    "os", "pfs", "dfs", "rfs", "efs", "dss", "mfs", "lrc", "ttp", "ttf", "ttr", "css", "fu",
    "survival", "surv", "survived", "death", "deaths", "dead", "deceased", "died", "mortality", "alive",
    "censor", "censored", "censoring", "vital", "event", "events", "status", "futime", "fustat",
    "recurrence", "recurred", "recur", "relapse", "relapsed", "progression", "progressed", "followup",
    "response", "responder", "responders", "outcome", "outcomes", "label", "target"})


def endpoint_like(name) -> bool:
    """Whether a column name denotes an endpoint or follow-up column (a second endpoint in the same table leaks
    the outcome into a signature): a whole name of :data:`ENDPOINT_NAMES`, a token of :data:`ENDPOINT_TOKENS`, or
    ``follow up`` / ``time to ...`` as consecutive tokens. Tokens as for :func:`name_tokens`, so a feature such
    as ``T1_ED_Histogram_SeventyFifthPercentile`` (tokens t, ed, histogram, seventy, fifth, percentile) is not one."""
    text = str(name).strip().lower()
    if text in ENDPOINT_NAMES:
        return True
    tokens = name_tokens(name)
    if any(t in ENDPOINT_TOKENS for t in tokens):
        return True
    return any((a, b) in {("follow", "up"), ("time", "to")} for a, b in zip(tokens, tokens[1:]))


# --- values -------------------------------------------------------------------------------------------------------
#: the dates a yyyymmdd integer column may hold
DATE_RANGE = (19000101, 21001231)
#: a table of at least this many rows whose integer column has at least this share of distinct values is
#: near-unique (a record number rather than a measurement)
NEAR_UNIQUE_ROWS, NEAR_UNIQUE_SHARE = 20, 0.95


def value_flags(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column of a float matrix (NaN: missing): ``(date_like, near_unique)``. Date-like: every observed value
    an integer ``yyyymmdd`` in :data:`DATE_RANGE` with a month 1-12 and a day 1-31; near-unique: integer-valued
    with at least :data:`NEAR_UNIQUE_SHARE` distinct values among at least :data:`NEAR_UNIQUE_ROWS` observed."""
    x = np.asarray(block, dtype=float)
    if x.ndim != 2 or x.shape[1] == 0:
        return np.zeros(0, bool), np.zeros(0, bool)
    seen = np.isfinite(x)
    filled = np.where(seen, x, 0.0)
    integral = np.where(seen, filled == np.round(filled), True).all(axis=0) & seen.any(axis=0)
    month, day = (filled // 100) % 100, filled % 100
    date = ((filled >= DATE_RANGE[0]) & (filled <= DATE_RANGE[1]) & (month >= 1) & (month <= 12)
            & (day >= 1) & (day <= 31))
    date_like = integral & np.where(seen, date, True).all(axis=0)
    near = np.zeros(x.shape[1], bool)
    for j in np.flatnonzero(integral & (seen.sum(axis=0) >= NEAR_UNIQUE_ROWS)):
        values = x[seen[:, j], j]
        near[j] = len(np.unique(values)) >= NEAR_UNIQUE_SHARE * len(values)
    return date_like, near
