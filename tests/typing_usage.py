"""
What a typed application sees of pbroker's public API: checked by mypy in CI
(``mypy pbroker examples tests/typing_usage.py``), never run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from typing_extensions import assert_type

from pbroker import pb
from pbroker.stream import RemoteStream


async def calls(root: pb.RemoteReference, flag: bool) -> None:
    # A call answers with a Deferred, which may be awaited or given callbacks.
    assert_type(root.callRemote("echo", 1), Deferred[Any])
    assert_type(await root.callRemote("echo", 1), Any)
    root.callRemote("echo", 1).addCallback(print)
    assert_type(root.withOptions(timeout=5).callRemote("echo"), Deferred[Any])
    assert_type(root.remoteMethod("echo")(1), Deferred[Any])
    assert_type(root.callRemote("echo", 1, pbanswer=True), Deferred[Any])
    # One-way calls answer nothing; a flag known only when run may be either.
    assert_type(root.callRemote("note", 1, pbanswer=False), None)
    assert_type(root.remoteMethod("note")(1, pbanswer=False), None)
    assert_type(root.callRemote("note", 1, pbanswer=flag), Deferred[Any] | None)
    assert_type(root.withOptions().callRemote("note", pbanswer=flag), Deferred[Any] | None)
    assert_type(root.withOptions().callRemote("note", pbanswer=False), None)
    assert_type(root.remoteMethod("note")(1, pbanswer=flag), Deferred[Any] | None)


def factories(
    factory: pb.PBClientFactory, stream: RemoteStream, reference: pb.RemoteReference
) -> None:
    # A reference's broker is typed, as is what it says of the connection.
    assert_type(reference.broker, pb.Broker)
    assert_type(reference.broker.currentDialect, bytes | None)
    assert_type(factory.getRootObject(), Deferred[pb.RemoteReference])
    assert_type(factory.limits, pb.BrokerLimits)
    assert_type(factory.dialects, list[bytes] | None)
    assert_type(stream.collect(), Deferred[list[Any]])


if TYPE_CHECKING:
    # Names pbroker does not have are errors, as they are at run time (a module __getattr__
    # seen by mypy would type any name as Any).
    import pbroker

    pbroker.NoSuchName  # type: ignore[attr-defined]  # noqa: B018
    pb.getObjectAt  # type: ignore[attr-defined]  # noqa: B018
    assert_type(pbroker.__version__, str)
    assert_type(pb.LoginGuard(), pb.LoginGuard)  # (a lazily imported name, typed)
    # The types of the factories' parameters, by the names their signatures use.
    assert_type(pb.UnjellyableRegistry(), pb.UnjellyableRegistry)
    security: pb.ISecurityOptions = pb.globalSecurity
    pb.PBServerFactory(pb.Root(), security=security, registry=pb.UnjellyableRegistry())
    # The modules twisted.spread.pb has as attributes.
    pb.jelly.jelly(1)
    pb.banana.encode(b"x")
