"""The pieces of `flq simulate --ray` that need no cluster (and no Ray import)."""

from __future__ import annotations

import pytest

from flq.errors import UsageError
from flq.raysim import InOrder, check_address


def test_in_order_releases_messages_in_their_numbered_order() -> None:
    order = InOrder[str]()
    assert order.add(1, "b") == []  # waits for 0
    assert order.add(2, "c") == []
    assert order.add(0, "a") == ["a", "b", "c"]
    assert order.add(3, "d") == ["d"]


def test_in_order_refuses_a_number_twice() -> None:
    order = InOrder[str]()
    order.add(0, "a")
    order.add(2, "c")
    for seq in (0, 2):
        with pytest.raises(ValueError, match=f"message number {seq} arrived twice"):
            order.add(seq, "again")


@pytest.mark.parametrize(
    "address", ["", "host", "host:", ":6379", "host:port", "host:0", "h:70000"]
)
def test_a_bad_ray_address_is_named(address: str) -> None:
    with pytest.raises(UsageError, match=f"expected auto or HOST:PORT, got {address!r}"):
        check_address(address)


def test_good_ray_addresses() -> None:
    assert check_address("auto") is None
    assert check_address("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert check_address("head.cluster.local:6380") == ("head.cluster.local", 6380)
