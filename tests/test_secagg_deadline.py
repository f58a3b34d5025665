"""The secure round's deadline rule (`tiesfed.coordinator.secure.deadline.PhaseClock`), on a
clock the test moves: a phase closes `phase_s` after it opens unless a missing client's stream
keeps delivering bytes *and* keeps up `min_rate`; a stall, a detach, or a trickle below the
rate ends the wait, and reconnecting does not reset a stream's account."""

from __future__ import annotations

from tiesfed.coordinator.secure.deadline import PhaseClock

PHASE_S, RATE = 10.0, 1000.0  # 10 s; 1,000 bytes a second


def clock(opened: float | None = 0.0) -> PhaseClock:
    c = PhaseClock(PHASE_S, RATE)
    c.open(opened)
    return c


def test_a_phase_is_late_at_its_deadline_when_no_missing_client_streams():
    c = clock()
    assert not c.late({"a"}, 9.99) and c.late({"a"}, 10.0) and c.deadline == 10.0
    c.attach("b", 1.0)  # an arrived client's stream does not hold it (only the missing ones count)
    assert c.late({"a"}, 10.0)
    assert c.late(set(), 10.0)


def test_the_key_phase_starts_at_its_first_advert():
    c = clock(None)
    assert not c.late({"a"}, 1e9) and c.deadline == 0.0
    c.start(100.0)
    c.start(150.0)  # only the first counts
    assert not c.late({"a"}, 109.0) and c.late({"a"}, 110.0)


def test_a_steady_stream_above_the_rate_holds_the_phase_and_a_stall_ends_it():
    c = clock()
    c.attach("a", 0.0)
    for t in range(1, 31):  # 2,000 bytes a second for 30 s
        c.advance("a", 2000, float(t))
    assert not c.late({"a"}, 30.5)
    assert not c.late({"a"}, 39.9) and c.late({"a"}, 40.0)  # no bytes for phase_s: stalled


def test_a_trickle_below_the_rate_holds_it_only_for_what_it_delivered():
    """10 bytes a second: it may hold the phase phase_s + delivered / min_rate past its first attach."""
    c = clock()
    c.attach("a", 0.0)
    for t in range(1, 100):
        c.advance("a", 10, float(t))
        if not c.holds("a", float(t)):
            break
    # at t: delivered 10·t, the wait ends once t ≥ 10 + 10·t/1000
    assert t == 11 and c.late({"a"}, float(t))


def test_empty_chunks_count_for_nothing():
    c = clock()
    c.attach("a", 0.0)
    for t in range(1, 30):
        c.advance("a", 0, float(t))
    assert c.late({"a"}, 10.0)


def test_detaching_ends_the_wait_and_reattaching_keeps_the_account():
    c = clock()
    c.attach("a", 0.0)
    c.advance("a", 20_000, 5.0)  # holds until 0 + 10 + 20 = 30 s (while it keeps sending)
    c.detach("a")
    assert c.late({"a"}, 12.0)
    c.attach("a", 12.0)  # back: its first attach and its bytes still count, not a fresh grace
    c.advance("a", 1, 13.0)
    assert not c.late({"a"}, 20.0) and c.late({"a"}, 30.0)
    c.open(40.0)  # the next phase starts every account afresh
    assert not c.holds("a", 41.0) and not c.late({"a"}, 41.0)
