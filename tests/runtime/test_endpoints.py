"""Role identity: "kind-index" names parsed into (kind, index), bad names refused, and a run's
instances of one kind listed by index (numerically: generator-10 after generator-9); where a
run listens."""

from __future__ import annotations

import random
import socket

import pytest

from respec_async.config import config_from_dict
from respec_async.endpoints import Endpoints, RoleId, assign_endpoints, ephemeral_port_range, free_tcp_port


def test_role_names_round_trip_and_kinds_may_contain_underscores():
    assert RoleId.parse("drafter_learner-3") == RoleId("drafter_learner", 3)
    assert str(RoleId("generator", 12)) == "generator-12"
    assert RoleId.parse(str(RoleId("reward", 0))) == ("reward", 0)


@pytest.mark.parametrize("name", ["generator", "generator-", "-0", "generator-x", "generator-1a"])
def test_a_name_that_is_not_kind_index_is_refused_by_name(name):
    with pytest.raises(ValueError, match="not a role instance name"):
        RoleId.parse(name)


def test_roles_lists_one_kind_by_index():
    names = ["trainer-0", "generator-10", "generator-9", "reward-0", "generator-0", "drafter_learner-0"]
    endpoints = Endpoints(supervisor="ipc://s", inboxes={n: f"ipc://{n}" for n in names},
                          torch_dist="tcp://127.0.0.1:1")
    assert endpoints.roles("generator") == ["generator-0", "generator-9", "generator-10"]
    assert endpoints.roles("drafter_learner") == ["drafter_learner-0"] and endpoints.roles("echo") == []


@pytest.mark.parametrize("scheme", ["ipc", "tcp"])
def test_the_rendezvous_store_is_a_file_in_the_run_directory_whatever_the_transport(tmp_path, scheme):
    # It takes no credentials: a file in the 0700 run directory, not a port another user can reach.
    config = config_from_dict({"transport": {"scheme": scheme, "host": "127.0.0.2"}})
    endpoints = assign_endpoints(config, tmp_path)
    if scheme == "tcp":
        assert endpoints.supervisor.startswith("tcp://127.0.0.2:")
        assert all(e.startswith("tcp://127.0.0.2:") for e in endpoints.inboxes.values())
    assert endpoints.torch_dist == f"file://{tmp_path.resolve()}/rendezvous.store"


def test_tcp_ports_are_free_and_below_the_kernels_ephemeral_range():
    low = ephemeral_port_range()[0]
    ports = [free_tcp_port("127.0.0.1") for _ in range(20)]
    assert all(10000 <= p < low for p in ports) if low > 10000 else all(p > 0 for p in ports)
    for port in ports:  # each one free: it binds
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))


class Draws(random.Random):
    """A Random whose randrange hands out the given ports in turn."""

    def __init__(self, ports):
        super().__init__(0)
        self.ports = iter(ports)

    def randrange(self, *args):
        return next(self.ports)


@pytest.mark.skipif(ephemeral_port_range()[0] <= 10100, reason="no ports below the ephemeral range to draw from")
def test_a_taken_port_is_not_handed_out():
    first = free_tcp_port("127.0.0.1", random.Random(0))
    second = free_tcp_port("127.0.0.1", random.Random(1))
    assert first != second
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", first))
        holder.listen()
        # the taken port drawn twice, then a free one: that one
        assert free_tcp_port("127.0.0.1", Draws([first, first, second])) == second
