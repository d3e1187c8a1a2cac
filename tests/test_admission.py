"""The pure rules behind the hub's admission and the device's round guard."""

from __future__ import annotations

from edge_runtime.protocol.round_auth import RoundGuard, load_or_create_key, read_key, sign
from server_hub.admission import ReplyLimiter
from server_hub.registry import DeviceRegistry


def announcement(key: bytes, rnd: int, state: str, issued: float, hub: str = "n1") -> dict:
    return sign(key, rnd, {"state": state, "deadline": None, "epoch": "e", "run": "r1",
                           "hub": hub, "issued": issued})


def test_a_keyed_device_follows_only_the_hubs_signed_announcements_in_order(tmp_path):
    key = read_key(load_or_create_key(tmp_path))
    assert read_key(load_or_create_key(tmp_path)) == key  # created once, then read
    assert (tmp_path / "round.key").stat().st_mode & 0o777 == 0o600
    guard = RoundGuard(key)
    first = announcement(key, 0, "collect", 100.0)
    assert guard.why_not(0, first) is None
    assert guard.why_not(0, first) is None  # the hub's re-announcement of the same
    assert "not signed" in guard.why_not(99, first)  # a signature copied to round 99
    assert "not signed" in guard.why_not(0, {**first, "state": "stop"})
    assert "not signed" in guard.why_not(0, {k: v for k, v in first.items() if k != "sig"})
    other = read_key(load_or_create_key(tmp_path / "other"))
    assert "not signed" in guard.why_not(0, announcement(other, 0, "stop", 200.0))
    assert guard.why_not(1, announcement(key, 1, "collect", 150.0, hub="n2")) is None  # restart
    assert "replay" in guard.why_not(0, first)  # an old retained message played again


def test_a_device_follows_only_the_run_it_adopted_even_with_the_key(tmp_path):
    """`serve --new-run` keeps the run key: the old run's retained, signed "stop" must not
    end a device that adopted the new run (it did: the device exited as it joined)."""
    key = read_key(load_or_create_key(tmp_path))
    guard = RoundGuard(key, run="r2")
    assert "follows 'r2'" in guard.why_not(0, announcement(key, 0, "stop", 100.0))  # r1's
    ann = sign(key, 0, {"state": "collect", "deadline": None, "epoch": "e", "run": "r2",
                        "hub": "n", "issued": 50.0})
    assert guard.why_not(0, ann) is None
    assert "follows 'r2'" in RoundGuard(run="r2").why_not(0, {"state": "stop", "run": "r1"})


def test_a_device_without_the_key_follows_only_its_run():
    guard = RoundGuard()
    assert guard.why_not(0, {"state": "collect", "run": "r1"}) is None
    assert "follows 'r1'" in guard.why_not(0, {"state": "stop", "run": "r2"})
    # a forger who copies the run id is followed: the run key is what stops that
    assert guard.why_not(0, {"state": "stop", "run": "r1"}) is None


def test_refusal_replies_are_rate_limited_per_device_and_reason():
    lim = ReplyLimiter(burst=5, period=10.0)
    assert [lim.allow("d", "magnitude", t) for t in range(7)] == [True] * 5 + [False] * 2
    assert lim.allow("d", "expansion", 6.0) and lim.allow("e", "magnitude", 6.0)
    assert lim.allow("d", "magnitude", 10.5)  # the first reply left the window


def test_registry_persists_and_bounds_whom_a_round_waits_for(tmp_path):
    reg = DeviceRegistry(tmp_path)
    reg.hello("old", {"num_samples": 5}, -1)  # before round 0
    reg.hello("phantom", {"num_samples": 5}, 0)
    assert reg.waited_for(0) == {"old", "phantom"}  # new devices: their first round
    reg.uploaded(["old"], 0)
    assert reg.waited_for(1) == {"old"}  # the phantom missed round 0: not waited for again
    assert reg.waited_for(2) == {"old"} and reg.waited_for(3) == set()  # 2 rounds silent
    reg.settle_feature_size(8)
    reg.settle_feature_size(16)  # the first size stays
    again = DeviceRegistry(tmp_path)
    assert again.run_id == reg.run_id and again.feature_size == 8
    assert set(again.devices) == {"old", "phantom"} and again.hello_meta("old") == {
        "num_samples": 5}
    assert DeviceRegistry(tmp_path / "x", run_id="given").run_id == "given"
