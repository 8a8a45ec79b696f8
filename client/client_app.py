"""The site's Flower ClientApp: one thin handler per request type (logic in steps.py and fedrad.common)."""
from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedrad.client.site import Site
from fedrad.client.steps import STEPS
from fedrad.common.messages import from_record, request_name, to_record

app = ClientApp()


def _handle(msg: Message, context: Context) -> Message:
    request = request_name(msg.metadata.message_type)
    site = Site.from_node_config(context.node_config)
    reply = site.answer(request, from_record(msg.content), STEPS[request])
    return Message(to_record(reply), reply_to=msg)


@app.query("combat_stats")
def combat_stats(msg: Message, context: Context) -> Message:
    return _handle(msg, context)


@app.query("combat_apply")
def combat_apply(msg: Message, context: Context) -> Message:
    return _handle(msg, context)


@app.train("fit_round")
def fit_round(msg: Message, context: Context) -> Message:
    return _handle(msg, context)
