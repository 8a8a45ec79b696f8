"""Message schemas: every request type a site answers, and the one codec between payloads and Flower records.

A *payload* is a plain dict: string keys, values that are numpy arrays, numbers, strings, booleans, None, or
(nested) lists/dicts of those. The math in :mod:`fedrad.common` only ever sees payloads; this module is the
only place that builds or reads Flower ``RecordDict`` objects (Flower is imported lazily, so importing this
module for :data:`REQUESTS` does not pull Flower in).

Encoding: one ``ConfigRecord`` (``"meta"``) holding the payload as a JSON document (key ``"json"``) in which
each array is replaced by ``{"__array__": key}``, and all arrays' raw bytes concatenated in a single bytes value
(key ``"arrays"``) with a JSON index of key, dtype, shape and offset (key ``"array-index"``; numeric dtypes
only, no pickle). One object per
message matters: Flower transfers every Array of an ArrayRecord as a separate object, and a study's batched
model round carries thousands of small arrays. JSON keeps exact float64 values (Python's ``repr``) and the
archive keeps the arrays' bytes, so a payload round-trips bit for bit.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RequestType:
    """A request a site can answer: Flower message type and what its reply holds."""

    message_type: str
    summary: str
    aggregates: str


#: Every request type a site agent answers (the site's allow-list is a subset of these names).
REQUESTS: dict[str, RequestType] = {
    "combat_stats": RequestType(
        "query.combat_stats",
        "ComBat round 1: the site's sufficient statistics for the pooled regression",
        "n, design cross-product X'X, X'Y, feature sums and centred sums of squares per feature",
    ),
    "combat_apply": RequestType(
        "query.combat_apply",
        "ComBat round 2: given the global fit, the site standardizes, estimates its batch effect with "
        "empirical Bayes and harmonizes locally; replies with its residual sum of squares check",
        "n and per-feature counts only; harmonized rows stay at the site",
    ),
    "fit_round": RequestType(
        "train.fit_round",
        "one step of every model fit the coordinator is running (all folds and penalties batched): "
        "round 1 standardization statistics, then Newton steps at the sent coefficients",
        "n, class or event counts, centred feature sums and cross-products; log-likelihood, gradient "
        "and Hessian at the sent coefficients",
    ),
    "fedavg": RequestType(
        "train",
        "approximate option: FedAvg / FedProx local update (Flower's own strategies) from the global weights",
        "the updated weight vector and the number of rows",
    ),
    "secure_fit_round": RequestType(
        "train",
        "secure option of the exact logistic fit (SecAgg+): one round's sums, masked so that the coordinator "
        "only learns their total over all sites",
        "n, class count, feature sums; sums of centred cross-products; log-likelihood, gradient and Hessian at "
        "the sent coefficients - each as this site's masked share of the all-site total",
    ),
    "study_prepare": RequestType(
        "query.study_prepare",
        "make the study's table at the site (extract its manifest or take its feature table), check columns",
        "row count, outcome counts (each withheld below the minimum cell size), candidate feature names, "
        "extraction parameter hash, cohort summary (counts under k withheld, with their complements), "
        "per-feature n / mean / variance of the raw table, software versions",
    ),
    "study_harmonize": RequestType(
        "query.study_harmonize",
        "harmonize the site's table against every validation fold's ComBat fit; tables stay at the site",
        "per fold: row count and locally excluded features; per-feature n / mean / variance of the final "
        "fold's harmonized table; the selection's score-test sums",
    ),
    "study_select": RequestType(
        "query.study_select",
        "feature-selection statistics for every fold the site trains in",
        "per fold: univariate score-test sums and information, centred cross-product matrix, counts",
    ),
    "study_evaluate": RequestType(
        "evaluate.study_evaluate",
        "inner cross-validation losses (training sites) and validation metrics of every model variant "
        "computed on the site's own rows (held-out sites)",
        "one summed held-out loss per inner fit (withheld below the minimum cell size); AUC/C-index with CI, "
        "Brier, calibration, HR and log-rank p, paired differences; binned ROC and Kaplan-Meier counts with "
        "small cells merged; continuous outcome: R², RMSE, MAE, calibration, Pearson / Spearman, calibration "
        "groups of at least k patients",
    ),
    "study_associate": RequestType(
        "query.study_associate",
        "association study: feature x marker statistics of the site's harmonized table, adjusted for the "
        "plan's covariates (and tumour volume) with a site intercept",
        "n; within-site centred cross-products feature x marker, feature x covariate, marker x marker, "
        "marker x covariate, covariate x covariate and the features' sums of squares (no feature x feature "
        "block); Spearman correlation per feature and marker; a binary marker with a level under k withheld",
    ),
}


def message_type(request: str) -> str:
    """Flower message type of a request name (``combat_stats`` -> ``query.combat_stats``)."""
    try:
        return REQUESTS[request].message_type
    except KeyError:
        raise ValueError(f"unknown request type {request!r}; known: {', '.join(REQUESTS)}") from None


def request_name(message_type_: str) -> str:
    for name, req in REQUESTS.items():
        if req.message_type == message_type_:
            return name
    raise ValueError(f"unknown message type {message_type_!r}")


_PLAIN = frozenset((str, int, bool, type(None)))


def _plain_list(obj) -> bool:
    """A list of plain strings, ints, bools, None and finite floats (no container, no numpy value): sent as is."""
    for v in obj:
        t = type(v)
        if t is float:
            if v - v != 0.0:  # inf or nan
                return False
        elif t not in _PLAIN:
            return False
    return True


def _split(obj, arrays: dict, prefix: str):
    if type(obj) is list and _plain_list(obj):  # the common case of long lists (names, per-feature values)
        return obj
    if isinstance(obj, np.ndarray):
        key = prefix or "_"
        arrays[key] = np.ascontiguousarray(obj)
        return {"__array__": key}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"payload keys must be strings, got {k!r}")
            t = type(v)
            out[k] = v if t in _PLAIN or (t is float and v - v == 0.0) else _split(
                v, arrays, f"{prefix}/{k}" if prefix else k)
        return out
    if isinstance(obj, (list, tuple)):
        return [_split(v, arrays, f"{prefix}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (str, bool, int, float)):
        if isinstance(obj, float) and not np.isfinite(obj):
            raise ValueError(f"payload value at {prefix!r} is {obj}: refusing to send a non-finite number")
        return obj
    raise TypeError(f"payload value at {prefix!r} has unsupported type {type(obj).__name__}")


def to_plain(obj, keep_arrays: bool = False):
    """Numbers and containers as plain Python for JSON: numpy scalars -> Python, tuples -> lists, non-finite
    floats -> None, named tuples -> dicts; numpy arrays -> lists (or kept, for a payload, with ``keep_arrays``)."""
    import math

    if isinstance(obj, dict):
        return {str(k): to_plain(v, keep_arrays) for k, v in obj.items()}
    if hasattr(obj, "_asdict"):
        return to_plain(obj._asdict(), keep_arrays)
    if isinstance(obj, (list, tuple)):
        return [to_plain(v, keep_arrays) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj if keep_arrays else to_plain(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def split_payload(payload: dict) -> tuple[str, dict[str, np.ndarray]]:
    """(JSON skeleton, arrays) of a payload: the Flower-free half of the codec, also used by audit logs."""
    arrays: dict[str, np.ndarray] = {}
    skeleton = _split(payload, arrays, "")
    return json.dumps(skeleton, allow_nan=False), arrays


def join_payload(skeleton: str, arrays: dict[str, np.ndarray]) -> dict:
    if not arrays and '"__array__"' not in skeleton:
        return json.loads(skeleton)

    if skeleton.count('"__array__"') == len(arrays):  # every marker is an array's: put each at its key's path
        payload = json.loads(skeleton)
        if _place_arrays(payload, arrays):
            return payload

    def array_or_dict(obj: dict):  # the parser calls it for every object, innermost first
        return arrays[obj["__array__"]] if len(obj) == 1 and "__array__" in obj else obj

    return json.loads(skeleton, object_hook=array_or_dict)


def _place_arrays(payload: dict, arrays: dict[str, np.ndarray]) -> bool:
    """Replace each array's marker ``{"__array__": key}`` in a parsed payload, found by the path its key spells
    (:func:`_split`: dict keys and list indices joined by ``/``); False, with nothing replaced, when a key does not
    lead to its marker (a dict key containing ``/``): the caller then parses with a hook on every object."""
    spots = []
    for key in arrays:
        parent, step = None, None
        node = payload
        for part in key.split("/"):
            if isinstance(node, dict) and part in node:
                parent, step, node = node, part, node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                parent, step, node = node, int(part), node[int(part)]
            else:
                return False
        if parent is None or node != {"__array__": key}:
            return False
        spots.append((parent, step, key))
    for parent, step, key in spots:
        parent[step] = arrays[key]
    return True


def _pack(arrays: dict[str, np.ndarray]) -> tuple[list, bytes]:
    """All arrays as one byte string plus an index ``[[key, dtype, shape, offset], ...]``."""
    index, chunks, offset = [], [], 0
    for key, a in arrays.items():
        if a.dtype.hasobject:
            raise TypeError(f"payload array {key!r} has dtype object; send numbers")
        raw = np.ascontiguousarray(a).tobytes()
        index.append([key, a.dtype.str, list(a.shape), offset])
        chunks.append(raw)
        offset += len(raw)
    return index, b"".join(chunks)


def _unpack(index: list, blob: bytes) -> dict[str, np.ndarray]:
    out = {}
    for key, dtype, shape, offset in index:
        dt = np.dtype(dtype)
        count = int(np.prod(shape)) if shape else 1
        out[key] = np.frombuffer(blob, dtype=dt, count=count, offset=offset).reshape(shape).copy()
    return out


def to_record(payload: dict):
    """Payload -> Flower ``RecordDict`` (one ConfigRecord: JSON skeleton + one array archive)."""
    from flwr.app import ConfigRecord, RecordDict

    skeleton, arrays = split_payload(payload)
    index, blob = _pack(arrays)
    meta = {"json": skeleton, "array-index": json.dumps(index)}
    if arrays:
        meta["arrays"] = blob
    return RecordDict({"meta": ConfigRecord(meta)})


def from_record(record) -> dict:
    """Flower ``RecordDict`` -> payload."""
    if "meta" not in record:
        raise ValueError("message has no fedrad payload (missing 'meta' record)")
    meta = record["meta"]
    index = json.loads(str(meta["array-index"])) if "array-index" in meta else []
    arrays = _unpack(index, bytes(meta["arrays"])) if index else {}
    return join_payload(str(meta["json"]), arrays)


#: the record holding a request's signature (:mod:`fedrad.common.signing`); ``meta`` holds the payload
AUTH_RECORD = "auth"


def payload_digest(record) -> str:
    """SHA-256 (hex) of a record's encoded payload (JSON skeleton, array index, array bytes; length-prefixed)."""
    import hashlib

    meta = record["meta"]
    h = hashlib.sha256()
    for key in ("json", "array-index", "arrays"):
        value = meta[key] if key in meta else b""
        raw = value.encode() if isinstance(value, str) else bytes(value)
        h.update(key.encode() + b"\0" + len(raw).to_bytes(8, "big") + raw)
    return h.hexdigest()


def attach_signature(record, signature: bytes, session: str, seq: int) -> None:
    """Add the coordinator's signature of a request to its record (in place)."""
    from flwr.app import ConfigRecord

    record[AUTH_RECORD] = ConfigRecord({"signature": bytes(signature), "session": str(session), "seq": int(seq)})


def request_signature(record) -> dict | None:
    """``{"signature", "session", "seq", "digest"}`` of a received request, or None when it carries none."""
    if AUTH_RECORD not in record.config_records:
        return None
    auth = record.config_records[AUTH_RECORD]
    try:
        return {"signature": bytes(auth["signature"]), "session": str(auth["session"]), "seq": int(auth["seq"]),
                "digest": payload_digest(record)}
    except (KeyError, TypeError, ValueError):
        return {"signature": b"", "session": "", "seq": -1, "digest": ""}
