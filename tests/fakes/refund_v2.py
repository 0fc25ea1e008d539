"""The demo's refund agent as a later deployment serves it: `lookup_order` moved to version 2.

Used as ``SPINE_AGENTS=tests.fakes.refund_v2`` to show that a run pinned to version 1 cannot be
forked onto workers that no longer serve it.
"""

from __future__ import annotations

from dataclasses import replace

from spine.activities.tools import Registry
from spine.demo import agent as demo

lookup_order_v2 = replace(demo.lookup_order, version=2)


def register(registry: Registry) -> None:
    """The demo's tools and agent, with `lookup_order` at version 2 only."""
    for definition in (
        lookup_order_v2,
        demo.fetch_document,
        demo.issue_refund,
        demo.reverse_refund,
        demo.send_email,
        demo.send_correction_email,
        demo.update_ticket,
        demo.issue_store_credit,
        demo.find_store_credit,
        demo.void_store_credit,
        demo.file_inspection,
        demo.withdraw_inspection,
        demo.inspect_damage,
    ):
        registry.add_tool(definition)
    registry.add_agent(demo.REFUND_AGENT)
    registry.add_agent(demo.INSPECTION_AGENT)
