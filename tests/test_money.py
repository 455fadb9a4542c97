"""Decimal <-> google.type.Money is exact and keeps units and nanos in sign."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from shared.money import from_money, to_money

amounts = st.decimals(
    min_value=Decimal("-99999999999999.99"), max_value=Decimal("99999999999999.99"), places=2
)


@given(amounts)
def test_round_trip_is_exact(amount: Decimal) -> None:
    money = to_money("EUR", amount)
    assert from_money(money) == amount
    assert money.currency_code == "EUR"
    assert abs(money.nanos) < 1_000_000_000
    assert money.units == 0 or money.nanos == 0 or (money.units > 0) == (money.nanos > 0)


def test_examples() -> None:
    assert (to_money("USD", Decimal("-1.75")).units, to_money("USD", Decimal("-1.75")).nanos) == (
        -1,
        -750_000_000,
    )
    assert (to_money("USD", Decimal("0.01")).units, to_money("USD", Decimal("0.01")).nanos) == (
        0,
        10_000_000,
    )
