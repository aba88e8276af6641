#!/usr/bin/env python3
"""The demo's and the benchmarks' reports, and the job files they enqueue. The scripts orchestrate; this reports.

    e2e/report.py demo-jobs  COUNT SECONDS                 -> the demo's jobs (multi-document YAML, stdout)
    e2e/report.py bench-jobs FILE COUNT HANDLER ARGS_JSON  -> a benchmark scenario's jobs, written to FILE
    e2e/report.py demo       DIR --jobs N --replicas R --slots S --seconds X
                                                           -> the demo's summary; exit 1 on FAIL
    e2e/report.py scenario   DIR                           -> one benchmark scenario's figures and DIR/result.json;
                                                              exit 1 if a job was lost, duplicated or re-executed
    e2e/report.py bench      RUN_DIR                       -> the benchmark's markdown report
    e2e/report.py raw-share  NOOP_RESULT RAW_RESULT        -> the share of the raw write rate the queue used

Whether every job ran exactly once is not decided here: `bgjobs-history audit DIR` (e2e/history, the same oracle
the tests and the adversarial checker use) writes DIR/audit.json from the replicas' audit trail (`*.inv`), and
this file only reads its figures. A duplicate is two executions of one job at the same time; a re-execution is a
job run again after an earlier run ended, legitimate after a fault, a failure in these runs, which inject none.
"""

from __future__ import annotations

import argparse
import bisect
import glob
import json
import math
import os
import random
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from typing import Any

RANK = {"Low": 0, "BelowNormal": 1, "Normal": 2, "AboveNormal": 3, "High": 4}
WRITE_VERBS = {"POST", "PUT", "PATCH", "DELETE", "DELETECOLLECTION", "CREATE", "UPDATE", "APPLY"}
QUEUE_RESOURCES = ("backgroundjobs", "leases", "events")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if x is None else format(x, spec) + suffix


def load_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def replica_counters(d: str) -> dict[str, dict[str, int]]:
    """Each replica's own counters, from its last "bgjobs operator stopped stats={...}" log line."""
    out = {}
    for path in sorted(glob.glob(os.path.join(d, "replica-*.log"))):
        with open(path, errors="replace") as f:
            found = re.findall(r"stats=(\{[^}]*\})", ANSI.sub("", f.read()))
        if found:
            out[os.path.basename(path)[: -len(".log")]] = json.loads(found[-1])
    return out


def phase_of(job: dict[str, Any]) -> str:
    return (job.get("status") or {}).get("phase") or "Waiting"


# --- job files ---------------------------------------------------------------------------------------------------


def demo_jobs(count: int, seconds: str) -> None:
    # 10% High, 20% AboveNormal, 50% Normal, 20% Low, shuffled with a fixed seed: every run enqueues the same queue.
    mix = ["High"] * 10 + ["AboveNormal"] * 20 + ["Normal"] * 50 + ["Low"] * 20
    rng = random.Random(2024)
    width = max(4, len(str(count)))
    for i in range(1, count + 1):
        print(f"""---
apiVersion: bgjobs.dev/v1alpha1
kind: BackgroundJob
metadata:
  name: demo-{i:0{width}d}
  labels:
    app.kubernetes.io/part-of: bgjobs-demo
spec:
  jobName: sleep
  args:
    seconds: {seconds}
  priority: {rng.choice(mix)}""")


def bench_jobs(path: str, count: int, handler: str, args: str) -> None:
    # Names b-00001... sort in creation order.
    with open(path, "w") as f:
        for i in range(1, count + 1):
            f.write(f"""---
apiVersion: bgjobs.dev/v1alpha1
kind: BackgroundJob
metadata:
  name: b-{i:05d}
spec:
  jobName: {handler}
  args: {args}
""")


# --- the demo ----------------------------------------------------------------------------------------------------


