"""The pipeline summary computed in Python, as the system we replace computed
it, and hypothesis strategies for the data it is checked on.

The email key is `email.strip().lower()`, literally: strip() removes every
character for which str.isspace() is true, at both ends. The strategies pad
addresses with each of those characters, vary the case, and produce NULL,
empty and all-whitespace emails.
"""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal
from typing import Any

from hypothesis import strategies as st

STAGES = ["QUOTED", "NEGOTIATING", "BOOKED", "PAID", "TRAVELLED", "LOST"]
OPEN = {"QUOTED", "NEGOTIATING", "BOOKED", "PAID"}
CURRENCIES = ["EUR", "USD", "JPY"]
# A small pool of addresses, so that clients and quotes match often.
BASE_EMAILS = ["ann@x.io", "bob@x.io", "cy@y.org"]
# Every character Python's str.strip() removes (tab, CR, LF, NBSP, U+3000, ...).
WHITESPACE = [chr(c) for c in range(0x110000) if chr(c).isspace()]
# Not whitespace to str.strip(), though they look like it: they stay in the key.
LOOKALIKES = ["\u200b", "\ufeff", "\u180e"]


def email_key(email: str | None) -> str | None:
    """The key that matches a client to its quotes; None matches nothing."""
    return (email or "").strip().lower() or None


padding = st.lists(st.sampled_from(WHITESPACE), max_size=3).map("".join)


@st.composite
def emails(draw: st.DrawFn) -> str | None:
    """An address in random case, padded with any whitespace at both ends; or
    NULL, empty, all-whitespace, or padded with a lookalike that is not
    whitespace (a different key)."""
    kind = draw(st.sampled_from(["address"] * 6 + ["null", "blank", "lookalike"]))
    if kind == "null":
        return None
    if kind == "blank":
        return draw(padding)
    base = draw(st.sampled_from(BASE_EMAILS))
    cased = "".join(c.upper() if draw(st.booleans()) else c for c in base)
    if kind == "lookalike":
        cased += draw(st.sampled_from(LOOKALIKES))
    return draw(padding) + cased + draw(padding)


prices = st.one_of(
    st.none(),
    st.decimals(min_value=Decimal("-1000.00"), max_value=Decimal("999999999999.99"), places=2),
)
client_rows = st.tuples(emails(), st.sampled_from(STAGES))
quote_rows = st.tuples(emails(), prices, st.sampled_from(CURRENCIES))
tenant_data = st.tuples(st.lists(client_rows, max_size=8), st.lists(quote_rows, max_size=10))


def reference(data: tuple[list[Any], list[Any]]) -> dict[str, Any]:
    """The summary of one tenant's (clients, quotes), directly in Python:
    per stage the client count and, per currency, the sum of the prices of
    the quotes whose key equals each client's key."""
    client_rows, quote_rows = data
    counts: dict[str, int] = defaultdict(int)
    values: dict[str, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    for client_email, stage in client_rows:
        counts[stage] += 1
        key = email_key(client_email)
        for quote_email, price, currency in quote_rows:
            if key is not None and price is not None and email_key(quote_email) == key:
                values[stage][currency] += price
    open_value: dict[str, Decimal] = defaultdict(Decimal)
    for stage in OPEN:
        for currency, amount in values[stage].items():
            open_value[currency] += amount
    return {
        "stages": [
            {
                "stage": s,
                "open": s in OPEN,
                "client_count": counts[s],
                "value": [{"currency": c, "amount": values[s][c]} for c in sorted(values[s])],
            }
            for s in STAGES
        ],
        "total_clients": len(client_rows),
        "open_value": [{"currency": c, "amount": open_value[c]} for c in sorted(open_value)],
    }
