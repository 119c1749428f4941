"""The handshake says no more than needed (issue 10 §4): an unknown client id, a wrong key
or signature and a revoked client get the same refusal (the same words but for the id, the
same code), so a stranger cannot learn which client ids exist; only the revoked agent
itself, proving its key, is told it was revoked.

Real :class:`~deploy_core.server.app.DeployServer` (QUIC, SQLite) and raw QUIC peers.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from security_harness import mac_for, raw_peer

from deploy_core.server.app import DeployServer, ServerConfig
from deploy_core.transport import AUTH_FAILED, Envelope, Kind
from deploy_core.transport.identity import auth_transcript, certificate_digest, public_bytes

pytestmark = pytest.mark.asyncio


@dataclass
class Center:
    server: DeployServer
    keys: dict[str, bytes]
    #: Agents enrolled with their own key pair.
    pairs: dict[str, Ed25519PrivateKey]

    async def signed(self, client_id: str, key: Ed25519PrivateKey | None = None) -> Envelope:
        """Sign the challenge as ``client_id`` with ``key`` (default: its enrolled key pair,
        or a stranger's); the server's answer to that AUTH."""
        port = self.server.transport.port
        certificate = x509.load_pem_x509_certificate(self.server.state.certs.cert.read_bytes())
        key = key or self.pairs.get(client_id) or Ed25519PrivateKey.generate()
        async with raw_peer(port, self.server.state.certs.ca_cert) as peer:
            nonce = await peer.hello(client_id)
            transcript = auth_transcript(client_id, nonce, certificate_digest(certificate))
            payload = {"method": "signature", "signature": key.sign(transcript).hex()}
            peer.send_env(Envelope(kind=Kind.AUTH, payload=payload))
            answer = await peer.recv()
            if answer.kind is Kind.ERROR:
                await peer.refused()
        return answer

    async def signed_refusal(
        self, client_id: str, key: Ed25519PrivateKey | None = None
    ) -> tuple[str, str | None]:
        """:meth:`signed`'s refusal as :meth:`answer` gives it."""
        answer = await self.signed(client_id, key)
        assert answer.kind is Kind.ERROR, (client_id, answer)
        reason = str(answer.payload["reason"]).replace(client_id, "<id>")
        return reason, answer.payload.get("code")

    async def answer(self, client_id: str, mac: str | None = None) -> tuple[str, str | None]:
        """Authenticate as ``client_id`` with the key of ``client_id`` (or ``mac`` given);
        the reason and code of the server's refusal, with the id replaced by ``<id>``."""
        port = self.server.transport.port
        async with raw_peer(port, self.server.state.certs.ca_cert) as peer:
            nonce = await peer.hello(client_id)
            key = self.keys.get(client_id, secrets.token_bytes(32))
            proof = mac if mac is not None else mac_for(key, nonce, client_id)
            peer.send_env(Envelope(kind=Kind.AUTH, payload={"method": "key", "mac": proof}))
            answer = await peer.recv()
            assert answer.kind is Kind.ERROR, (client_id, answer)
            await peer.refused()
        reason = str(answer.payload["reason"]).replace(client_id, "<id>")
        return reason, answer.payload.get("code")


@pytest_asyncio.fixture
async def center(tmp_path: Path) -> AsyncIterator[Center]:
    server = DeployServer(ServerConfig(state_dir=tmp_path / "server", api_port=0, quic_port=0))
    await server.start()
    try:
        keys = {cid: secrets.token_bytes(32) for cid in ("alpha", "gone")}
        for cid, key in keys.items():
            await server.db(server.records.enroll, cid, key.hex())
        assert await server.revoke_client("gone")
        pairs = {cid: Ed25519PrivateKey.generate() for cid in ("paired", "paired-gone")}
        for cid, pair in pairs.items():
            public_key = public_bytes(pair).hex()
            await server.db(server.records.enroll, cid, public_key=public_key)
        assert await server.revoke_client("paired-gone")
        yield Center(server, keys, pairs)
    finally:
        await server.stop()


async def test_unknown_id_wrong_key_and_revoked_id_get_one_refusal(center: Center) -> None:
    unknown = await center.answer("nobody-here")
    wrong_key = await center.answer("alpha", mac="00" * 32)
    revoked_wrong_key = await center.answer("gone", mac="00" * 32)

    assert unknown == wrong_key == revoked_wrong_key
    reason, code = unknown
    assert code == AUTH_FAILED
    assert "unknown client or wrong agent key for client <id>" in reason
    assert "revoked" not in reason and "exists" not in reason
    assert dict(center.server.transport.sessions) == {}


async def test_a_malformed_proof_gets_the_same_answer_for_any_id(center: Center) -> None:
    answers = {await center.answer(cid, mac="not hex") for cid in ("alpha", "nobody", "gone")}
    assert len(answers) == 1
    ((reason, _code),) = answers
    assert "auth.payload.mac must be a hex string" in reason


async def test_the_revoked_agent_itself_learns_it_was_revoked(center: Center) -> None:
    reason, code = await center.answer("gone")  # the right key
    assert code == "revoked"
    assert "client <id> was revoked by an operator" in reason
    # ... and a known agent with its right key still gets in.
    port = center.server.transport.port
    async with raw_peer(port, center.server.state.certs.ca_cert) as peer:
        welcome = await peer.authenticate("alpha", center.keys["alpha"])
        assert welcome.kind is Kind.WELCOME


async def test_a_wrong_signature_gets_the_one_refusal_too(center: Center) -> None:
    stranger = Ed25519PrivateKey.generate()
    answers = {
        "unknown id": await center.signed_refusal("nobody-here"),
        "wrong signature": await center.signed_refusal("paired", stranger),
        "revoked, wrong signature": await center.signed_refusal("paired-gone", stranger),
        "enrolled with a shared key": await center.signed_refusal("alpha", stranger),
        "wrong shared key": await center.answer("alpha", mac="00" * 32),
    }
    assert len(set(answers.values())) == 1, answers
    reason, code = answers["unknown id"]
    assert code == AUTH_FAILED
    assert "unknown client or wrong agent key for client <id>" in reason
    assert dict(center.server.transport.sessions) == {}


async def test_a_signature_of_another_connections_challenge_is_refused(center: Center) -> None:
    # A signature is bound to its connection's nonce: replayed on a new connection (a new
    # challenge), it proves nothing.
    port = center.server.transport.port
    certificate = x509.load_pem_x509_certificate(center.server.state.certs.cert.read_bytes())
    digest = certificate_digest(certificate)
    async with raw_peer(port, center.server.state.certs.ca_cert) as peer:
        nonce = await peer.hello("paired")
        captured = center.pairs["paired"].sign(auth_transcript("paired", nonce, digest)).hex()
    async with raw_peer(port, center.server.state.certs.ca_cert) as peer:
        await peer.hello("paired")
        peer.send_env(
            Envelope(kind=Kind.AUTH, payload={"method": "signature", "signature": captured})
        )
        answer = await peer.recv()
        await peer.refused()
    assert answer.kind is Kind.ERROR and answer.payload.get("code") == AUTH_FAILED


async def test_the_revoked_paired_agent_learns_it_and_a_paired_agent_gets_in(
    center: Center,
) -> None:
    reason, code = await center.signed_refusal("paired-gone")  # its own key pair
    assert code == "revoked"
    assert "client <id> was revoked by an operator" in reason
    welcome = await center.signed("paired")
    assert welcome.kind is Kind.WELCOME
    assert welcome.payload["public_key"] == public_bytes(center.pairs["paired"]).hex()