def demo(d: str, expected: int, replicas: int, slots: int, seconds: float) -> bool:
    jobs = {j["metadata"]["name"]: j for j in load_json(os.path.join(d, "final-jobs.json"))["items"]}
    audit = load_json(os.path.join(d, "audit.json"))
    runs = {name.split("/", 1)[1]: r for name, r in audit.get("jobs", {}).items()}

    width = max(4, len(str(expected)))
    names = [f"demo-{i:0{width}d}" for i in range(1, expected + 1)]

    def phase(n: str) -> str:
        return phase_of(jobs[n]) if n in jobs else "missing"

    lost = [n for n in names if phase(n) != "Succeeded"]
    re_executed = sorted(n for n, r in runs.items() if r["executions"] > 1)
    makespan = audit["makespan_ms"] / 1000 if audit["makespan_ms"] is not None else float("nan")
    ideal = math.ceil(expected / (replicas * slots)) * seconds
    efficiency = 100 * ideal / makespan if makespan > 0 else float("nan")

    # Priority inversions: pairs (a, b) where b has LOWER priority and was created AFTER a (creation order = name
    # order), yet a started more than 1 s after b. Also, for information, the same within one priority (FIFO).
    first_start = {n: r["first_start_ms"] for n, r in runs.items()}
    order = [n for n in names if n in first_start and n in jobs]
    prio = {n: RANK[jobs[n]["spec"].get("priority", "Normal")] for n in order}
    later: dict[int, list[int]] = defaultdict(list)  # priority -> sorted first starts of jobs created after this one
    earliest: dict[int, tuple[int, str]] = {}  # priority -> (first start, name) of the earliest such job
    inv_pairs, inv_worst, inv_example = 0, 0, None
    fifo_pairs, fifo_worst = 0, 0
    for n in reversed(order):
        t, p = first_start[n], prio[n]
        for q in range(p + 1):
            k = bisect.bisect_left(later[q], t - 1000)  # later-created jobs of priority q that started > 1 s before n
            if not k:
                continue
            delay = t - earliest[q][0]
            if q < p:
                inv_pairs += k
                if delay > inv_worst:
                    inv_worst, inv_example = delay, (n, earliest[q][1])
            else:
                fifo_pairs += k
                fifo_worst = max(fifo_worst, delay)
        bisect.insort(later[p], t)
        if p not in earliest or t < earliest[p][0]:
            earliest[p] = (t, n)

    # Queue wait by priority: creation (whole seconds) to first start.
    waits: dict[str, list[float]] = defaultdict(list)
    for n in order:
        created = datetime.fromisoformat(jobs[n]["metadata"]["creationTimestamp"].replace("Z", "+00:00")).timestamp()
        waits[jobs[n]["spec"].get("priority", "Normal")].append(max(0.0, first_start[n] / 1000 - created))

    counters = replica_counters(d)

    def row(label: str, value: str, note: str = "") -> None:
        print(f"  {label:<22}{value:<14}{note}")

    per_worker = audit["per_worker"]
    succeeded = sum(1 for n in names if phase(n) == "Succeeded")
    row("jobs", f"{expected}", f"{succeeded} succeeded, {audit['started']} started at least once")
    row("makespan", f"{makespan:.1f} s", "first start -> last end (invocation logs)")
    row("ideal makespan", f"{ideal:.1f} s", f"ceil({expected} / ({replicas} x {slots})) x {seconds:g} s")
    if lost:
        row("efficiency", "n/a", "not every job finished")
    else:
        row("efficiency", f"{efficiency:.1f} %", "ideal / makespan")
    row("jobs per replica", ", ".join(f"{w}: {c}" for w, c in sorted(per_worker.items())) or "none")
    if counters:

        def total(k: str) -> int:
            return sum(c.get(k, 0) for c in counters.values())

        row(
            "claim conflicts", f"{total('claim_conflicts')}", "claims lost to another replica (harmless, counted by the replicas)"
        )
        row("takeovers", f"{total('takeovers')}", "attempts taken over from a replica that stopped renewing")
        row("stale results", f"{total('stale_results_discarded')}", "outcomes discarded because the claim was gone")
    dup_note = "executions of one job at the same time (must be 0)"
    if audit["duplicate_pairs"]:
        dup_note += ": " + "; ".join(audit["duplicate_pairs"][:3])
    row("duplicates", f"{audit['duplicates']}", dup_note)
    re_note = "jobs started again after a run ended (no fault injected: must be 0)"
    if re_executed:
        re_note += ": " + ", ".join(re_executed[:10])
    row("re-executions", f"{audit['re_executions']}", re_note)
    lost_note = "jobs not Succeeded (must be 0)"
    if lost:
        lost_note += ": " + ", ".join(f"{n} ({phase(n)})" for n in lost[:10])
    row("lost", f"{len(lost)}", lost_note)
    if audit["unended"]:
        row("unfinished executions", f"{audit['unended']}", "start lines without an end line")
    note = f"worst {inv_worst / 1000:.1f} s"
    if inv_example:
        note += f": {inv_example[0]} waited for later, lower-priority {inv_example[1]}"
    row("priority inversions", f"{inv_pairs}", note)
    row("FIFO inversions", f"{fifo_pairs}", f"same priority, later job started > 1 s earlier; worst {fifo_worst / 1000:.1f} s")
    print("  queue wait by priority (creation -> first start, s):")
    for p in sorted(waits, key=lambda p: -RANK[p]):
        w = waits[p]
        print(f"    {p:<12} {len(w):>5} jobs   median {statistics.median(w):5.1f}   max {max(w):5.1f}")

    ok = not audit["duplicates"] and not audit["re_executions"] and not lost
    print()
    if ok:
        print(f"PASS: every one of the {expected} jobs ran exactly once (0 duplicates, 0 re-executions, 0 lost)")
    else:
        print(
            f"FAIL: {audit['duplicates']} duplicates, {audit['re_executions']} re-executions, {len(lost)} lost "
            "(details: .demo/)"
        )
    return ok


