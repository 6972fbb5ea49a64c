"""CURVE on tcp: only a peer with the run's client key gets messages through; a wrong key or
no CURVE at all delivers nothing, and the right peer still works afterwards. The rendezvous
store (no credentials) listens on the run's address only."""

from __future__ import annotations

import asyncio
import ipaddress
from datetime import timedelta
from pathlib import Path

import pytest
import structlog
import torch.distributed as dist
import zmq
import zmq.asyncio

from respec_async.endpoints import free_tcp_port
from transport.channels import Kind, open_channel
from transport.schema import Ping
from transport.security import Security, start_authenticator
from transport.weights import host_rendezvous_store, open_rendezvous_store, parse_rendezvous

REFUSED_WITHIN_S = 1.5


async def nothing_arrives(channel, timeout: float = REFUSED_WITHIN_S) -> bool:
    try:
        await asyncio.wait_for(channel.recv(), timeout)
    except TimeoutError:
        return True
    return False


@pytest.mark.slow  # ~3.5 s each (refused handshakes wait out their timeouts): out of the quick tier
@pytest.mark.parametrize("kind, peer_kind", [(Kind.ROUTER, Kind.DEALER), (Kind.PULL, Kind.PUSH)])
def test_only_the_runs_client_key_gets_through(kind, peer_kind, tmp_path):
    keys = Security.generate()
    keys.save(tmp_path / "keys.json")
    run = Security.load(tmp_path / "keys.json")
    assert (tmp_path / "keys.json").stat().st_mode & 0o777 == 0o600
    other = Security.generate()
    wrong_client = Security(False, run.server_public, b"", other.client_public, other.client_secret)
    endpoint = f"tcp://127.0.0.1:{free_tcp_port('127.0.0.1')}"

    async def main():
        ctx = zmq.asyncio.Context()
        auth = start_authenticator(ctx, run)
        server = open_channel(ctx, kind, endpoint, bind=True, security=run)
        try:
            def peer(security, seq, identity):
                channel = open_channel(ctx, peer_kind, endpoint, bind=False, security=security,
                                       identity=identity if peer_kind is Kind.DEALER else None)
                return channel, channel.send(Ping(seq=seq, sent_at=0.0))

            # A client key the run does not know: the ZAP handler refuses the handshake.
            wrong, sending = peer(wrong_client, 1, b"wrong")
            await sending
            assert await nothing_arrives(server), "a peer with the wrong client key got through"
            # No CURVE at all against a CURVE server: the handshake never completes.
            plain, sending = peer(Security(insecure=True), 2, b"plain")
            await sending
            assert await nothing_arrives(server), "a peer without CURVE got through"
            # The run's client key: delivered, and the refused peers did not break the server.
            legit, sending = peer(run, 3, b"legit")
            await sending
            envelope = await asyncio.wait_for(server.recv(), 10)
            assert envelope.message == Ping(seq=3, sent_at=0.0)
            if kind is Kind.ROUTER:
                assert envelope.identity == b"legit"
            assert await nothing_arrives(server, 0.5), "a refused peer's queued message arrived later"
            await legit.send(Ping(seq=4, sent_at=0.0))
            assert (await asyncio.wait_for(server.recv(), 10)).message.seq == 4
        finally:
            auth.stop()
            ctx.destroy(linger=0)

    asyncio.run(main())


def test_tcp_without_security_is_refused():
    ctx = zmq.asyncio.Context()
    try:
        with pytest.raises(ValueError, match="need a Security"):
            open_channel(ctx, Kind.PULL, "tcp://127.0.0.1:1", bind=True)
        with pytest.raises(ValueError, match="without CURVE keys"):
            open_channel(ctx, Kind.PULL, "tcp://127.0.0.1:1", bind=True, security=Security())
    finally:
        ctx.destroy(linger=0)


def test_insecure_tcp_works_without_keys_and_warns():
    endpoint = f"tcp://127.0.0.1:{free_tcp_port('127.0.0.1')}"
    insecure = Security(insecure=True)

    async def main():
        ctx = zmq.asyncio.Context()
        try:
            with structlog.testing.capture_logs() as logs:
                assert start_authenticator(ctx, insecure) is None
            pull = open_channel(ctx, Kind.PULL, endpoint, bind=True, security=insecure)
            push = open_channel(ctx, Kind.PUSH, endpoint, bind=False, security=insecure)
            await push.send(Ping(seq=1, sent_at=0.0))
            return logs, (await asyncio.wait_for(pull.recv(), 10)).message
        finally:
            ctx.destroy(linger=0)

    logs, message = asyncio.run(main())
    assert message == Ping(seq=1, sent_at=0.0)
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["transport.insecure"]


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on `port` (Linux /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                # /proc writes each 32-bit word in host byte order (little-endian here).
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(ipaddress.ip_address(words).compressed)
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
def test_the_rendezvous_store_listens_on_its_address_only():
    port = free_tcp_port("127.0.0.1")
    store = host_rendezvous_store(f"tcp://127.0.0.1:{port}", timeout_s=5)
    try:
        store.set("key", "value")
        client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=5))
        assert client.get("key") == b"value"
        # Unauthenticated, so never on every interface: the bound address is loopback alone.
        assert listening_addresses(port) == {"127.0.0.1"}
    finally:
        del store


def test_a_file_rendezvous_store_is_private_to_the_user_and_shared_by_its_members(tmp_path):
    path = tmp_path / "rendezvous.store"
    host = host_rendezvous_store(f"file://{path}", timeout_s=5)
    assert path.stat().st_mode & 0o777 == 0o600
    member = open_rendezvous_store(parse_rendezvous(f"file://{path}"), timedelta(seconds=5))
    member.set("arrived/1", "generator-0")
    assert host.get("arrived/1") == b"generator-0"
    with pytest.raises(ValueError, match="file:///absolute/path or tcp://host:port"):
        parse_rendezvous("file://relative/store")
