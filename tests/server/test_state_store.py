"""The state store on a real redis-server (and in process): format, locks, expiry, crashes,
Redis going away and coming back. No mocks."""

from __future__ import annotations

import time

import pytest
import redis
import torch

from server.state_store import InProcessStore, Session, SessionError, StoreUnavailableError
from server.state_store.codec import StateTag, decode, encode, read_metadata, state_tag
from server.state_store.redis_store import RedisStore, session_keys
from tests.models.conftest import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("lln_diag", dtype=torch.float32, vocab_size=29, local_size=4, num_sinks=1,
                      sparse_cache_size=3, sparse_span=1, kv_cache_dtype="bfloat16")  # fmt: skip


@pytest.fixture(scope="module")
def template(model):
    return model.empty_states(1)


@pytest.fixture(scope="module")
def tag(model, template) -> StateTag:
    return state_tag(model, "tiny", template)


def a_session(model, tokens: list[int]) -> Session:
    with torch.no_grad():
        _, states = model.forward_states(torch.tensor([tokens]))
    return Session(states, [tokens[-1]], len(tokens) + 1, sum(s.nbytes for s in states))


def assert_same_state(a: Session, b: Session) -> None:
    assert a.pending == b.pending and a.num_tokens == b.num_tokens
    for x, y in zip(a.snapshot, b.snapshot, strict=True):
        for tx, ty in zip(x.flat(), y.flat(), strict=True):
            assert tx.dtype == ty.dtype and torch.equal(tx, ty)


def redis_store(url, tag, template, **kwargs) -> RedisStore:
    return RedisStore(url, tag, template, ttl_s=kwargs.pop("ttl_s", 60), **kwargs)


# ---- the format --------------------------------------------------------------------------------


def test_a_state_round_trips_bit_for_bit_with_its_metadata(model, template, tag):
    session = a_session(model, [3, 4, 5, 6, 7, 8])
    blob = encode(session, tag)
    meta = read_metadata(blob)
    assert meta["model"] == "tiny" and meta["num_tokens"] == "7" and meta["pending"] == "[8]"
    assert meta["revision"] and meta["config_hash"] and len(meta["sha256"]) == 64
    assert_same_state(decode(blob, tag, template, "s"), session)


def test_a_state_of_another_model_revision_or_shape_is_refused(model, template, tag):
    blob = encode(a_session(model, [3, 4, 5]), tag)
    for field, label in (("model", "model"), ("revision", "revision"),
                         ("config_hash", "state shape"), ("weights", "weights")):  # fmt: skip
        other = StateTag(**{**tag.__dict__, field: "other"})
        with pytest.raises(SessionError, match=label):
            decode(blob, other, template, "s")
    bigger = tiny_model("lln_diag", dtype=torch.float32, vocab_size=29, local_size=6, num_sinks=1)
    bigger_tag = state_tag(bigger, "tiny", bigger.empty_states(1))
    assert bigger_tag.config_hash != tag.config_hash
    with pytest.raises(SessionError, match="state shape"):
        decode(blob, bigger_tag, bigger.empty_states(1), "s")
    # the same shapes with far keys read at another rotary distance: the state means another
    # thing (the sparse cache holds keys re-rotated to position 0), so it is refused too
    fixed = tiny_model("lln_diag", dtype=torch.float32, vocab_size=29, local_size=4, num_sinks=1,
                       sparse_cache_size=3, sparse_span=1, kv_cache_dtype="bfloat16",
                       far_positions="fixed")  # fmt: skip
    fixed.load_state_dict(model.state_dict())
    fixed_tag = state_tag(fixed, "tiny", fixed.empty_states(1))
    assert fixed_tag.config_hash != tag.config_hash and fixed_tag.weights == tag.weights
    with pytest.raises(SessionError, match="state shape"):
        decode(blob, fixed_tag, fixed.empty_states(1), "s")


def test_a_corrupt_state_is_refused_never_loaded(model, template, tag):
    blob = bytearray(encode(a_session(model, [3, 4, 5]), tag))
    blob[-5] ^= 0xFF  # a flipped bit in the tensor bytes
    with pytest.raises(SessionError, match="checksum"):
        decode(bytes(blob), tag, template, "s")
    with pytest.raises(SessionError, match="not a readable state"):
        decode(b"\xff" * 40, tag, template, "s")


# ---- Redis ---------------------------------------------------------------------------------------