# --- one benchmark scenario ----------------------------------------------------------------------------------------


def load_metrics(path: str) -> dict[str, float]:
    out = {}
    try:
        with open(path) as f:
            for line in f:
                labels, _, value = line.rpartition(" ")
                out[labels] = float(value)
    except OSError:
        pass
    return out


def writes(a: dict[str, float], b: dict[str, float]) -> dict[tuple[str, str, str], float]:
    """API writes between two snapshots of apiserver_request_total (all response codes: a 409 costs too)."""
    by: dict[tuple[str, str, str], float] = defaultdict(float)
    for series, v in b.items():
        if not series.startswith("apiserver_request_total{"):
            continue
        lab = dict(LABEL.findall(series))
        if lab.get("verb") not in WRITE_VERBS:
            continue
        delta = v - a.get(series, 0.0)
        if delta:
            by[(lab.get("resource", ""), lab.get("verb", ""), lab.get("code", ""))] += delta
    return by


def watched_writes(d: str) -> dict[str, int] | None:
    """Successful writes in the scenario's namespace, from its watches; None if a watch is incomplete."""
    watched = {}
    for r in QUEUE_RESOURCES:
        try:
            with open(os.path.join(d, f"watch-{r}.jsonl")) as f:
                types = [json.loads(line).get("type") for line in f if line.strip()]
        except (OSError, ValueError):
            return None
        if "ERROR" in types or os.path.exists(os.path.join(d, f"watch-{r}.ended-early")):
            return None  # incomplete: it cannot tell this benchmark's writes from other clients'
        watched[r] = sum(1 for t in types if t in ("ADDED", "MODIFIED", "DELETED"))
    return watched


