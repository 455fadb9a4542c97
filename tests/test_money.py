"""Decimal <-> google.type.Money is exact and keeps units and nanos in sign."""

from __future__ import annotations

from decimal import Decimal

import pytest
from google.type import money_pb2
from hypothesis import given
from hypothesis import strategies as st

from shared.money import add_money, from_money, money_parts
from shared.proto_gen.crm.v1 import crm_pb2

amounts = st.decimals(
    min_value=Decimal("-99999999999999.99"), max_value=Decimal("99999999999999.99"), places=2
)


def as_money(currency: str, amount: Decimal) -> money_pb2.Money:
    """One amount added to a repeated Money field, as responses are built."""
    response = crm_pb2.PipelineSummaryResponse()
    add_money(response.open_value, [(currency, amount)])
    (money,) = response.open_value
    return money


@given(amounts)
def test_round_trip_is_exact(amount: Decimal) -> None:
    money = as_money("EUR", amount)
    assert from_money(money) == amount
    assert money.currency_code == "EUR"
    assert abs(money.nanos) < 1_000_000_000
    assert money.units == 0 or money.nanos == 0 or (money.units > 0) == (money.nanos > 0)


def test_examples() -> None:
    assert money_parts(Decimal("-1.75")) == (-1, -750_000_000)
    assert money_parts(Decimal("0.01")) == (0, 10_000_000)
    assert money_parts(Decimal("12345.67")) == (12345, 670_000_000)


def test_more_precision_than_nanos_is_refused() -> None:
    with pytest.raises(ValueError):
        money_parts(Decimal("0.0000000001"))
