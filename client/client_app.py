"""The site's Flower ClientApp: one thin handler per request type (logic in steps.py, study_steps.py, common)."""
from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedrad.client.site import Site
from fedrad.client.steps import STEPS
from fedrad.client.study_steps import STUDY_STEPS
from fedrad.common.messages import REQUESTS, from_record, request_name, to_record

app = ClientApp()
_ALL_STEPS = {**STEPS, **STUDY_STEPS}


def _handle(msg: Message, context: Context) -> Message:
    request = request_name(msg.metadata.message_type)
    site = Site.from_node_config(context.node_config, context.run_config)
    reply = site.answer(request, from_record(msg.content), _ALL_STEPS[request])
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


@app.train()
def fedavg_train(msg: Message, context: Context) -> Message:
    """Flower's own FedAvg / FedProx strategies (approximate option of `fedrad fit --strategy`): a local update
    from the global weights; replies with the new weights and the number of rows (aggregates only)."""
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    from fedrad.client.steps import fedavg_update

    site = Site.from_node_config(context.node_config, context.run_config)
    weights = msg.content["arrays"]["weights"].numpy()
    config = dict(msg.content["config"])
    reply = site.answer("fedavg", {"weights": weights, "config": config}, fedavg_update)
    return Message(RecordDict({"arrays": ArrayRecord({"weights": Array(reply["weights"])}),
                               "metrics": MetricRecord({"num-examples": int(reply["n"])})}), reply_to=msg)
