"""The client's kept connections: one HTTP client per server and key, bounded, closed."""

from runtime.remote import client as rc


def test_one_client_per_server_and_key_bounded_and_closed(monkeypatch):
    monkeypatch.setattr(rc, "_POOL", {})
    a = rc._pooled("http://127.0.0.1:1", None)
    assert rc._pooled("http://127.0.0.1:1", None) is a
    keyed = rc._pooled("http://127.0.0.1:1", "key")
    assert keyed is not a
    others = [rc._pooled(f"http://127.0.0.1:{p}", None) for p in range(2, 2 + rc._POOL_MAX)]
    # two too many: the two least recently used went, and were closed
    assert len(rc._POOL) == rc._POOL_MAX
    assert ("http://127.0.0.1:1", None) not in rc._POOL and a.is_closed
    assert ("http://127.0.0.1:1", "key") not in rc._POOL and keyed.is_closed
    assert not any(c.is_closed for c in others)
    rc.close_connections()
    assert rc._POOL == {} and all(c.is_closed for c in others)
    fresh = rc._pooled("http://127.0.0.1:1", None)  # a closed one is never handed out
    assert fresh is not a and not fresh.is_closed
    rc.close_connections()
