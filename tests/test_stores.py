"""The shared stores (cluster/stores.py) against a real redis-server and in memory: records, expiry,
AUTH, clear errors for an unreachable or misconfigured Redis (password masked), the engine registry
dropping a dead engine and riding out a Redis restart."""

import time

import pytest

from cluster.config import ConfigError, StoreOptions, load_config
from cluster.stores import EngineRegistry, MemoryStore, StoreUnavailableError, masked_url, open_store
from tests.conftest import wait_for


def redis_options(server, **fields):
    return StoreOptions(backend="redis", redis_url=server.url, redis_password=server.password, **fields)


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        yield MemoryStore("t1")
        return
    server = request.getfixturevalue("redis_server")
    s = open_store(redis_options(server, key_prefix=f"t-{time.monotonic_ns()}"))
    yield s
    s.close()


def test_records_round_trip_scan_and_delete(store):
    store.put("engines:m:a", {"x": 1})
    store.put("engines:m:b", {"x": 2, "s": "two"})
    store.put("engines:other:c", {"x": 3})
    assert store.get("engines:m:a") == {"x": 1}
    assert store.get("missing") is None
    assert store.scan("engines:m:") == {"engines:m:a": {"x": 1}, "engines:m:b": {"x": 2, "s": "two"}}
    store.delete("engines:m:a")
    assert set(store.scan("engines:")) == {"engines:m:b", "engines:other:c"}


def test_records_expire(store):
    store.put("k", {"v": 1}, ttl_s=0.5)
    assert store.get("k") == {"v": 1}
    assert wait_for(lambda: store.get("k") is None, 10)
    assert store.scan("") == {}


def test_glob_characters_in_keys_are_literal(store):
    store.put("a*b", {"v": 1})
    store.put("axb", {"v": 2})
    assert store.scan("a*") == {"a*b": {"v": 1}}


def test_keys_carry_the_prefix_in_redis(redis_server):
    import redis

    s = open_store(redis_options(redis_server, key_prefix="pfx"))
    s.put("hello", {"v": 1})
    raw = redis.Redis.from_url(redis_server.url, password=redis_server.password, decode_responses=True)
    assert raw.get("pfx:hello") == '{"v": 1}'
    s.delete("hello")


def test_wrong_password_fails_at_open_with_the_url_masked(redis_server):
    url = redis_server.url.replace("redis://", "redis://:nope@")
    with pytest.raises(StoreUnavailableError, match=r"redis at redis://:\*\*\*@127\.0\.0\.1.*(AUTH|password|Authentication)") as info:
        open_store(StoreOptions(backend="redis", redis_url=url, connect_timeout_s=2))
    assert "nope" not in str(info.value)
    with pytest.raises(StoreUnavailableError, match="OUTRIDER_STORES_REDIS_PASSWORD"):
        open_store(StoreOptions(backend="redis", redis_url=redis_server.url, connect_timeout_s=2))


def test_unreachable_redis_fails_fast():
    from tests.conftest import free_port

    start = time.monotonic()
    with pytest.raises(StoreUnavailableError, match=r"cannot use redis at redis://127\.0\.0\.1:\d+/0: PING failed"):
        open_store(StoreOptions(backend="redis", redis_url=f"redis://127.0.0.1:{free_port()}/0",
                                connect_timeout_s=1))
    assert time.monotonic() - start < 5


def test_masked_url():
    assert masked_url("redis://user:secret@h:6379/0") == "redis://user:***@h:6379/0"
    assert masked_url("redis://h:6379/0") == "redis://h:6379/0"


def test_config_section_from_every_source(tmp_path):
    env = {"OUTRIDER_STORES_REDIS_PASSWORD": "from-env", "OUTRIDER_STORES_BACKEND": "redis"}
    cfg = load_config(data={"target": "t", "stores": {"redis_url": "redis://r:6379/0"}}, env=env)
    assert cfg.stores.backend == "redis" and cfg.stores.password() == "from-env"
    assert "from-env" not in repr(cfg)
    with pytest.raises(ConfigError, match="stores: .*backend redis needs redis_url"):
        load_config(data={"target": "t", "stores": {"backend": "redis"}}, env={})
    with pytest.raises(ConfigError, match=r"stores.redis_url \(from OUTRIDER_STORES_REDIS_URL\): .*expected redis://"):
        load_config(data={"target": "t"}, env={"OUTRIDER_STORES_REDIS_URL": "http://x"})
    with pytest.raises(ConfigError, match=r"stores.bogus \(from args\): unknown field"):
        load_config(data={"target": "t", "stores": {"bogus": 1}}, env={}, data_source="args")
    with pytest.raises(ConfigError, match="stores .*expected a mapping"):
        load_config(data={"target": "t", "stores": "redis"}, env={})


def test_engine_registry_announces_refreshes_and_expires(store):
    health = {"v": (True, "serving")}
    reg = EngineRegistry(store, "m", lambda: health["v"], period_s=0.2).start()
    try:
        (rec,) = reg.engines().values()
        assert rec["serving"] is True and rec["engine_id"] == reg.engine_id
        health["v"] = (False, "recovering: x")
        assert wait_for(lambda: reg.engines()[reg.key]["reason"] == "recovering: x", 10)  # refreshed
        other = EngineRegistry(store, "m", lambda: (True, "serving"), period_s=0.2)
        other.beat()  # announced once, never refreshed: a dead engine
        assert other.key in reg.engines()
        assert wait_for(lambda: other.key not in reg.engines(), 10)  # the dead one expired
        time.sleep(0.7)  # longer than the live one's expiry (3 x 0.2 s): only its refreshes keep it
        assert list(reg.engines()) == [reg.key]
    finally:
        reg.stop()
    assert reg.engines() == {}


def test_engine_registry_rides_out_a_redis_restart(redis_server):
    s = open_store(redis_options(redis_server, key_prefix="restart", connect_timeout_s=0.5))
    reg = EngineRegistry(s, "m", lambda: (True, "serving"), period_s=0.2).start()
    try:
        redis_server.stop()
        deadline = time.monotonic() + 5
        while reg.last_error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reg.last_error is not None and "redis at" in reg.last_error
        redis_server.start()  # same port, empty (no persistence)
        deadline = time.monotonic() + 5
        while reg.last_error is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reg.last_error is None
        assert reg.key in reg.engines()  # re-announced on the next beat
    finally:
        reg.stop()
        s.close()
