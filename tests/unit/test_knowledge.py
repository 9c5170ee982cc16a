"""What the service knows about the kernel (``kernel-intact.json``): trusted only while the
kernel is at the generation the service accounted for, in the same namespace, for the same
backend, and while the service runs."""

from __future__ import annotations

import json

from libvirt_nwfilter.daemon import knowledge


def test_known_ports_at_the_kernels_generation(tmp_path):
    knowledge.record(tmp_path, "nftables", {"vnet0": "h0"}, generation=41)
    assert knowledge.intact(tmp_path, "nftables", lambda: 41) == {"vnet0": "h0"}


def test_a_later_generation_is_waited_for_then_nothing_is_trusted(tmp_path, monkeypatch):
    monkeypatch.setattr(knowledge, "CATCH_UP", 0.05)
    knowledge.record(tmp_path, "nftables", {"vnet0": "h0"}, generation=41)
    assert knowledge.intact(tmp_path, "nftables", lambda: 42) == {}
    assert knowledge.intact(tmp_path, "nftables", lambda: None) == {}  # the generation cannot be read


def test_the_service_catching_up_is_waited_for(tmp_path, monkeypatch):
    knowledge.record(tmp_path, "nftables", {"vnet0": "h0"}, generation=41)
    waits = []

    def sleep(seconds):  # the service accounts for generation 42 while the reader waits
        waits.append(seconds)
        knowledge.record(tmp_path, "nftables", {"vnet0": "h1"}, generation=42)

    monkeypatch.setattr(knowledge.time, "sleep", sleep)
    assert knowledge.intact(tmp_path, "nftables", lambda: 42) == {"vnet0": "h1"} and waits


def test_without_generations_what_the_last_check_found(tmp_path):
    knowledge.record(tmp_path, "ebiptables", {"vnet0": "h0"})
    assert knowledge.intact(tmp_path, "ebiptables") == {"vnet0": "h0"}
    assert knowledge.intact(tmp_path, "nftables") == {}  # another backend's
    assert knowledge.intact(tmp_path, "ebiptables", lambda: 3) == {}  # no generation to compare


def test_a_service_that_is_gone_or_another_namespace_is_not_trusted(tmp_path):
    knowledge.record(tmp_path, "nftables", {"vnet0": "h0"}, generation=1)
    path = tmp_path / knowledge.KNOWLEDGE_FILE
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "netns": data["netns"] + 1}))
    assert knowledge.intact(tmp_path, "nftables", lambda: 1) == {}
    path.write_text(json.dumps({**data, "pid": 2 ** 22 + 1}))
    assert knowledge.intact(tmp_path, "nftables", lambda: 1) == {}
    knowledge.forget(tmp_path)
    assert not path.exists() and knowledge.intact(tmp_path, "nftables", lambda: 1) == {}
