"""The embedded SQLite store is a queue store too: the PostgreSQL store's queue
contract (tests/server/test_pgstore.py) run against it, plus what is its own
(leases die with the process that held them)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from secateur.server.jobstore.records import JobState
from secateur.server.jobstore.sqlite import SqliteJobStore
from tests.server import test_pgstore as contract

# The contract's checks that take (store, other): "other" is another replica
# or worker on the same database; one process owns a SQLite file, so it is
# the same store here.
SHARED_CHECKS: list[Callable[..., None]] = [
    contract.test_claim_oldestFirst_runningOnTheWorkerWithALease,
    contract.test_leaseExpiry_reclaimedWithAttemptsPlusOne_thenGivenUpAtTheCap,
    contract.test_staleToken_saveLeasedAndFenceRefuse,
    contract.test_fence_extendsTheLease,
    contract.test_fence_recordsTheVersionToPublish_theNextClaimGetsIt,
    contract.test_givenUpWithARecordedVersion_isClaimedOnlyToSettleIt_itsCancelKept,
    contract.test_requestCancel_queuedWithARecordedVersion_isEndedByTheNextClaimToSettleIt,
    contract.test_requestCancel_queuedEndsAtOnce_runningIsFlaggedForItsWorker,
    contract.test_requestCancel_ofAJobWhoseWorkerDied_endsCancelledOnReclaim,
    contract.test_counts_everyStateFromTheDatabase,
]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteJobStore]:
    opened = SqliteJobStore(str(tmp_path / "state"))
    yield opened
    opened.close()


@pytest.mark.parametrize("check", SHARED_CHECKS, ids=lambda c: c.__name__.removeprefix("test_"))
def test_sqliteStore_meetsTheQueueContract(check: Callable[..., None], store) -> None:
    names = check.__code__.co_varnames[: check.__code__.co_argcount]
    check(*(store for _ in names))


def test_sweepWork_removesDirsNoLiveLeaseHolds(store: SqliteJobStore, tmp_path: Path) -> None:
    contract.test_sweepWork_removesDirsNoLiveLeaseHolds(store, store, tmp_path)


def test_subscribers_hearEveryWrite_untilTheyUnsubscribe(store: SqliteJobStore) -> None:
    heard: list[str | None] = []
    unsubscribe = store.subscribe(heard.append)
    store.insert(contract._record("s"))
    claim = store.claim("w", 30.0, 3)
    assert claim is not None
    assert store.save_leased(claim.record.evolve(stage="PRUNING"), claim.token)
    unsubscribe()
    store.request_cancel("s")
    assert heard == ["s", "s", "s"]


def test_leases_dieWithTheProcess_aReopenedStoreHasNone(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    first = SqliteJobStore(state)
    first.insert(contract._record("j"))
    claim = first.claim("w1", 30.0, 3)
    assert claim is not None and claim.token == 1
    first.close()  # the server died with the job running
    again = SqliteJobStore(state)
    try:
        assert again.live_leases(["j"]) == {}
        assert not again.renew("j", claim.token, 30.0).held  # the old lease is gone
        reclaimed = again.claim("w2", 30.0, 3)
        assert reclaimed is not None and reclaimed.record.id == "j"
        assert (reclaimed.record.attempts, reclaimed.token) == (2, 2)  # tokens keep growing
        assert again.get("j").state == JobState.RUNNING
    finally:
        again.close()


def test_cancelAndPublication_outliveTheProcess_aReopenedStoreHasThem(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    first = SqliteJobStore(state)
    for job in ("c", "p"):
        first.insert(contract._record(job))
    cancelled, published = first.claim("w1", 30.0, 3), first.claim("w1", 30.0, 3)
    assert cancelled is not None and published is not None
    assert first.fence(published.record.id, published.token, 1.0, "/out/1")
    first.request_cancel(cancelled.record.id)  # the server dies before its worker sees it
    first.close()
    again = SqliteJobStore(state)
    try:
        for job in ("c", "p"):  # as JobManager.start recovers them
            again.save(again.get(job).evolve(state=JobState.QUEUED))  # type: ignore[union-attr]
        ended = again.claim("w2", 30.0, 3)  # "c" is not run again: handed over to end it
        assert ended is not None and ended.record.id == "c" and ended.ending is not None
        assert (ended.ending.state, ended.ending.attempts) == (JobState.CANCELLED, 1)
        claim = again.claim("w2", 30.0, 3)
        assert claim is not None and (claim.record.id, claim.publish_uri) == ("p", "/out/1")
        assert claim.ending is None
        assert again.claim("w2", 30.0, 3) is None
        assert again.save_leased(ended.ending, ended.token)  # the claimer writes its end
        assert again.get("c").state == JobState.CANCELLED  # type: ignore[union-attr]
    finally:
        again.close()
