"""Audit chain benchmark: concurrent audited write transactions, each locking two of a few
shared rows, one before and one after writing its audit row (as services do: quota lock, host,
VM rows). The rows are always locked in id order, so the rows alone cannot deadlock. Two modes
on the same load:

- ``sealed``: the product's mechanism (accounts/audit.py): rows written without a lock, sealed
  into the chain after commit;
- ``locked``: the former mechanism, emulated: the chain's advisory lock taken where the row is
  written and held until commit (no sealing after commit; the rows are sealed once at the end).

Prints JSON per mode: transactions done, deadlocks (PostgreSQL aborted the transaction), their
rate, latency p50/p99, rows left unsealed after the run, and whether ``audit_chain_verify``
passes. Needs PostgreSQL (DATABASE_URL); runs in a throwaway database it creates and drops.
Not a test: nothing is asserted.

    DATABASE_URL=postgres://... .venv/bin/python benchmarks/audit_chain.py --threads 8 --transactions 50
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sandbox_site.settings")


def run_mode(mode: str, threads: int, transactions: int, rows: int, work_ms: float) -> dict:
    from django.contrib.auth import get_user_model
    from django.db import OperationalError, connection, transaction

    from accounts import audit
    from accounts.models import AuditEvent

    User = get_user_model()
    AuditEvent.objects.all()._raw_delete(AuditEvent.objects.db)
    users = [User.objects.get_or_create(username=f"bench{i}")[0] for i in range(rows)]
    done, deadlocks, latencies = [0], [0], []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            start.wait(30)
            for _ in range(transactions):
                first, second = sorted(rnd.sample(users, 2), key=lambda u: u.pk)
                t0 = time.perf_counter()
                try:
                    with transaction.atomic():
                        list(User.objects.select_for_update().filter(pk=first.pk).values_list("pk"))
                        if mode == "locked":
                            audit._lock_chain()  # the former mechanism: held until commit
                        audit.audit_record(actor=first, action="bench.write", obj=first)
                        time.sleep(work_ms / 1000)
                        list(User.objects.select_for_update().filter(pk=second.pk).values_list("pk"))
                    with lock:
                        done[0] += 1
                        latencies.append(time.perf_counter() - t0)
                except OperationalError as exc:
                    if "deadlock" not in str(exc):
                        raise
                    with lock:
                        deadlocks[0] += 1
        finally:
            connection.close()

    if mode == "locked":
        real_on_commit = audit.transaction.on_commit
        audit.transaction.on_commit = lambda *args, **kwargs: None  # django.db.transaction, for this run
    t0 = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - t0
    if mode == "locked":
        audit.transaction.on_commit = real_on_commit
        audit.audit_chain_seal()  # the emulation's rows, to verify the same way
    unsealed = AuditEvent.objects.filter(chain_seq__isnull=True).count()
    report = audit.audit_chain_verify()
    ordered = sorted(latencies)
    return {
        "mode": mode,
        "committed": done[0],
        "deadlocks": deadlocks[0],
        "deadlock_rate": round(deadlocks[0] / (threads * transactions), 4),
        "commits_per_s": round(done[0] / elapsed, 1),
        "latency_p50_ms": round(statistics.median(ordered) * 1000, 1) if ordered else None,
        "latency_p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 1)
        if ordered
        else None,
        "unsealed_after_run": unsealed,
        "chain_ok": report.ok,
        "chain_rows": report.checked,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--transactions", type=int, default=50, help="per thread")
    parser.add_argument("--rows", type=int, default=8, help="shared rows the transactions lock")
    parser.add_argument("--work-ms", type=float, default=2.0, help="time spent between the audit and the second lock")
    args = parser.parse_args()

    import django

    django.setup()
    from django.db import connection

    if connection.vendor != "postgresql":
        sys.exit("needs PostgreSQL (DATABASE_URL)")
    # Its own database, never the test suite's ("test_<name>").
    connection.settings_dict["TEST"]["NAME"] = f"bench_audit_chain_{os.getpid()}"
    name = connection.creation.create_test_db(verbosity=0, autoclobber=True)
    try:
        results = [
            run_mode(mode, args.threads, args.transactions, args.rows, args.work_ms) for mode in ("sealed", "locked")
        ]
    finally:
        connection.creation.destroy_test_db(name, verbosity=0)
    print(
        json.dumps(
            {"threads": args.threads, "transactions_per_thread": args.transactions, "results": results}, indent=2
        )
    )


if __name__ == "__main__":
    main()