def scenario(d: str) -> bool:
    meta = load_json(os.path.join(d, "meta.json"))
    audit = load_json(os.path.join(d, "audit.json"))
    jobs, n, slots, seconds = meta["jobs"], meta["replicas"], meta["slots"], meta["seconds"]

    first = audit["first_start_ms"]
    makespan = audit["makespan_ms"] / 1000 if audit["makespan_ms"] is not None else None
    by_worker = audit["first_start_by_worker"]
    skew = (max(by_worker.values()) - first) / 1000 if by_worker else None
    utilization = audit["busy_ms"] / 1000 / (makespan * n * slots) if makespan else None
    ideal = jobs / (n * slots) * seconds if meta["handler"] == "sleep" else None
    efficiency = ideal / makespan if ideal and makespan else None
    jobs_per_s = jobs / makespan if makespan else None

    phases: dict[str, int] = defaultdict(int)
    try:
        for j in load_json(os.path.join(d, "final-jobs.json"))["items"]:
            phases[phase_of(j)] += 1
    except (OSError, ValueError):
        pass
    not_succeeded = jobs - phases.get("Succeeded", 0)

    counters: dict[str, int] = defaultdict(int)
    by_replica = replica_counters(d)
    for c in by_replica.values():
        for k, v in c.items():
            counters[k] += v
    missing_stats = [
        os.path.basename(p)
        for p in sorted(glob.glob(os.path.join(d, "replica-*.log")))
        if os.path.basename(p)[: -len(".log")] not in by_replica
    ]

    m0 = load_metrics(os.path.join(d, "metrics-0-before-create.txt"))
    m1 = load_metrics(os.path.join(d, "metrics-1-before-replicas.txt"))
    m2 = load_metrics(os.path.join(d, "metrics-2-after.txt"))
    have_metrics = bool(m1 and m2)
    run_w = writes(m1, m2) if have_metrics else {}
    by_resource = {r: int(sum(v for (res, _, _), v in run_w.items() if res == r)) for r in QUEUE_RESOURCES}
    by_verb: dict[str, int] = defaultdict(int)
    for (res, verb, code), v in run_w.items():
        if res in QUEUE_RESOURCES:
            by_verb[f"{res} {verb}" + ("" if code.startswith("2") else f" ({code})")] += int(v)
    terminated = {}
    for series, v in m2.items():
        if series.startswith("apiserver_terminated_watchers_total{") and v - m1.get(series, 0.0) > 0:
            terminated[dict(LABEL.findall(series)).get("resource", "?")] = int(v - m1.get(series, 0.0))
    conflict_409 = int(sum(v for (res, _, code), v in run_w.items() if res in QUEUE_RESOURCES and code == "409"))
    other = int(sum(v for (res, _, _), v in run_w.items() if res not in QUEUE_RESOURCES))
    queue_writes = sum(by_resource.values())

    watched = watched_writes(d)
    # What the apiserver counted beyond this namespace's successful writes and its 409s came from other clients.
    foreign = queue_writes - conflict_409 - sum(watched.values()) if have_metrics and watched is not None else None
    contaminated = foreign is not None and foreign > max(5, 0.01 * queue_writes)
    # Then count only this namespace's successful writes plus the 409s the replicas caused: each lost claim is
    # exactly one 409 answer (a Lease create or a status write), which the replicas count as claim_conflicts.
    own_409 = min(conflict_409, counters.get("claim_conflicts", 0))
    own_writes = sum(watched.values()) + own_409 if contaminated and watched is not None else queue_writes
    enqueue_writes = int(sum(v for (res, _, _), v in writes(m0, m1).items() if res == "backgroundjobs")) if m0 and m1 else None

    result = dict(meta)
    result.update(
        makespan_s=makespan,
        ideal_s=ideal,
        efficiency=efficiency,
        jobs_per_s=jobs_per_s,
        duplicates=audit["duplicates"],
        re_executions=audit["re_executions"],
        unended=audit["unended"],
        started=audit["started"],
        not_succeeded=not_succeeded,
        phases=dict(phases),
        per_worker=dict(sorted(audit["per_worker"].items())),
        start_skew_s=skew,
        utilization=utilization,
        counters=dict(counters),
        missing_stats=missing_stats,
        api_writes_all_clients=queue_writes if have_metrics else None,
        api_writes=own_writes if have_metrics else None,
        api_writes_per_job=own_writes / jobs if have_metrics else None,
        watched_writes=watched,
        foreign_writes=foreign,
        contaminated=contaminated,
        terminated_watchers=terminated,
        api_writes_by_resource=by_resource,
        api_writes_by_verb=dict(sorted(by_verb.items())),
        api_409=conflict_409,
        other_writes=other,
        enqueue_writes=enqueue_writes,
        conflicts_per_job=counters.get("claim_conflicts", 0) / jobs,
    )
    with open(os.path.join(d, "result.json"), "w") as f:
        json.dump(result, f, indent=1)

    def row(label: str, value: str, note: str = "") -> None:
        print(f"  {label:<20}{value:<16}{note}")

    print()
    row("makespan", f"{fmt(makespan, '.1f')} s", "first attempt start -> last attempt end (invocation logs)")
    if ideal is not None:
        row("ideal", f"{ideal:.1f} s", f"{jobs} / ({n} x {slots}) x {seconds:g} s")
        goal = "  (goal >= 95 %)" if meta["id"] == "seed" else ""
        row("efficiency", f"{fmt(efficiency and 100 * efficiency, '.1f')} %", "ideal / makespan" + goal)
    else:
        row("throughput", f"{fmt(jobs_per_s, '.1f')} jobs/s", "jobs / makespan")
    row("slot utilization", f"{fmt(utilization and 100 * utilization, '.1f')} %", "time inside handlers / (makespan x slots)")
    row("start skew", f"{fmt(skew, '.2f')} s", "last replica's first start - first start")
    row("jobs per replica", ", ".join(f"{w}: {c}" for w, c in result["per_worker"].items()) or "none")
    row("duplicates", f"{audit['duplicates']}", "executions of one job at the same time (must be 0)")
    row("re-executions", f"{audit['re_executions']}", "jobs started again after a run ended (no fault injected: must be 0)")
    others = ", ".join(f"{p}: {c}" for p, c in sorted(phases.items()) if p != "Succeeded")
    row("not succeeded", f"{not_succeeded}", others or "(must be 0)")
    row(
        "claim conflicts",
        f"{counters.get('claim_conflicts', 0)}",
        f"{result['conflicts_per_job']:.3f} per job (replicas' own counters)",
    )
    for k in ("takeovers", "stale_results_discarded", "renew_failures"):
        if counters.get(k):
            row(k.replace("_", " "), f"{counters[k]}")
    if missing_stats:
        row("no final stats line", ", ".join(missing_stats))
    if have_metrics:
        per_res = ", ".join(f"{r} {c}" for r, c in by_resource.items())
        row("API writes", f"{queue_writes}", f"{queue_writes / jobs:.2f} per job (apiserver_request_total): {per_res}")
        row("", "", "; ".join(f"{k} {v}" for k, v in sorted(by_verb.items())) + f"; {conflict_409} answered 409")
        if watched is not None:
            seen = sum(watched.values())
            row(
                "seen in namespace",
                f"{seen}",
                "successful writes (watch events): "
                + ", ".join(f"{r} {c}" for r, c in watched.items())
                + f"; + {conflict_409} answered 409 = {seen + conflict_409}",
            )
        if terminated:
            row(
                "watchers cut",
                f"{sum(terminated.values())}",
                "watches the apiserver closed for not keeping up (any client): "
                + ", ".join(f"{k} {v}" for k, v in terminated.items()),
            )
        if watched is None:
            row(
                "seen in namespace",
                "n/a",
                "a namespace watch ended early (watch-*.ended-early): other clients' writes cannot be told apart",
            )
        if contaminated and watched is not None:
            row(
                "OTHER CLIENTS",
                f"{queue_writes - own_writes}",
                "writes to these resources by other clients of the shared "
                f"apiserver: not counted; this benchmark's: {sum(watched.values())} + {own_409} lost claims = "
                f"{own_writes / jobs:.2f} writes/job",
            )
        if other:
            row("other writes", f"{other}", "to other resources in the same interval (other clients, controllers)")
    row(
        "CPU",
        f"{meta['replica_cpu_s']:.1f} s",
        f"replicas; apiserver {meta['apiserver_cpu_s']:.1f} s, etcd "
        f"{meta['etcd_cpu_s']:.1f} s (load {meta['load_before']} -> {meta['load_after']})",
    )
    ok = not audit["duplicates"] and not audit["re_executions"] and not_succeeded == 0 and meta["complete"]
    if not ok:
        print(
            f"  CHECK FAILED: {audit['duplicates']} duplicates, {audit['re_executions']} re-executions, "
            f"{not_succeeded} not succeeded"
        )
    return ok


