"""Exact decimal amounts as google.type.Money."""

from __future__ import annotations

from decimal import Decimal

from google.type import money_pb2

_NANOS = Decimal(1_000_000_000)


def to_money(currency: str, amount: Decimal) -> money_pb2.Money:
    """Units and nanos carry the same sign, as google.type.Money requires."""
    units = int(amount)  # truncates toward zero
    nanos = (amount - units) * _NANOS
    if nanos != nanos.to_integral_value():
        raise ValueError(f"{amount} has more precision than nanos")
    return money_pb2.Money(currency_code=currency, units=units, nanos=int(nanos))


def from_money(money: money_pb2.Money) -> Decimal:
    return Decimal(money.units) + Decimal(money.nanos) / _NANOS
