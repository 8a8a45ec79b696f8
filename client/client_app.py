"""The site's Flower ClientApp: one thin handler per request type (logic in steps.py, study_steps.py, common)."""
from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedrad.client.site import Site
from fedrad.client.steps import STEPS
from fedrad.client.study_steps import STUDY_STEPS
from fedrad.common.messages import REQUESTS, from_record, request_name, request_signature, to_record

app = ClientApp()
_ALL_STEPS = {**STEPS, **STUDY_STEPS}


def _handle(msg: Message, context: Context) -> Message:
    request = request_name(msg.metadata.message_type)
    site = Site.from_node_config(context.node_config, context.run_config)
    reply = site.answer(request, from_record(msg.content), _ALL_STEPS[request], auth=request_signature(msg.content),
                        node=context.node_id)
    return Message(to_record(reply), reply_to=msg)


def _register() -> None:
    """One handler per request type in :data:`fedrad.common.messages.REQUESTS` (``category.action``)."""
    for name, req in REQUESTS.items():
        if "." not in req.message_type:  # Flower's own strategies (FedAvg): handled by fedavg_train below
            continue
        if name not in _ALL_STEPS:
            raise RuntimeError(f"request type {name!r} has no site step")
        category, action = req.message_type.split(".")
        getattr(app, category)(action)(_handle)


_register()


def fedavg_train(msg: Message, context: Context) -> Message:
    """Flower's own FedAvg / FedProx strategies (approximate option of `fedrad fit --strategy`): a local update
    from the global weights; replies with the new weights and the number of rows (aggregates only)."""
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    from fedrad.client.steps import fedavg_update

    site = Site.from_node_config(context.node_config, context.run_config)
    weights = msg.content["arrays"]["weights"].numpy()
    config = dict(msg.content["config"])
    reply = site.answer("fedavg", {"weights": weights, "config": config, "plan": config.get("plan")}, fedavg_update)
    metrics = {"num-examples": int(reply["n"])}
    if config.get("uniform-weight"):  # DP: every site weighs the same (the noise calibration assumes it)
        metrics["site-weight"] = 1
    return Message(RecordDict({"arrays": ArrayRecord({"weights": Array(reply["weights"])}),
                               "metrics": MetricRecord(metrics)}), reply_to=msg)


# --- privacy options (docs/PRIVACY.md): one default "train" handler serves FedAvg and SecAgg+ -------------------
_SECAGG_RECORD = "secaggplus_configs"  # flwr.common.secure_aggregation.secaggplus_constants.RECORD_KEY_CONFIGS


def _secagg_mod(msg, ctxt, call_next):
    """Flower's ``secaggplus_mod`` for SecAgg+ messages only (it fails on FedAvg's plain train messages)."""
    if _SECAGG_RECORD in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def _clipping_mod(msg, ctxt, call_next):
    """Flower's ``fixedclipping_mod`` when the DP strategy sent a clipping norm (DifferentialPrivacyClientSide-
    FixedClipping); the site step already clipped identically, so the audited update is what leaves."""
    if _SECAGG_RECORD not in msg.content.config_records and any(
            "clipping_norm" in rec for rec in msg.content.config_records.values()):
        from flwr.clientapp.mod import fixedclipping_mod

        return fixedclipping_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def secure_train(msg: Message, context: Context) -> Message:
    """SecAgg+ "collect masked vectors" stage of `fedrad fit --secure-aggregation`: the site's sums for the
    request in the legacy FitIns config, as exact integer digits; ``secaggplus_mod`` masks them on the way out."""
    from flwr.app import ConfigRecord, RecordDict
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    from fedrad.client.steps import secure_fit_round
    from fedrad.common.privacy import digits_to_wire, encode_digits

    config = compat.recorddict_to_fitins(msg.content, keep_input=True).config
    payload = from_record(RecordDict({"meta": ConfigRecord(
        {k: config[k] for k in ("json", "array-index", "arrays") if k in config})}))
    site = Site.from_node_config(context.node_config, context.run_config)
    reply = site.answer("secure_fit_round", payload, secure_fit_round)
    request = payload["request"]
    digits = encode_digits(reply["sums"], request["layout"], request["bits"], site=site.name)
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([digits_to_wire(digits, request["bits"])]), 1,
                 {"site": site.name})
    return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)


@app.train(mods=[_secagg_mod, _clipping_mod])  # per handler: evaluate/query messages never see them
def train(msg: Message, context: Context) -> Message:
    """The default "train" handler (the only one Flower's SecAgg+ mod can secure): SecAgg+ rounds of the secure
    exact fit, else Flower's FedAvg / FedProx (with DP clipping when the strategy asks for it)."""
    if _SECAGG_RECORD in msg.content.config_records:
        return secure_train(msg, context)
    return fedavg_train(msg, context)