# --- the benchmark's report ----------------------------------------------------------------------------------------


def raw_share(noop: dict[str, Any], raw: dict[str, Any]) -> str | None:
    if noop.get("jobs_per_s") and noop.get("api_writes_per_job") and raw.get("creates_per_s"):
        used = noop["jobs_per_s"] * noop["api_writes_per_job"]
        return (
            f"the queue wrote {used:.0f} writes/s ({noop['jobs_per_s']:.1f} jobs/s x {noop['api_writes_per_job']:.2f} "
            f"writes/job): it uses {100 * used / raw['creates_per_s']:.0f}% of the apiserver's raw write capacity "
            f"({raw['creates_per_s']:.0f} creates/s)"
        )
    return None


def try_load(path: str) -> dict[str, Any] | None:
    try:
        return load_json(path)
    except (OSError, ValueError):
        return None


def bench(run: str) -> None:
    with open(os.path.join(run, "order.txt")) as f:
        order = [line.strip() for line in f if line.strip()]
    res = {i: r for i in order if (r := try_load(os.path.join(run, i, "result.json")))}
    raw = try_load(os.path.join(run, "raw", "result.json"))

    print("## bgjobs benchmark\n")
    with open(os.path.join(run, "machine.txt")) as f:
        for line in f:
            print(f"- {line.strip()}")
    print()
    print(
        "Jobs are created before the replicas start (one `kubectl create -f`); makespan = first attempt start -> "
        "last attempt end (invocation logs); ideal = jobs / (replicas x slots) x job seconds; efficiency = ideal / makespan; "
        "duplicates = executions of one job at the same time, re-executions = jobs started again after a run ended "
        "(both from `bgjobs-history audit`); "
        "API writes = the apiserver's apiserver_request_total for backgroundjobs, leases and events "
        "(POST/PUT/PATCH/DELETE/APPLY, any response code) from replica start to replica stop, so the enqueue POST is "
        "not included; load = the machine's "
        "1-minute load average before and after the scenario (the control plane, the replicas and anything else share "
        f"{os.cpu_count()} CPUs).\n"
    )
    print(
        "| scenario | strategy | replicas x slots | jobs | makespan | ideal | efficiency | jobs/s | duplicates / re-executions "
        "| not succeeded | claim conflicts/job | API writes/job | load 1 min |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i in order:
        r = res.get(i)
        if not r:
            print(f"| {i} | (no result) ||||||||||||")
            continue
        sleep = f" {r['seconds']:g} s" if r["handler"] == "sleep" else ""
        print(
            f"| {r['title']} | {r['strategy']} | {r['replicas']} x {r['slots']} | {r['jobs']} x {r['handler']}{sleep}"
            f" | {fmt(r['makespan_s'], '.1f', ' s')} | {fmt(r['ideal_s'], '.1f', ' s')}"
            f" | {fmt(r['efficiency'] and 100 * r['efficiency'], '.1f', ' %')}"
            f" | {fmt(r['jobs_per_s'], '.1f')} | {r['duplicates']} / {r['re_executions']} | {r['not_succeeded']}"
            f" | {r['conflicts_per_job']:.3f}"
            f" | {fmt(r['api_writes_per_job'], '.2f')}{' *' if r.get('contaminated') else ''}"
            f" | {r['load_before']:g} -> {r['load_after']:g} |"
        )

    seed = res.get("seed")
    if seed and seed.get("efficiency"):
        verdict = "met" if seed["efficiency"] >= 0.95 else "missed"
        floor = math.ceil(seed["jobs"] / (seed["replicas"] * seed["slots"])) * seed["seconds"]
        print(
            f"\nseed efficiency {100 * seed['efficiency']:.1f} % (goal >= 95 %): {verdict}; duplicates {seed['duplicates']}, "
            f"re-executions {seed['re_executions']} (must be 0). Equal jobs run in whole rounds, so no schedule beats "
            f"{floor:g} s here: at most {100 * seed['ideal_s'] / floor:.1f} % by this definition."
        )
    if any(r.get("contaminated") for r in res.values()):
        print(
            "\n\\* other clients of the shared apiserver wrote to these resources during the run (seen as apiserver-counted "
            "writes that the scenario namespace's watch did not see); the figure is this benchmark's own: successful "
            "writes in its namespace (watch events) + one 409 answer per claim conflict the replicas counted."
        )
    noop = res.get("noop")
    if noop or raw:
        print("\n| no-op throughput | value |")
        print("|---|---|")
        if noop:
            br = noop.get("api_writes_by_resource") or {}
            per_res = ", ".join(f"{k} {v / noop['jobs']:.2f}" for k, v in br.items())
            by_verb = "; ".join(f"{k} {v}" for k, v in noop["api_writes_by_verb"].items())
            print(
                f"| jobs/s ({noop['jobs']} noop jobs, {noop['replicas']} x {noop['slots']}) | {fmt(noop['jobs_per_s'], '.1f')} |"
            )
            print(
                "| API writes per job (operator, excl. the enqueue POST) | "
                f"{fmt(noop['api_writes_per_job'], '.2f')} ({per_res}) |"
            )
            print(f"| API writes during the run, by resource and verb | {by_verb} ({noop['api_409']} answered 409) |")
            print(
                f"| claim conflicts per job | {noop['conflicts_per_job']:.3f} "
                f"({noop['counters'].get('claim_conflicts', 0)} total) |"
            )
            print(
                f"| CPU during the run | replicas {noop['replica_cpu_s']:.1f} s, apiserver {noop['apiserver_cpu_s']:.1f} s, "
                f"etcd {noop['etcd_cpu_s']:.1f} s |"
            )
        if raw:
            print(
                f"| apiserver raw write rate ({raw['creates']} Lease creates, {raw['concurrency']} streams) | "
                f"{raw['creates_per_s']:.0f} creates/s (p50 {raw['p50_ms']:.1f} ms, p99 {raw['p99_ms']:.1f} ms, "
                f"{raw['errors']} errors) |"
            )
        if noop and raw and noop.get("jobs_per_s") and noop.get("api_writes_per_job"):
            used = noop["jobs_per_s"] * noop["api_writes_per_job"]
            print(
                f"| queue write rate | {used:.0f} writes/s: the queue uses {100 * used / raw['creates_per_s']:.0f}% of the "
                "apiserver's raw write capacity |"
            )

    ex, par = res.get("baseline-exclusive"), res.get("baseline-parallel")
    if ex and par and ex.get("makespan_s") and par.get("makespan_s"):

        def busy(r: dict[str, Any]) -> int:
            return sum(1 for c in r["per_worker"].values() if c > 0)

        print("\n| single-lock baseline | makespan | replicas that ran jobs | jobs per replica |")
        print("|---|---|---|---|")
        for r in (ex, par):
            print(
                f"| {r['strategy']} ({r['replicas']} x {r['slots']}, {r['jobs']} x sleep {r['seconds']:g} s) | "
                f"{r['makespan_s']:.1f} s | {busy(r)} of {r['replicas']} | "
                f"{', '.join(f'{w}: {c}' for w, c in r['per_worker'].items())} |"
            )
        print(f"\nparallel is {ex['makespan_s'] / par['makespan_s']:.1f}x faster on the same replicas and slots.")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("demo-jobs")
    s.add_argument("count", type=int)
    s.add_argument("seconds")
    s = sub.add_parser("bench-jobs")
    s.add_argument("file")
    s.add_argument("count", type=int)
    s.add_argument("handler")
    s.add_argument("args")
    s = sub.add_parser("demo")
    s.add_argument("dir")
    s.add_argument("--jobs", type=int, required=True)
    s.add_argument("--replicas", type=int, required=True)
    s.add_argument("--slots", type=int, required=True)
    s.add_argument("--seconds", type=float, required=True)
    s = sub.add_parser("scenario")
    s.add_argument("dir")
    s = sub.add_parser("bench")
    s.add_argument("run_dir")
    s = sub.add_parser("raw-share")
    s.add_argument("noop_result")
    s.add_argument("raw_result")
    a = p.parse_args()

    commands: dict[str, Callable[[], bool | None]] = {
        "demo-jobs": lambda: demo_jobs(a.count, a.seconds),
        "bench-jobs": lambda: bench_jobs(a.file, a.count, a.handler, a.args),
        "demo": lambda: demo(a.dir, a.jobs, a.replicas, a.slots, a.seconds),
        "scenario": lambda: scenario(a.dir),
        "bench": lambda: bench(a.run_dir),
    }
    if a.command == "raw-share":
        line = raw_share(load_json(a.noop_result), load_json(a.raw_result))
        if line:
            print(f"\n  {line}")
        return 0
    return 0 if commands[a.command]() is not False else 1


if __name__ == "__main__":
    sys.exit(main())
