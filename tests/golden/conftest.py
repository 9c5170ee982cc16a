"""Fixtures of the golden suites' kernel checks."""

from __future__ import annotations

import pytest

import netlab


@pytest.fixture
def netns(kernel_env):
    """A fresh network namespace, always deleted."""
    name = netlab.create_namespace(netlab.new_ns_name("gold"))
    try:
        yield name
    finally:
        netlab.delete_namespace(name)
