"""Redis registry against a real Redis: keys, rounds, membership, liveness TTL, counters, cleanup."""

import time

from shared.state.registry import Heartbeat


def test_run_meta_and_rounds(registry):
    registry.create_run({"mode": "serial", "silos": "silo0,silo1", "local_steps": 5})
    assert registry.run_meta()["silos"] == "silo0,silo1"
    assert registry.round_state()["committed"] == "-1"
    registry.commit_round(0)
    state = registry.round_state()
    assert (state["committed"], state["round"], state["state"]) == ("0", "1", "training")


def test_membership_and_progress(registry):
    registry.join("silo", "silo1", samples=10)
    registry.join("silo", "silo0")
    assert registry.members("silo") == ["silo0", "silo1"]
    registry.update("silo", "silo0", step=3, loss=1.5)
    assert registry.info("silo", "silo0")["loss"] == "1.5"
    registry.leave("silo", "silo0", status="finished")
    assert registry.info("silo", "silo0")["status"] == "finished"


def test_liveness_expires_without_heartbeats(registry):
    registry.heartbeat("trunk", "w0", ttl_s=1)
    assert registry.alive("trunk", "w0")
    time.sleep(1.2)
    assert not registry.alive("trunk", "w0")


def test_heartbeat_thread_keeps_key_alive(registry):
    hb = Heartbeat(registry, "silo", "s0", period_s=0.2, ttl_s=1).start()
    try:
        time.sleep(1.5)
        assert registry.alive("silo", "s0")
    finally:
        hb.stop()


def test_rejected_counters(registry):
    registry.count_rejected("bad_tag")
    registry.count_rejected("bad_tag")
    registry.count_rejected("replay")
    assert registry.rejected() == {"bad_tag": 2, "replay": 1}


def test_delete_run_removes_only_this_run(registry):
    from shared.state.registry import Registry

    other = Registry(registry.url, registry.prefix, "run2")
    registry.create_run({"mode": "serial"})
    other.create_run({"mode": "serial"})
    registry.delete_run()
    assert registry.run_keys() == []
    assert other.run_meta()["mode"] == "serial"
    other.delete_run()


def test_heartbeat_publishes_live_status(registry):
    load = {"updates": 0}
    hb = Heartbeat(registry, "trunk", "w0", period_s=0.1, ttl_s=2, status_fn=lambda: dict(load)).start()
    try:
        load["updates"] = 7
        time.sleep(0.5)
        assert registry.info("trunk", "w0")["updates"] == "7"
    finally:
        hb.stop()


def test_finished_run_has_no_open_round(registry):
    registry.create_run({"mode": "serial"})
    registry.commit_round(0)
    registry.finish_rounds()
    assert registry.round_state()["state"] == "finished"