def test_two_replicas_share_a_session_and_lock_it_while_in_use(model, template, tag, redis_url):
    a, b = redis_store(redis_url, tag, template), redis_store(redis_url, tag, template)
    assert a.acquire("s") is None  # a new session
    with pytest.raises(SessionError, match="in use"):
        b.acquire("s")
    with pytest.raises(SessionError, match="in use"):
        b.delete("s")
    session = a_session(model, [3, 4, 5, 6])
    a.release("s", session)
    info = b.info("s")
    assert info.num_tokens == 5 and info.nbytes > session.nbytes and not info.in_use
    assert abs(info.last_used - time.time()) < 5
    assert_same_state(b.acquire("s"), session)
    assert a.info("s").in_use
    b.abandon("s", None)  # a failed turn: the state stays as it was
    assert_same_state(a.acquire("s"), session)
    a.abandon("s", None)
    assert a.delete("s") and b.info("s") is None and not b.delete("s")
    assert b.acquire("s") is None  # deleted: a new session again
    b.abandon("s", None)
    a.close(), b.close()


def test_a_crashed_replicas_lock_expires_and_its_late_save_cannot_overwrite(
    model, template, tag, redis_url
):
    crashed = redis_store(redis_url, tag, template, lock_ttl_s=0.3)
    crashed.close()  # no lock refresh from now on: as if the process died
    other = redis_store(redis_url, tag, template)
    first = a_session(model, [3, 4])
    other.acquire("s"), other.release("s", first)
    assert_same_state(crashed.acquire("s"), first)
    time.sleep(0.5)
    assert_same_state(other.acquire("s"), first)  # the lock expired
    second = a_session(model, [5, 6, 7])
    other.release("s", second)
    with pytest.raises(SessionError, match="lock expired"):
        crashed.release("s", a_session(model, [9, 9, 9, 9]))
    assert_same_state(other.acquire("s"), second)
    other.abandon("s", None)
    client = redis.Redis.from_url(redis_url)
    assert not [k for k in client.keys("*") if b":tmp:" in k]  # no half-written state left
    other.close()


def test_a_held_lock_is_refreshed_while_the_request_runs(model, template, tag, redis_url):
    a = redis_store(redis_url, tag, template, lock_ttl_s=1.0)
    b = redis_store(redis_url, tag, template)
    a.acquire("long")
    time.sleep(2.5)  # longer than the lock's expiry: the monitor extends it
    with pytest.raises(SessionError, match="in use"):
        b.acquire("long")
    a.release("long", a_session(model, [3]))
    a.close(), b.close()


def test_an_expired_session_is_a_409_that_says_so(model, template, tag, redis_url):
    store = redis_store(redis_url, tag, template, ttl_s=0.3)
    store.acquire("s"), store.release("s", a_session(model, [3, 4]))
    time.sleep(0.5)
    assert store.info("s") is None
    with pytest.raises(SessionError, match="expired or was evicted"):
        store.acquire("s")
    store.close()


def test_prefix_states_are_shared_between_replicas(model, template, tag, redis_url):
    a = redis_store(redis_url, tag, template, share_prefixes=True)
    b = redis_store(redis_url, tag, template, share_prefixes=True)
    session = a_session(model, [3, 4, 5, 6])
    a.put_prefix(b"k2", session.snapshot)
    assert b.get_prefix([b"k1"]) is None
    index, snapshot = b.get_prefix([b"k1", b"k2", b"k3"])
    assert index == 1
    assert_same_state(Session(snapshot, session.pending, session.num_tokens, 0), session)
    a.close(), b.close()


def test_redis_down_is_reported_fast_and_the_store_reconnects(
    model, template, tag, redis_process, redis_url
):
    store = redis_store(redis_url, tag, template)
    store.acquire("kept"), store.release("kept", a_session(model, [3, 4, 5]))
    redis_process.stop()
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="unreachable"):
            store.acquire("kept")
        with pytest.raises(StoreUnavailableError, match="unreachable"):
            store.acquire("other")
        assert time.monotonic() - started < 3 and not store.is_available
        assert store.get_prefix([b"k"]) is None  # prefix sharing just misses
    finally:
        redis_process.start()
    deadline = time.monotonic() + 10
    while not store.is_available:
        assert time.monotonic() < deadline, "the store did not reconnect"
        time.sleep(0.1)
    assert store.acquire("kept").num_tokens == 4  # kept by Redis's append-only file
    store.abandon("kept", None)
    store.close()


def test_session_keys_hash_any_id_into_one_cluster_slot():
    keys = session_keys("a{weird} id " * 30)
    tags = {k[k.index("{") : k.index("}") + 1] for k in keys.values()}
    assert len(tags) == 1


# ---- in process ----------------------------------------------------------------------------------


def test_in_process_store_info_delete_and_locks(model):
    store = InProcessStore(max_bytes=2**30, ttl_s=60)
    assert store.acquire("s") is None
    session = a_session(model, [3, 4])
    with pytest.raises(SessionError, match="in use"):
        store.delete("s")
    store.release("s", session)
    info = store.info("s")
    assert info.num_tokens == 3 and info.nbytes == session.nbytes and not info.in_use
    assert store.delete("s") and store.info("s") is None and not store.delete("s")
