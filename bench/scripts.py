"""The scripted conversations the benchmarks play (stdlib and pydantic only: cheap to import).

:mod:`bench.naive_agent` imports this in a process the benchmark starts and kills many times,
so it stays free of Temporal and the rest of Spine.
"""

from __future__ import annotations

from spine.contract import ScriptToolCall, ScriptTurn, TokenUsage

#: Refund per run: at most 100.00 and proposed with confidence 0.9, so no approval is needed,
#: and small enough that a duplicate still fits in the order's 250.00 (so it shows up).
REFUND = 40.0
#: Tokens each scripted turn reports; small, so thousands of runs stay far inside any budget.
TOKENS = (50, 10)


def turn(*calls: ScriptToolCall, text: str | None = None, confidence: float | None = None):
    return ScriptTurn(
        text=text,
        tool_calls=list(calls),
        confidence=confidence,
        usage=TokenUsage(input_tokens=TOKENS[0], output_tokens=TOKENS[1]),
    )


def call(name: str, **args: object) -> ScriptToolCall:
    return ScriptToolCall(name=name, args=args)


def refund_script(order: str) -> list[ScriptTurn]:
    """The 10-turn refund conversation every arm plays: 9 tool calls, then the final answer.

    lookup, refund (40.00 at confidence 0.9: no approval), email, ticket, five checking lookups.
    """
    return [
        turn(call("lookup_order", order_id=order)),
        turn(
            call("issue_refund", order_id=order, amount=REFUND, reason="arrived broken"),
            confidence=0.9,
        ),
        turn(
            call(
                "send_email",
                order_id=order,
                subject="Your refund",
                body=f"We refunded {REFUND:.2f} for your broken order.",
            )
        ),
        turn(call("update_ticket", order_id=order, status="resolved", note=f"refunded {REFUND}")),
        *(turn(call("lookup_order", order_id=order)) for _ in range(5)),
        turn(text=f"Refunded {REFUND:.2f} for {order}, emailed the customer, resolved the ticket."),
    ]
