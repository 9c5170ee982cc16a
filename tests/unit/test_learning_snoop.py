"""What each mode learns from the facts of a frame (learning/snoop.py): ``any`` takes the first
address, ``dhcp`` keeps leases (the clock is a number given to each call: lease expiry is
tested here with an injected clock), and the per-direction rate limit (10/s, bursts of 50)."""

from __future__ import annotations

import pytest

from libvirt_nwfilter.learning.record import MAX_LEASES
from libvirt_nwfilter.learning.snoop import ACK, ARP, DECLINE, OFFER, RELEASE, SOURCE, Fact, Leases, TokenBucket, \
    first_address
from libvirt_nwfilter.model import Lease

SERVER, ROGUE = "10.0.0.254", "10.0.0.253"
NOW = 1_700_000_000


def ack(address: str, lease: int = 600, server: str = SERVER) -> Fact:
    return Fact(ACK, address, server, lease)


@pytest.mark.parametrize("facts, servers, learned", [
    ([Fact(SOURCE, "10.0.0.5")], (), "10.0.0.5"),
    ([Fact(ARP, "10.0.0.6")], (), "10.0.0.6"),
    ([Fact(OFFER, "10.0.0.7", SERVER, 60)], (), "10.0.0.7"),
    ([Fact(ACK, "10.0.0.8", ROGUE, 60)], (), "10.0.0.8"),  # any server without DHCPSERVER
    ([Fact(ACK, "10.0.0.8", ROGUE, 60)], (SERVER,), None),  # DHCPSERVER believed in any mode too
    ([Fact(OFFER, "10.0.0.9", SERVER, 60)], (SERVER,), "10.0.0.9"),
    ([Fact(RELEASE, "10.0.0.10"), Fact(DECLINE, "10.0.0.11")], (), None),
    ([Fact(SOURCE, "10.0.0.12"), Fact(RELEASE, "10.0.0.12")], (), "10.0.0.12"),
])
def test_any_takes_the_first_address(facts, servers, learned):
    found = first_address(facts, servers)
    assert (found.address if found else None) == learned


def test_dhcp_ack_adds_and_renews_a_lease():
    leases = Leases()
    assert [(e.what, e.address, e.expires) for e in leases.apply([ack("10.0.0.5")], (), NOW)] == \
        [("learned", "10.0.0.5", NOW + 600)]
    assert [(e.what, e.expires) for e in leases.apply([ack("10.0.0.5", 900)], (), NOW + 300)] == \
        [("renewed", NOW + 1200)]
    leases.apply([ack("10.0.0.4", 0xFFFFFFFF)], (), NOW)
    assert leases.leases() == (Lease("10.0.0.4", None), Lease("10.0.0.5", NOW + 1200))  # infinite; sorted
    assert leases.next_expiry() == NOW + 1200


def test_dhcp_trusts_only_the_named_servers():
    leases = Leases()
    assert leases.apply([ack("10.0.0.5", server=ROGUE)], (SERVER,), NOW) == []
    assert [e.what for e in leases.apply([ack("10.0.0.6")], (SERVER,), NOW)] == ["learned"]
    assert leases.apply([Fact(OFFER, "10.0.0.7", SERVER, 60), Fact(ACK, "10.0.0.8", SERVER, None)], (), NOW) == []
    assert [lease.address for lease in leases.leases()] == ["10.0.0.6"]


def test_release_decline_and_expiry_remove_leases():
    leases = Leases([Lease("10.0.0.5", NOW + 10), Lease("10.0.0.6", NOW + 20), Lease("10.0.0.7", NOW + 30),
                     Lease("10.0.0.8", None)])
    assert [(e.what, e.address) for e in leases.apply([Fact(RELEASE, "10.0.0.6")], (), NOW)] == \
        [("released", "10.0.0.6")]
    assert [(e.what, e.address) for e in leases.apply([Fact(DECLINE, "10.0.0.7")], (), NOW)] == \
        [("declined", "10.0.0.7")]
    assert leases.apply([Fact(RELEASE, "10.0.0.99")], (), NOW) == []  # not ours
    assert leases.expire(NOW + 9) == []
    assert [(e.what, e.address) for e in leases.expire(NOW + 10)] == [("expired", "10.0.0.5")]
    assert leases.leases() == (Lease("10.0.0.8", None),)
    assert leases.expire(NOW + 10 ** 9) == [] and leases.next_expiry() is None


def test_a_port_holds_at_most_max_leases():
    leases = Leases()
    for i in range(MAX_LEASES):
        leases.apply([ack(f"10.0.1.{i + 1}")], (), NOW)
    assert [(e.what, e.address) for e in leases.apply([ack("10.0.2.1")], (), NOW)] == [("refused", "10.0.2.1")]
    assert [e.what for e in leases.apply([ack("10.0.1.1", 60)], (), NOW)] == ["renewed"]
    assert len(leases.leases()) == MAX_LEASES


def test_rate_limit_ten_a_second_bursts_of_fifty():
    now = [0.0]
    bucket = TokenBucket(clock=lambda: now[0])
    assert sum(bucket.take() for _ in range(80)) == 50 and bucket.refused == 30
    now[0] += 1.0
    assert sum(bucket.take() for _ in range(80)) == 10
    now[0] += 100.0
    assert sum(bucket.take() for _ in range(80)) == 50  # a full burst again, no more
    took = 0
    for _ in range(80):  # steady at 16/s for 5 s: 10/s are taken
        now[0] += 0.0625
        took += bucket.take()
    assert took == 50
