"""Exact decimal amounts as google.type.Money."""

from __future__ import annotations

from collections.abc import Iterable, MutableSequence
from decimal import Decimal

from google.type import money_pb2

_NANOS = Decimal(1_000_000_000)
_NANOS_PER_UNIT = 1_000_000_000


def money_parts(amount: Decimal) -> tuple[int, int]:
    """(units, nanos), both with the amount's sign, as google.type.Money requires."""
    scaled = amount.scaleb(9)  # the amount in nanos, exact
    total = int(scaled)  # truncates toward zero, like units below
    if total != scaled:
        raise ValueError(f"{amount} has more precision than nanos")
    units = int(amount)
    return units, total - units * _NANOS_PER_UNIT


def add_money(
    field: MutableSequence[money_pb2.Money], amounts: Iterable[tuple[str, Decimal]]
) -> None:
    """Append (currency, amount) pairs to a repeated Money field, built in place
    (assigning a list of messages would copy each one)."""
    for currency, amount in amounts:
        units, nanos = money_parts(amount)
        field.add(currency_code=currency, units=units, nanos=nanos)  # type: ignore[attr-defined]


def from_money(money: money_pb2.Money) -> Decimal:
    return Decimal(money.units) + Decimal(money.nanos) / _NANOS
