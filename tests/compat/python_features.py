"""Feature scenarios with the official RocketMQ 5 Python client
(`rocketmq-python-client` 5.1.2) against RaftMQ.

usage: python_features.py SCENARIO ENDPOINT [options]

SCENARIO: normal | fifo | delay | transaction | orphan | invisible | push | dlq
ENDPOINT: ONE host:port (with several endpoints the Python gRPC core sends a
          malformed :authority).

Every scenario prints progress lines, a line `KILL-POINT` at its mid point
(the harness may then kill the group's leader, and restart it), and on success
exactly one final line `RESULT <scenario> ok <figures>`. On failure it prints
`FAIL <scenario>: <reason>` and exits with status 1 (2 for usage errors).

Scenarios (what each asserts):
- normal: N messages with tag, two keys and user properties; a simple
  consumer gets every acknowledged send with the same body, tag, keys,
  properties, message id, type NORMAL, a receipt handle, attempt >= 1.
- fifo: (1) hold-back: one message of a group received and not acked, no
  other message of that group comes in >= 4 receives / 4 s; after the ack the
  next one does; (2) N messages over 3 message groups, interleaved, consumed
  by the FIFO-configured group while being sent: per group strictly in send
  order, each batch's first message of a group is the one after everything
  acked, and all arrive.
- delay: messages due in 3 s (three) and 6 s, then (after KILL-POINT) two
  due in 8 s: none before its time (50 ms tolerance), lateness bounded.
- transaction: half A not delivered during 2 s, committed, delivered; half
  B rolled back, never delivered (8 s after the commit of A).
- orphan: a child process sends halves X and Y and dies; a new transactional
  producer's checker is asked about both within 30 s (over Telemetry),
  answers COMMIT for X and ROLLBACK for Y: X is delivered only after its
  COMMIT answer, Y never.
- invisible: M received (invisible 20 s), changed to 2 s, comes back as
  attempt 2 not before 1.5 s, acked with the redelivery's handle, then quiet
  5 s; X received (invisible 4 s), extended to 30 s, stays away past 4 s,
  acked with the handle ChangeInvisibleDuration returned.
- push: two PushConsumers of one group consume N messages between them
  (both some); after one shuts down the other consumes N more.
- dlq: a consumer of the group with max 2 attempts receives D twice
  (attempts 1, 2; invisible 1 s), never a third time; D then comes from
  %DLQ%<group> with the same id and body.

Rules shared by all scenarios (they must survive a leader kill):
- a send is acknowledged only when send() returns; a send that raises is
  retried (a new attempt gets a new message id; an earlier attempt may still
  have been stored, so its id may show up as an "extra");
- receive and ack errors are retried; an ack that failed ambiguously (the
  broker may have applied it) is "unknown";
- a message id seen twice is a redelivery: allowed only when the receive call
  that returned it started before an ack of that id returned OK; one with
  the same delivery_attempt, or back before its invisible duration ran out,
  shows a lost pop: reported as lost_pops=N (fatal with --strict-pops);
- messages of other runs (property `run` differs) are acked and ignored:
  unique groups start at the beginning of the topic.

Topics and groups are created by the harness beforehand (see the options).
"""
import argparse
import collections
import logging
import math
import os
import random
import string
import subprocess
import sys
import threading
import time

from rocketmq import (ClientConfiguration, ConsumeResult, Credentials,
                      FilterExpression, Message, MessageListener, Producer,
                      PushConsumer, SimpleConsumer, TransactionChecker,
                      TransactionResolution)
from rocketmq.v5.exception import (BadRequestException, ClientException,
                                   IllegalArgumentException)

T0 = time.time()
SCENARIO = "?"
_print_lock = threading.Lock()
CLIENTS = []
STRICT_POPS = False
TRACE_RECEIVES = False
LOST_POPS = []

MESSAGE_TYPE_NORMAL = 1
MESSAGE_TYPE_FIFO = 2


# ----------------------------------------------------------------- helpers


def log(msg):
    with _print_lock:
        print(f"[{time.time() - T0:7.2f}s] {msg}", flush=True)


def die(msg):
    """Fail the scenario at once (from any thread)."""
    with _print_lock:
        print(f"FAIL {SCENARIO}: {msg}", flush=True)
        os._exit(1)


class _CallbackErrors(logging.Handler):
    """The client's heartbeat callback re-raises RPC errors, which
    concurrent.futures logs with a traceback to stderr; condense them to one
    progress line every 5 s."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.last = 0.0
        self.count = 0

    def emit(self, record):
        self.count += 1
        if time.time() - self.last > 5:
            self.last = time.time()
            exc = record.exc_info[1] if record.exc_info else None
            what = short(exc) if exc else record.getMessage()
            log(f"client callback raised ({self.count} so far): {what}")


def quiet_client_callbacks():
    lg = logging.getLogger("concurrent.futures")
    lg.addHandler(_CallbackErrors())
    lg.propagate = False


def lost_pop(msg):
    """A redelivery that shows the broker forgot an earlier delivery (same or
    lower delivery_attempt, or back before its invisible duration ran out):
    the receive was answered before the pop was durable."""
    LOST_POPS.append(msg)
    if STRICT_POPS:
        die(f"{msg} (the broker answered a receive before the pop was durable, or lost it)")
    log(f"NOTE lost pop: {msg}. A duplicate of an unacked message, so tolerated (--strict-pops makes it "
        f"fatal), but the broker answered a receive before the pop was durable, or lost it")


def kill_point():
    with _print_lock:
        print("KILL-POINT", flush=True)
    log("printed KILL-POINT: the leader may be killed from now on")


def short(e):
    s = f"{type(e).__name__}: {e}"
    s = " ".join(s.split())
    return s if len(s) < 220 else s[:220] + "..."


def rand_id(n=8):
    return "".join(random.choice(string.ascii_lowercase + string.digits) for _ in range(n))


class Deadline:
    def __init__(self, seconds):
        self.at = time.time() + seconds

    def left(self):
        return self.at - time.time()

    def passed(self):
        return time.time() >= self.at


def config(a):
    return ClientConfiguration(a.endpoint, Credentials())


def start_client(make, what, deadline):
    """Create and start a client; retry (with a new object) while startup raises."""
    while True:
        c = make()
        if isinstance(c, SimpleConsumer):
            spy_queues(c)
        try:
            c.startup()
            CLIENTS.append(c)
            log(f"{what} started, client id {c.client_id}")
            return c
        except Exception as e:
            log(f"{what} startup failed ({short(e)}); retrying")
            if deadline.passed():
                die(f"{what} could not start: {short(e)}")
            time.sleep(1)


def shutdown_clients(clients=None, timeout=8.0):
    """Shut clients down in parallel; never wait longer than `timeout`."""
    clients = list(CLIENTS if clients is None else clients)

    def one(c):
        try:
            c.shutdown()
        except Exception as e:
            log(f"shutdown of {c.client_id} raised {short(e)} (ignored)")

    threads = [threading.Thread(target=one, args=(c,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    end = time.time() + timeout
    for t in threads:
        t.join(max(0.0, end - time.time()))
    for c in clients:
        if c in CLIENTS:
            CLIENTS.remove(c)


def finish(figures):
    if LOST_POPS:
        figures += f" lost_pops={len(LOST_POPS)}"
    shutdown_clients()
    with _print_lock:  # held until exit: RESULT is the last line
        print(f"RESULT {SCENARIO} ok {figures}", flush=True)
        os._exit(0)


def new_message(topic, run, key, body=None, tag=None, props=None):
    m = Message()
    m.topic = topic
    m.body = (body if body is not None else f"{run}:{key}").encode()
    if tag:
        m.tag = tag
    m.add_property("run", run)
    m.add_property("key", key)
    for k, v in (props or {}).items():
        m.add_property(k, str(v))
    return m


def send_retry(producer, build, deadline, what, transactional=False):
    """Send until send() returns (the only acknowledgement). `build` makes a
    fresh Message per attempt. Returns (receipt, failed attempt ids, tx)."""
    failed = []
    while True:
        m = build()
        tx = producer.begin_transaction() if transactional else None
        try:
            r = producer.send(m, tx) if transactional else producer.send(m)
            if failed:
                log(f"send {what}: ok after {len(failed)} failed attempt(s), id {r.message_id}")
            return r, failed, tx
        except IllegalArgumentException as e:
            die(f"send {what} rejected by the client: {short(e)} "
                "(message type not accepted by the route's queues, or max_body_size from Settings too small)")
        except Exception as e:
            if m.message_id:
                failed.append(m.message_id)
            log(f"send {what} failed ({short(e)}); retrying (attempt id {m.message_id} may still be stored)")
            if deadline.passed():
                die(f"send {what} kept failing until the deadline: {short(e)}")
            time.sleep(0.5)


def ack_retry(consumer, m, window=15.0):
    """Ack with retries: 'acked' (OK), 'failed' (definitively refused, never
    ambiguous), or 'unknown' (some attempt may have been applied)."""
    ambiguous = False
    end = time.time() + window
    while True:
        try:
            consumer.ack(m)
            return "acked"
        except BadRequestException as e:
            log(f"ack {m.message_id} refused: {short(e)}")
            return "unknown" if ambiguous else "failed"
        except Exception as e:
            ambiguous = True
            log(f"ack {m.message_id} failed ({short(e)}); retrying")
        if time.time() > end:
            return "unknown" if ambiguous else "failed"
        time.sleep(0.3)


def change_invisible_retry(consumer, m, seconds, window=10.0):
    """ChangeInvisibleDuration with retries. The client overwrites
    m.receipt_handle with the response's handle (even with an error status),
    so the handle is restored before each retry. Returns True on success."""
    original = m.receipt_handle
    end = time.time() + window
    while True:
        m.receipt_handle = original
        try:
            consumer.change_invisible_duration(m, seconds)
            return True
        except BadRequestException as e:
            m.receipt_handle = original
            log(f"change_invisible_duration {m.message_id} refused: {short(e)}")
            return False
        except Exception as e:
            log(f"change_invisible_duration {m.message_id} failed ({short(e)}); retrying")
        if time.time() > end:
            m.receipt_handle = original
            return False
        time.sleep(0.3)


_spy = threading.local()


def spy_queues(consumer):
    """Observe which queue id each receive of a SimpleConsumer names
    (behaviour unchanged). The 5.1.2 SimpleConsumer builds a new
    QueueSelector with a random start on every receive, so it names a random
    queue of the route each time, not round-robin."""
    original = consumer._receive

    def observed(queue, req, timeout):
        _spy.queue = req.message_queue.id
        return original(queue, req, timeout)

    consumer._receive = observed
    return consumer


class Stats:
    def __init__(self):
        self.recv_errors = 0
        self.receives = 0
        self.last_error = None
        self.last_error_logged = 0.0
        self.suppressed = 0
        self.queue = None
        self.quiet = False  # set when stopping: errors of the cancelled receive are expected


def receive(consumer, max_num, invisible, stats):
    """One receive call. Returns (poll_start, returned_at, messages); the
    queue id the call named is in stats.queue (None when unknown)."""
    t0 = time.time()
    _spy.queue = None
    stats.queue = None
    try:
        msgs = consumer.receive(max_num, invisible)
        stats.queue = getattr(_spy, "queue", None)
        stats.receives += 1
        if TRACE_RECEIVES:
            log(f"receive({max_num}, {invisible}) named queue {stats.queue}: {len(msgs or [])} message(s) "
                f"in {time.time() - t0:.2f} s")
        return t0, time.time(), list(msgs or [])
    except Exception as e:
        if stats.quiet:
            return t0, time.time(), []
        stats.recv_errors += 1
        text = short(e)
        now = time.time()
        if text != stats.last_error or now - stats.last_error_logged > 5:
            more = f" ({stats.suppressed} similar failures not shown)" if stats.suppressed else ""
            log(f"receive failed ({text}); retrying{more}")
            stats.last_error, stats.last_error_logged, stats.suppressed = text, now, 0
        else:
            stats.suppressed += 1
        time.sleep(0.5)
        return t0, time.time(), []


class Tracker:
    """Sends (acknowledged ids and failed attempt ids per key), deliveries and
    acks, with the redelivery rule. Thread-safe."""

    def __init__(self, run):
        self.run = run
        self.lock = threading.RLock()
        self.sent = collections.OrderedDict()  # key -> acknowledged message id
        self.info = {}  # key -> dict of what was sent
        self.key_of = {}  # id (acknowledged or failed attempt) -> key
        self.failed_ids = set()
        self.deliveries = collections.defaultdict(list)  # id -> [(poll_start, t, attempt)]
        self.ack_state = {}  # id -> best ack outcome: acked > unknown > failed
        self.acked_at = {}  # id -> time an ack returned OK
        self.foreign = 0
        self.redeliveries = 0
        self.send_failures = 0

    def ours(self, m):
        return m.properties.get("run") == self.run

    def record_send(self, key, receipt_id, failed, info=None):
        with self.lock:
            self.sent[key] = receipt_id
            self.info[key] = info or {}
            self.key_of[receipt_id] = key
            for f in failed:
                self.key_of[f] = key
                self.failed_ids.add(f)
            self.send_failures += len(failed)

    def on_delivery(self, m, poll_start, t, invisible=None):
        """Record a delivery of one of our messages; returns True for a
        redelivery. `invisible`: the invisible duration of the previous
        receive, when nothing changed it since."""
        with self.lock:
            mid = m.message_id
            again = mid in self.deliveries
            if again:
                p_start, p_t, p_attempt = self.deliveries[mid][-1]
                what = f"message {mid} (key {m.properties.get('key')})"
                if m.delivery_attempt and p_attempt and m.delivery_attempt <= p_attempt:
                    lost_pop(f"{what} redelivered with delivery_attempt {m.delivery_attempt} after attempt {p_attempt}")
                elif invisible and t < p_start + invisible - 0.5:
                    lost_pop(f"{what} redelivered {t - p_start:.2f} s after the receive that returned it began, "
                             f"before its invisible duration of {invisible} s ran out")
                acked_at = self.acked_at.get(mid)
                if acked_at is not None and poll_start > acked_at:
                    die(f"message {mid} (key {m.properties.get('key')}, attempt {m.delivery_attempt}) "
                        f"redelivered by a receive that started {poll_start - acked_at:.2f} s after its ack returned OK")
                self.redeliveries += 1
            self.deliveries[mid].append((poll_start, t, m.delivery_attempt))
            return again

    def on_ack(self, mid, outcome):
        with self.lock:
            rank = {"failed": 0, "unknown": 1, "acked": 2}
            if rank[outcome] >= rank.get(self.ack_state.get(mid), -1):
                self.ack_state[mid] = outcome
            if outcome == "acked":
                self.acked_at.setdefault(mid, time.time())

    def processed(self, mid):
        return self.ack_state.get(mid) in ("acked", "unknown")

    def pending_keys(self):
        """Sent keys whose acknowledged id has not been received and acked."""
        with self.lock:
            return [k for k, mid in self.sent.items() if not self.processed(mid)]

    def extras(self):
        with self.lock:
            return sorted(mid for mid in self.deliveries if mid in self.failed_ids)

    def final_check(self):
        """Every received id of ours must be an acknowledged send or a failed
        attempt; every acknowledged send must have been received."""
        with self.lock:
            unknown = [mid for mid in self.deliveries if mid not in self.key_of]
            if unknown:
                die(f"received {len(unknown)} message id(s) of this run that no send produced: {unknown[:5]}")
            missing = [k for k, mid in self.sent.items() if mid not in self.deliveries]
            if missing:
                die(f"{len(missing)} acknowledged message(s) never received: {missing[:10]}")

    def figures(self):
        with self.lock:
            return (f"sent={len(self.sent)} send_retries={self.send_failures} received={len(self.deliveries)} "
                    f"redeliveries={self.redeliveries} extras={len(self.extras())} foreign={self.foreign}")


_foreign_pool = None
_foreign_lock = threading.Lock()


def ack_foreign(consumer, msgs, tracker):
    """Ack messages of other runs in the background (unique groups start at
    the beginning of the topic, so a busy topic has a backlog)."""
    global _foreign_pool
    if not msgs:
        return
    with _foreign_lock:
        if _foreign_pool is None:
            from concurrent.futures import ThreadPoolExecutor
            _foreign_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="foreign-ack")
    for m in msgs:
        tracker.foreign += 1

        def ack(m=m):
            try:
                consumer.ack(m)
            except Exception:
                pass

        _foreign_pool.submit(ack)


def split(msgs, tracker):
    ours, foreign = [], []
    for m in msgs:
        (ours if tracker.ours(m) else foreign).append(m)
    return ours, foreign


def wrap_acks(consumer, on_result):
    """Observe the acks a PushConsumer makes (behaviour unchanged)."""
    original = consumer._ack

    def observed(message):
        try:
            original(message)
        except Exception as e:
            on_result(message, False, e)
            raise
        on_result(message, True, None)

    consumer._ack = observed


def wrap_orphan_checks(producer, record):
    """Observe RecoverOrphanedTransactionCommand arrivals (behaviour unchanged)."""
    original = producer.on_recover_orphaned_transaction_command

    def observed(endpoints, msg, transaction_id):
        record(msg.system_properties.message_id, transaction_id)
        return original(endpoints, msg, transaction_id)

    producer.on_recover_orphaned_transaction_command = observed


# ----------------------------------------------------------------- normal


def scenario_normal(a, dl):
    run = a.run
    topic = a.topic_normal
    group = a.group
    n = a.count or 40
    tr = Tracker(run)
    stats = Stats()
    cfg = config(a)
    producer = start_client(lambda: Producer(cfg, (topic,)), "producer", dl)
    consumer = start_client(
        lambda: SimpleConsumer(cfg, group, {topic: FilterExpression("*")}, await_duration=a.await_duration),
        f"simple consumer ({group})", dl)
    extra_props = set()
    done_sending = threading.Event()

    def produce():
        for i in range(n):
            key = f"n{i}"

            def build(i=i, key=key):
                m = new_message(topic, run, key, body=f"{run}:normal:{i}:" + "x" * (i % 7), tag="TagA",
                                props={"seq": i})
                m.keys = key
                m.keys = f"alt-{key}"
                return m

            r, failed, _ = send_retry(producer, build, dl, key)
            tr.record_send(key, r.message_id, failed)
            if i + 1 == n // 2:
                log(f"sent {i + 1}/{n}")
                kill_point()
            time.sleep(0.05)
        log(f"sent {n}/{n}")
        done_sending.set()

    threading.Thread(target=produce, daemon=True).start()

    while True:
        if done_sending.is_set() and not tr.pending_keys():
            break
        if dl.passed():
            die(f"timed out: {len(tr.pending_keys())} sent message(s) not received and acked "
                f"(sent {len(tr.sent)}/{n}): {tr.pending_keys()[:10]}")
        poll_start, t, msgs = receive(consumer, 32, a.invisible, stats)
        ours, foreign = split(msgs, tr)
        ack_foreign(consumer, foreign, tr)
        for m in ours:
            key = m.properties.get("key")
            i = int(m.properties.get("seq", "-1"))
            body = m.body.decode()
            want_body = f"{run}:normal:{i}:" + "x" * (i % 7)
            if body != want_body:
                die(f"{key}: body {body!r} != sent {want_body!r}")
            if m.topic != topic:
                die(f"{key}: topic {m.topic!r} != {topic!r}")
            if m.tag != "TagA":
                die(f"{key}: tag {m.tag!r} != 'TagA'")
            if set(m.keys) != {key, f"alt-{key}"}:
                die(f"{key}: keys {sorted(m.keys)} != {sorted([key, f'alt-{key}'])}")
            if m.properties.get("run") != run or m.properties.get("seq") != str(i) or m.properties.get("key") != key:
                die(f"{key}: user properties {m.properties} lack run/key/seq")
            extra_props.update(set(m.properties) - {"run", "key", "seq"})
            if m.message_type != MESSAGE_TYPE_NORMAL:
                die(f"{key}: message_type {m.message_type} != NORMAL(1)")
            if m.corrupted:
                die(f"{key}: body digest check failed (message corrupted)")
            if not m.receipt_handle:
                die(f"{key}: no receipt handle")
            if not m.delivery_attempt or m.delivery_attempt < 1:
                die(f"{key}: delivery_attempt {m.delivery_attempt}")
            again = tr.on_delivery(m, poll_start, t, a.invisible)
            outcome = ack_retry(consumer, m)
            tr.on_ack(m.message_id, outcome)
            log(f"received {key} id {m.message_id} attempt {m.delivery_attempt}"
                f"{' (redelivery)' if again else ''}, ack {outcome}")
    tr.final_check()
    # every received id must be the one send() returned for its key (or a failed attempt of it)
    for mid in tr.deliveries:
        key = tr.key_of[mid]
        if mid != tr.sent[key] and mid not in tr.failed_ids:
            die(f"{key}: received id {mid} != sent id {tr.sent[key]}")
    finish(f"{tr.figures()} recv_errors={stats.recv_errors}{' extra_props=' + str(sorted(extra_props)) if extra_props else ''}")


# ----------------------------------------------------------------- fifo


class FifoOrder:
    """Per message group order: the first message of a group in a batch must
    be the next one after everything acked (or possibly acked); within a
    batch a group's messages are consecutive. A message with the same seq as
    an earlier one but another id must be a failed send attempt (checked at
    the end)."""

    def __init__(self):
        self.state = collections.defaultdict(dict)  # group -> seq -> 'acked'|'unknown'
        self.first_id = collections.defaultdict(dict)  # group -> seq -> first id seen
        self.suspects = []  # (group, seq, id): must be failed send attempts

    def _lo(self, g, ok):
        s = -1
        while self.state[g].get(s + 1) in ok:
            s += 1
        return s

    def check_batch(self, msgs):
        by_group = collections.OrderedDict()
        for m in msgs:
            by_group.setdefault(m.properties.get("grp"), []).append(m)
        for g, ms in by_group.items():
            def_lo = self._lo(g, ("acked",))
            pos_lo = self._lo(g, ("acked", "unknown"))
            prev = None
            for m in ms:
                s = int(m.properties.get("seq"))
                fid = self.first_id[g].setdefault(s, m.message_id)
                other_attempt = fid != m.message_id
                if other_attempt:
                    self.suspects.append((g, s, m.message_id))
                if prev is None:
                    ok = def_lo + 1 <= s <= pos_lo + 1 or (other_attempt and s <= pos_lo + 1)
                    want = f"seq {def_lo + 1}" + (f"..{pos_lo + 1}" if pos_lo > def_lo else "")
                else:
                    ok = s == prev + 1 or (s == prev and other_attempt) or (other_attempt and s <= prev)
                    want = f"seq {prev + 1} (batch continues seq {prev})"
                if not ok:
                    seqs = [int(x.properties.get("seq")) for x in ms]
                    die(f"FIFO order violated in message group {g}: got seq {s} (id {m.message_id}, "
                        f"attempt {m.delivery_attempt}), expected {want}; this batch's seqs of the group: {seqs}")
                prev = s

    def on_ack(self, m, outcome):
        g, s = m.properties.get("grp"), int(m.properties.get("seq"))
        if outcome == "acked":
            self.state[g][s] = "acked"
        elif outcome == "unknown" and self.state[g].get(s) != "acked":
            self.state[g][s] = "unknown"


def fifo_process_batch(consumer, ours, poll_start, t, tr, order, invisible):
    """Check order, then ack in order; after a failed ack of a group, leave
    the rest of that group's batch unacked (they come back in order)."""
    order.check_batch(ours)
    stopped = set()
    for m in ours:
        g = m.properties.get("grp")
        if m.message_group != g:
            die(f"message {m.message_id}: message_group {m.message_group!r} != sent {g!r}")
        if m.message_type != MESSAGE_TYPE_FIFO:
            die(f"message {m.message_id}: message_type {m.message_type} != FIFO(2)")
        again = tr.on_delivery(m, poll_start, t, invisible)
        if g in stopped:
            log(f"received {g}/{m.properties.get('seq')} (left unacked: an earlier ack of the group failed)")
            continue
        outcome = ack_retry(consumer, m)
        tr.on_ack(m.message_id, outcome)
        order.on_ack(m, outcome)
        log(f"received {g}/{m.properties.get('seq')} id {m.message_id} attempt {m.delivery_attempt}"
            f"{' (redelivery)' if again else ''}, ack {outcome}")
        if outcome != "acked":
            stopped.add(g)


def scenario_fifo(a, dl):
    run = a.run
    topic = a.topic_fifo
    group = a.fifo_group
    n = a.count or 30
    tr = Tracker(run)
    order = FifoOrder()
    stats = Stats()
    cfg = config(a)
    producer = start_client(lambda: Producer(cfg, (topic,)), "producer", dl)
    consumer = start_client(
        lambda: SimpleConsumer(cfg, group, {topic: FilterExpression("*")}, await_duration=a.await_duration),
        f"simple consumer ({group})", dl)

    def build_fifo(g, seq, key):
        def build():
            m = new_message(topic, run, key, props={"grp": g, "seq": seq})
            m.message_group = g
            return m
        return build

    # Part 1: hold-back. One message of group HB received and not acked:
    # no other message of HB may be delivered until it is acked.
    hb = f"hb-{run}"
    calls, release_latency = "0", -1.0
    for s in (range(3) if not a.skip_holdback else ()):
        r, failed, _ = send_retry(producer, build_fifo(hb, s, f"{hb}/{s}"), dl, f"{hb}/{s}")
        tr.record_send(f"{hb}/{s}", r.message_id, failed)
        if s == 2:
            log(f"sent 3 messages of group {hb}")
    held = None
    while held is None and not a.skip_holdback:
        if dl.passed():
            die(f"timed out waiting for the first message of group {hb}")
        poll_start, t, msgs = receive(consumer, 1, 30, stats)
        if len(msgs) > 1:
            die(f"receive with batch size 1 returned {len(msgs)} messages")
        ours, foreign = split(msgs, tr)
        ack_foreign(consumer, foreign, tr)
        for m in ours:
            order.check_batch([m])
            tr.on_delivery(m, poll_start, t, 30)
            held = m
            held_queue = stats.queue
    if not a.skip_holdback:
        calls, release_latency = fifo_holdback(a, dl, consumer, tr, order, hb, held, held_queue, stats)

    # Part 2: N messages over 3 groups, interleaved, sent while consuming;
    # the leader may be killed half way.
    groups = [f"g{i}-{run}" for i in range(3)]
    done_sending = threading.Event()

    def produce():
        seq = collections.Counter()
        for i in range(n):
            g = groups[i % 3]
            s = seq[g]
            seq[g] += 1
            key = f"{g}/{s}"
            r, failed, _ = send_retry(producer, build_fifo(g, s, key), dl, key)
            tr.record_send(key, r.message_id, failed)
            if i + 1 == n // 2:
                log(f"sent {i + 1}/{n}")
                kill_point()
            time.sleep(0.05)
        log(f"sent {n}/{n}")
        done_sending.set()

    threading.Thread(target=produce, daemon=True).start()
    while True:
        if done_sending.is_set() and not tr.pending_keys():
            break
        if dl.passed():
            die(f"timed out: {len(tr.pending_keys())} message(s) not received and acked: {tr.pending_keys()[:10]}")
        poll_start, t, msgs = receive(consumer, 32, a.invisible, stats)
        ours, foreign = split(msgs, tr)
        ack_foreign(consumer, foreign, tr)
        fifo_process_batch(consumer, ours, poll_start, t, tr, order, a.invisible)
    tr.final_check()
    for g, s, mid in order.suspects:
        if mid not in tr.failed_ids:
            die(f"group {g} seq {s} delivered with two different ids; {mid} is not a failed send attempt")
    finish(f"{tr.figures()} groups=3 holdback_calls={calls} release_latency={release_latency:.2f}s "
           f"recv_errors={stats.recv_errors}")


def fifo_holdback(a, dl, consumer, tr, order, hb, held, held_queue, stats):
    """The broker must not deliver another message of group `hb` while
    `held` is unacked; once it is acked the rest of the group follows.
    The window lasts --holdback-window seconds and until receives naming the
    held message's queue (`held_queue`) completed twice (each receive names
    one random queue), at most 30 s."""
    log(f"holding {hb}/{held.properties.get('seq')} (id {held.message_id}, from a receive naming queue "
        f"{held_queue}) unacked, invisible 30 s")
    start = time.time()
    calls = 0
    same_queue = 0
    while True:
        elapsed = time.time() - start
        if elapsed >= a.holdback_window and (same_queue >= 2 or held_queue is None):
            break
        if elapsed >= 30:
            if same_queue == 0:
                die(f"hold-back not observed: no receive named queue {held_queue} in 30 s ({calls} calls)")
            break
        poll_start, t, msgs = receive(consumer, 32, 30, stats)
        calls += 1
        if stats.queue == held_queue:
            same_queue += 1
        ours, foreign = split(msgs, tr)
        ack_foreign(consumer, foreign, tr)
        for m in ours:
            if m.properties.get("grp") == hb:
                die(f"hold-back violated: {hb}/{m.properties.get('seq')} (id {m.message_id}) delivered "
                    f"{t - held_time(tr, held):.2f} s after {hb}/{held.properties.get('seq')} while it was unacked")
    log(f"no other message of {hb} in {calls} receive calls ({same_queue} naming queue {held_queue}) over "
        f"{time.time() - start:.1f} s: held back")
    outcome = ack_retry(consumer, held)
    if outcome != "acked":
        die(f"ack of the held message failed ({outcome}) before any leader kill")
    tr.on_ack(held.message_id, outcome)
    order.on_ack(held, outcome)
    t_ack = time.time()
    release_latency = None
    while any(not tr.processed(tr.sent[f"{hb}/{s}"]) for s in range(3)):
        if dl.passed():
            die(f"timed out: the rest of group {hb} was not delivered after the ack")
        poll_start, t, msgs = receive(consumer, 32, 30, stats)
        ours, foreign = split(msgs, tr)
        ack_foreign(consumer, foreign, tr)
        if ours and release_latency is None:
            release_latency = t - t_ack
            log(f"next message of {hb} delivered {release_latency:.2f} s after the ack")
        fifo_process_batch(consumer, ours, poll_start, t, tr, order, 30)
    return f"{calls}/{same_queue}", release_latency


def held_time(tr, m):
    d = tr.deliveries.get(m.message_id)
    return d[0][1] if d else time.time()


# ----------------------------------------------------------------- delay


def scenario_delay(a, dl):
    run = a.run
    topic = a.topic_delay
    group = a.group
    tr = Tracker(run)
    stats = Stats()
    cfg = config(a)
    producer = start_client(lambda: Producer(cfg, (topic,)), "producer", dl)
    consumer = start_client(
        lambda: SimpleConsumer(cfg, group, {topic: FilterExpression("*")}, await_duration=a.await_duration),
        f"simple consumer ({group})", dl)
    results = {}  # key -> (lateness, poll-adjusted lateness)

    def send_delayed(key, delay):
        due = {}

        def build():
            # Python client quirk: Message.delivery_timestamp is in SECONDS
            # when sending (it fills Timestamp.seconds) but in milliseconds
            # on a received message.
            due["s"] = math.ceil(time.time() + delay)
            m = new_message(topic, run, key, props={"due_ms": due["s"] * 1000})
            m.delivery_timestamp = due["s"]
            return m

        r, failed, _ = send_retry(producer, build, dl, key)
        tr.record_send(key, r.message_id, failed, {"due": due["s"]})
        log(f"sent {key} id {r.message_id}, due in {due['s'] - time.time():.2f} s")

    def receive_until(keys, bound, phase):
        while any(not tr.processed(tr.sent[k]) for k in keys):
            if dl.passed():
                die(f"timed out: delayed message(s) {[k for k in keys if not tr.processed(tr.sent[k])]} never delivered")
            poll_start, t, msgs = receive(consumer, 32, 30, stats)
            ours, foreign = split(msgs, tr)
            ack_foreign(consumer, foreign, tr)
            for m in ours:
                key = m.properties.get("key")
                due = int(m.properties.get("due_ms")) / 1000.0
                early = due - t
                if early > a.clock_tolerance:
                    die(f"{key} delivered {early:.3f} s BEFORE its delivery time")
                if not m.delivery_timestamp:
                    log(f"WARN {key}: the received message carries no delivery_timestamp")
                elif abs(m.delivery_timestamp - due * 1000) > 1:
                    die(f"{key}: delivery_timestamp {m.delivery_timestamp} ms != sent {int(due * 1000)} ms")
                again = tr.on_delivery(m, poll_start, t, 30)
                late = t - due
                adjusted = t - max(due, poll_start)
                if not again:
                    results[key] = (late, adjusted)
                log(f"received {key} id {m.message_id} lateness {late:+.3f} s (poll-adjusted {adjusted:+.3f} s, "
                    f"receive named queue {stats.queue}){' (redelivery)' if again else ''}")
                # The Python SimpleConsumer names one random queue per receive
                # (the Java proxy ignores it and pops any queue of the named
                # broker). A broker that serves only the named queue delays a
                # message by however many receives name other queues: that
                # part is the client's, not the broker's. "Poll-adjusted"
                # lateness counts from the start of the receive that returned
                # the message (when later than the delivery time): what the
                # broker added. --strict-lateness bounds the raw figure too.
                if not again and (adjusted > bound or (a.strict_lateness and late > bound)):
                    die(f"{key} delivered {late:.3f} s after its delivery time, poll-adjusted {adjusted:.3f} s "
                        f"({phase}: bound {bound} s{' on both' if a.strict_lateness else ' poll-adjusted'})")
                outcome = ack_retry(consumer, m)
                tr.on_ack(m.message_id, outcome)

    # Phase 1: three messages due in 3 s, one due in 6 s; no kill.
    keys1 = ["d3-0", "d3-1", "d3-2"]
    for k in keys1:
        send_delayed(k, 3)
    send_delayed("d6", 6)
    receive_until(keys1 + ["d6"], a.max_lateness, "before the kill point")
    # Phase 2: two messages due in 8 s, then the leader may be killed: the
    # pending delay must survive the failover.
    keys2 = ["k8-0", "k8-1"]
    for k in keys2:
        send_delayed(k, 8)
    kill_point()
    receive_until(keys2, a.kill_lateness, "due after the kill point")
    tr.final_check()
    figs = " ".join(f"{k}={results[k][0]:+.2f}s/{results[k][1]:+.2f}s" for k in keys1 + ["d6"] + keys2
                    if k in results)
    finish(f"{tr.figures()} lateness(raw/poll-adjusted): {figs} recv_errors={stats.recv_errors}")


# ----------------------------------------------------------------- transactions


class DecidingChecker(TransactionChecker):
    """Answers check-backs from the message's `decision` property; records
    every call. Before `decided` is set for a key it answers UNSPECIFIED
    (the local transaction is still running)."""

    def __init__(self, run, gate=None):
        self.run = run
        self.gate = gate  # key -> threading.Event, or None: decide at once
        self.calls = []  # (time, message id, key, answer)
        self.lock = threading.Lock()

    def check(self, message):
        key = message.properties.get("key")
        if message.properties.get("run") != self.run:
            answer = TransactionResolution.ROLLBACK  # leftovers of other runs
        elif self.gate is not None and (key not in self.gate or not self.gate[key].is_set()):
            answer = TransactionResolution.TRANSACTION_RESOLUTION_UNSPECIFIED
        elif message.properties.get("decision") == "commit":
            answer = TransactionResolution.COMMIT
        else:
            answer = TransactionResolution.ROLLBACK
        with self.lock:
            self.calls.append((time.time(), message.message_id, key, answer))
        log(f"checker called for {key or '?'} (run {message.properties.get('run')}) id {message.message_id}: "
            f"answer {TransactionResolution.Name(answer)}")
        return answer

    def calls_for(self, mid):
        with self.lock:
            return [c for c in self.calls if c[1] == mid]


def end_tx_retry(tx, commit, dl, what, checked=lambda: False):
    """Commit or roll back with retries; returns the time the call succeeded
    (or None when the broker refused after an ambiguous try, or after a
    check-back already resolved the transaction: `checked()`)."""
    ambiguous = False
    refused_until = time.time() + 15
    while True:
        try:
            tx.commit() if commit else tx.rollback()
            log(f"{'commit' if commit else 'rollback'} {what}: ok")
            return time.time()
        except ClientException as e:
            log(f"{'commit' if commit else 'rollback'} {what} refused: {short(e)}")
            if ambiguous or checked():
                log("an earlier attempt or a check-back may have resolved it; the outcome is checked on the "
                    "consumer side")
                return None
            if dl.passed() or time.time() > refused_until:
                die(f"{'commit' if commit else 'rollback'} {what} refused: {short(e)}")
        except Exception as e:
            ambiguous = True
            log(f"{'commit' if commit else 'rollback'} {what} failed ({short(e)}); retrying")
            if dl.passed():
                die(f"{'commit' if commit else 'rollback'} {what} kept failing: {short(e)}")
        time.sleep(0.5)


class Poller(threading.Thread):
    """Receives continuously from a simple consumer and hands our messages to
    `on_message(m, poll_start, t)` (which acks or not); foreign ones are acked."""

    def __init__(self, name, consumer, tracker, batch, invisible, on_message):
        super().__init__(daemon=True, name=name)
        self.consumer, self.tr, self.batch, self.invisible = consumer, tracker, batch, invisible
        self.on_message = on_message
        self.stats = Stats()
        self.stop = threading.Event()

    def halt(self):
        self.stats.quiet = True
        self.stop.set()

    def run(self):
        while not self.stop.is_set():
            poll_start, t, msgs = receive(self.consumer, self.batch, self.invisible, self.stats)
            ours, foreign = split(msgs, self.tr)
            ack_foreign(self.consumer, foreign, self.tr)
            for m in ours:
                self.on_message(m, poll_start, t)


def scenario_transaction(a, dl):
    run = a.run
    topic = a.topic_tx
    group = a.group
    tr = Tracker(run)
    cfg = config(a)
    gate = {"A": threading.Event(), "B": threading.Event()}
    checker = DecidingChecker(run, gate)
    orphan_cmds = []
    producer = start_client(lambda: Producer(cfg, (topic,), checker), "transactional producer", dl)
    wrap_orphan_checks(producer, lambda mid, txid: orphan_cmds.append((mid, txid)))
    consumer = start_client(
        lambda: SimpleConsumer(cfg, group, {topic: FilterExpression("*")}, await_duration=a.await_duration),
        f"simple consumer ({group})", dl)
    commit_started = {"A": None}
    got = {}

    def on_message(m, poll_start, t):
        key = m.properties.get("key")
        if key == "B" or m.properties.get("decision") == "rollback":
            die(f"rolled-back message {key} (id {m.message_id}) was delivered")
        if commit_started["A"] is None:
            die(f"transactional message {key} (id {m.message_id}) delivered before its commit")
        if m.body.decode() != f"{run}:tx:{key}":
            die(f"{key}: body {m.body!r}")
        again = tr.on_delivery(m, poll_start, t, 30)
        got.setdefault(key, t)
        outcome = ack_retry(consumer, m)
        tr.on_ack(m.message_id, outcome)
        log(f"received {key} id {m.message_id} {t - commit_started['A']:.2f} s after the commit call started"
            f"{' (redelivery)' if again else ''}, ack {outcome}")

    poller = Poller("tx-consumer", consumer, tr, 32, 30, on_message)
    poller.start()
    time.sleep(1.0)

    def build(key, decision):
        return lambda: new_message(topic, run, key, body=f"{run}:tx:{key}", props={"decision": decision})

    ra, failed_a, tx_a = send_retry(producer, build("A", "commit"), dl, "half A", transactional=True)
    tr.record_send("A", ra.message_id, failed_a)
    log(f"half message A sent, id {ra.message_id}, transaction id {ra.transaction_id!r}")
    if not ra.transaction_id:
        die("the send receipt of a TRANSACTION message carries no transaction_id "
            "(the Python client echoes it in EndTransaction)")
    t_half = time.time()
    kill_point()
    while time.time() < t_half + 2.0:
        time.sleep(0.1)
    log("A was not delivered during the 2 s before its commit")
    gate["A"].set()
    commit_started["A"] = time.time()
    answered = (lambda mid, res: lambda: any(c[3] == res for c in checker.calls_for(mid)))
    t_commit = end_tx_retry(tx_a, True, dl, "A", answered(ra.message_id, TransactionResolution.COMMIT)) \
        or time.time()

    rb, failed_b, tx_b = send_retry(producer, build("B", "rollback"), dl, "half B", transactional=True)
    tr.record_send("B", rb.message_id, failed_b)
    log(f"half message B sent, id {rb.message_id}")
    gate["B"].set()
    end_tx_retry(tx_b, False, dl, "B", answered(rb.message_id, TransactionResolution.ROLLBACK))

    wait_until = t_commit + a.rollback_wait
    while time.time() < wait_until or "A" not in got:
        if dl.passed():
            die("timed out: committed message A never delivered")
        time.sleep(0.2)
    poller.halt()
    latency = got["A"] - commit_started["A"]
    with tr.lock:
        for mid in tr.deliveries:
            if tr.key_of.get(mid) != "A":
                die(f"unexpected delivery of {mid}")
    finish(f"A_latency={latency:.2f}s B_delivered=0 waited_after_commit={time.time() - t_commit:.1f}s "
           f"checks={len(checker.calls)} check_commands={len(orphan_cmds)} redeliveries={tr.redeliveries} send_retries={tr.send_failures} "
           f"foreign={tr.foreign} recv_errors={poller.stats.recv_errors}")


# ----------------------------------------------------------------- orphan


class BlockingChecker(TransactionChecker):
    """The orphan child never answers a check (it is about to die)."""

    def check(self, message):
        time.sleep(3600)


def scenario_orphan_child(a, dl):
    run = a.run
    topic = a.topic_tx
    cfg = config(a)
    producer = start_client(lambda: Producer(cfg, (topic,), BlockingChecker()), "child transactional producer", dl)
    for key, decision in (("X", "commit"), ("Y", "rollback")):
        build = (lambda key=key, decision=decision:
                 new_message(topic, run, key, body=f"{run}:orphan:{key}", props={"decision": decision}))
        r, failed, _ = send_retry(producer, build, dl, f"half {key}", transactional=True)
        for f in failed:
            print(f"FAILED-ATTEMPT {key} {f}", flush=True)
        print(f"HALF {key} {decision} {r.message_id} {r.transaction_id}", flush=True)
    log("child: dying without commit or rollback (no shutdown, no NotifyClientTermination)")
    sys.stdout.flush()
    os._exit(0)


def scenario_orphan(a, dl):
    run = a.run
    topic = a.topic_tx
    group = a.group
    tr = Tracker(run)
    cfg = config(a)
    consumer = start_client(
        lambda: SimpleConsumer(cfg, group, {topic: FilterExpression("*")}, await_duration=a.await_duration),
        f"simple consumer ({group})", dl)
    checker = DecidingChecker(run)
    got = {}

    def on_message(m, poll_start, t):
        key = m.properties.get("key")
        if m.properties.get("decision") == "rollback":
            die(f"orphan {key} (id {m.message_id}) delivered although its check answered ROLLBACK "
                f"(or was never checked)")
        commits = [c for c in checker.calls_for(m.message_id) if c[3] == TransactionResolution.COMMIT]
        if not commits:
            die(f"orphan {key} (id {m.message_id}) delivered before any check answered COMMIT")
        again = tr.on_delivery(m, poll_start, t, 30)
        got.setdefault(key, t)
        outcome = ack_retry(consumer, m)
        tr.on_ack(m.message_id, outcome)
        log(f"received orphan {key} id {m.message_id} {t - commits[0][0]:.2f} s after the COMMIT answer"
            f"{' (redelivery)' if again else ''}, ack {outcome}")

    poller = Poller("orphan-consumer", consumer, tr, 32, 30, on_message)
    poller.start()

    # Part 1: a child process sends two half messages and dies.
    cmd = [sys.executable, os.path.abspath(__file__), "orphan-child", a.endpoint, "--run", run,
           "--topic-tx", topic, "--timeout", "40"]
    log(f"starting child: {' '.join(cmd)}")
    try:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60, text=True)
    except subprocess.TimeoutExpired:
        die("orphan child did not finish within 60 s")
    halves = {}
    for line in out.stdout.splitlines():
        log(f"child| {line}")
        p = line.split()
        if p and p[0] == "HALF":
            halves[p[1]] = {"decision": p[2], "id": p[3], "txid": p[4] if len(p) > 4 else ""}
        if p and p[0] == "FAILED-ATTEMPT":
            tr.key_of[p[2]] = p[1]
            tr.failed_ids.add(p[2])
    if out.returncode != 0 or set(halves) != {"X", "Y"}:
        die(f"orphan child failed (exit {out.returncode}); halves {halves}")
    t_orphaned = time.time()
    for k, h in halves.items():
        tr.record_send(k, h["id"], [])
    log(f"child died; orphaned halves X={halves['X']['id']} (will COMMIT), Y={halves['Y']['id']} (will ROLLBACK)")

    # Part 2: a new transactional producer on the topic answers the checks.
    cmds = []
    producer = start_client(lambda: Producer(cfg, (topic,), checker), "checking transactional producer", dl)
    wrap_orphan_checks(producer, lambda mid, txid: cmds.append((time.time(), mid, txid)))
    kill_point()
    check_dl = t_orphaned + a.check_within
    x_id, y_id = halves["X"]["id"], halves["Y"]["id"]
    while True:
        cx, cy = checker.calls_for(x_id), checker.calls_for(y_id)
        if cx and cy and "X" in got:
            break
        if time.time() > check_dl and not (cx and cy):
            die(f"no check-back within {a.check_within:.0f} s of the orphaning for "
                f"{'X ' if not cx else ''}{'Y' if not cy else ''}; commands seen: {len(cmds)}")
        if dl.passed():
            die("timed out: orphan X was checked (COMMIT) but never delivered")
        time.sleep(0.2)
    t_y_checked = checker.calls_for(y_id)[0][0]
    wait_until = max(t_y_checked, checker.calls_for(x_id)[0][0]) + a.rollback_wait / 2
    while time.time() < wait_until:
        time.sleep(0.2)
    poller.halt()
    for _, mid, txid in cmds:
        for k, h in halves.items():
            if mid == h["id"] and txid != h["txid"]:
                log(f"NOTE check command for {k} carried transaction id {txid!r}, the send receipt had {h['txid']!r}")
    x_check = checker.calls_for(x_id)[0][0] - t_orphaned
    y_check = t_y_checked - t_orphaned
    finish(f"X_checked_after={x_check:.1f}s Y_checked_after={y_check:.1f}s "
           f"X_delivered_after_check={got['X'] - checker.calls_for(x_id)[0][0]:.2f}s Y_delivered=0 "
           f"checks_X={len(checker.calls_for(x_id))} checks_Y={len(checker.calls_for(y_id))} "
           f"commands={len(cmds)} foreign={tr.foreign}")


# ----------------------------------------------------------------- invisible


def scenario_invisible(a, dl):
    run = a.run
    topic = a.topic_normal
    group = a.group
    tr = Tracker(run)
    stats = Stats()
    cfg = config(a)
    producer = start_client(lambda: Producer(cfg, (topic,)), "producer", dl)
    consumer = start_client(
        lambda: SimpleConsumer(cfg, group, {topic: FilterExpression("*")}, await_duration=a.await_duration),
        f"simple consumer ({group})", dl)

    def get(key, invisible, until, what):
        """Receive until `key` arrives; fail on any other message of ours."""
        while True:
            if time.time() > until or dl.passed():
                return None, None, None
            poll_start, t, msgs = receive(consumer, 32, invisible, stats)
            ours, foreign = split(msgs, tr)
            ack_foreign(consumer, foreign, tr)
            found = None
            for m in ours:
                k = m.properties.get("key")
                if k != key:
                    die(f"{what}: unexpected delivery of {k} (id {m.message_id}, attempt {m.delivery_attempt})")
                tr.on_delivery(m, poll_start, t)
                found = m
                queue_of[k] = stats.queue
            if found is not None:
                return found, poll_start, t

    def quiet(until, what, key, allow=None):
        """Nothing of ours may arrive until `until` and until two receives
        that began after `until` - 2.5 s named the queue `key` came from
        (each receive names one random queue); at most 15 s longer."""
        watch_from = until - 2.5
        hits = 0
        while True:
            now = time.time()
            if now >= until and (hits >= 2 or queue_of.get(key) is None):
                return
            if now >= until + 15:
                log(f"NOTE {what}: only {hits} receive(s) named queue {queue_of.get(key)} in the window")
                return
            poll_start, t, msgs = receive(consumer, 32, 20, stats)
            if poll_start >= watch_from and stats.queue == queue_of.get(key):
                hits += 1
            ours, foreign = split(msgs, tr)
            ack_foreign(consumer, foreign, tr)
            for m in ours:
                k = m.properties.get("key")
                if allow and allow(m):
                    tr.on_delivery(m, poll_start, t)
                    log(f"{k} redelivered (attempt {m.delivery_attempt}) after an ambiguous ack: allowed")
                    tr.on_ack(m.message_id, ack_retry(consumer, m))
                    continue
                die(f"{what}: {k} (id {m.message_id}, attempt {m.delivery_attempt}) delivered again")

    queue_of = {}  # key -> queue id named by the receive that returned it

    # Part 1: receive M (invisible 20 s), shorten to 2 s, it comes back as attempt 2.
    r, failed, _ = send_retry(producer, lambda: new_message(topic, run, "M"), dl, "M")
    tr.record_send("M", r.message_id, failed)
    m1, _, t1 = get("M", 20, dl.at, "first delivery of M")
    if m1 is None:
        die("M never delivered")
    if m1.delivery_attempt != 1:
        die(f"first delivery of M has delivery_attempt {m1.delivery_attempt}, expected 1")
    handle1 = m1.receipt_handle
    t_change = time.time()
    if not change_invisible_retry(consumer, m1, 2):
        die("change_invisible_duration(M, 2 s) failed")
    log(f"M received (attempt 1); invisible duration changed 20 s -> 2 s in {time.time() - t_change:.3f} s")
    if not m1.receipt_handle:
        die("ChangeInvisibleDuration returned an empty receipt handle")
    if m1.receipt_handle == handle1:
        log("NOTE ChangeInvisibleDuration returned the same receipt handle (RocketMQ returns a new one)")
    kill_point()
    errors_before = stats.recv_errors
    m2, p2, t2 = get("M", 20, dl.at, "redelivery of M")
    if m2 is None:
        die(f"M not redelivered within {dl.at - t_change:.0f} s after its invisible duration was shortened to 2 s")
    back = t2 - t_change
    log(f"M redelivered {back:.2f} s after the change (attempt {m2.delivery_attempt})")
    if back < 1.5:
        die(f"M came back {back:.2f} s after its invisible duration was set to 2 s (< 1.5 s)")
    if m2.message_id != m1.message_id or m2.body != m1.body:
        die("redelivered M differs from the first delivery (id or body)")
    if m2.delivery_attempt != 2:
        if (m2.delivery_attempt or 0) > 2 and stats.recv_errors > errors_before:
            log(f"NOTE redelivered M has attempt {m2.delivery_attempt}: a receive failed meanwhile "
                f"(an attempt may have been popped by a receive whose response was lost)")
        else:
            die(f"redelivered M has delivery_attempt {m2.delivery_attempt}, expected 2")
    outcome = ack_retry(consumer, m2)
    tr.on_ack(m2.message_id, outcome)
    if outcome == "failed":
        die("ack of the redelivered M with its new receipt handle was refused")
    log(f"acked M with the redelivery's receipt handle: {outcome}")
    t_ack = time.time()
    quiet(t_ack + 5, "after the ack of M", "M", allow=lambda m: outcome == "unknown")
    log(f"M not delivered again within {time.time() - t_ack:.1f} s of its ack")

    # Part 2: receive X (invisible 4 s), extend to 30 s: it must stay
    # invisible past 4 s; ack it with the handle ChangeInvisibleDuration returned.
    r, failed, _ = send_retry(producer, lambda: new_message(topic, run, "X"), dl, "X")
    tr.record_send("X", r.message_id, failed)
    x, _, tx = get("X", 4, dl.at, "first delivery of X")
    if x is None:
        die("X never delivered")
    t_ext = time.time()
    if not change_invisible_retry(consumer, x, 30):
        die("change_invisible_duration(X, 30 s) failed")
    log(f"X received, invisible 4 s extended to 30 s after {t_ext - tx:.2f} s")
    quiet(tx + 7, "X after its invisible duration was extended to 30 s", "X")
    log(f"X stayed invisible {time.time() - tx:.1f} s, past its original 4 s")
    outcome = ack_retry(consumer, x)
    tr.on_ack(x.message_id, outcome)
    if outcome == "failed":
        die("ack of X with the receipt handle returned by ChangeInvisibleDuration was refused")
    quiet(time.time() + 3, "after the ack of X", "X", allow=lambda m: outcome == "unknown")
    tr.final_check()
    finish(f"M_back_after={back:.2f}s M_attempt2={m2.delivery_attempt} X_extended_ok=1 "
           f"redeliveries={tr.redeliveries} foreign={tr.foreign} recv_errors={stats.recv_errors}")


# ----------------------------------------------------------------- push


class RecordingListener(MessageListener):
    def __init__(self, name, rec):
        self.name = name
        self.rec = rec

    def consume(self, message):
        self.rec.on_consume(self.name, message)
        return ConsumeResult.SUCCESS


class PushRecord:
    def __init__(self, run):
        self.run = run
        self.lock = threading.Lock()
        self.by = collections.defaultdict(set)  # consumer name -> ids
        self.first = {}  # id -> (consumer, time)
        self.consumed_at = {}  # id -> first consume time
        self.ack_ok_at = {}  # id -> time an ack returned OK
        self.ack_failed_at = {}  # id -> time an ack raised
        self.ack_errors = 0
        self.duplicates = 0
        self.foreign = 0
        self.attempts = collections.Counter()
        self.last_attempt = {}

    def on_consume(self, name, m):
        if m.properties.get("run") != self.run:
            with self.lock:
                self.foreign += 1
            return
        with self.lock:
            mid = m.message_id
            if mid in self.first:
                prev_attempt = self.last_attempt.get(mid)
                if m.delivery_attempt and prev_attempt and m.delivery_attempt <= prev_attempt:
                    first_by, first_t = self.first[mid]
                    ack = ("acked OK" if mid in self.ack_ok_at else
                           "its ack raised" if mid in self.ack_failed_at else "no ack finished yet")
                    lost_pop(f"push: {m.properties.get('key')} (id {mid}) consumed again by {name} with "
                             f"delivery_attempt {m.delivery_attempt} after attempt {prev_attempt} "
                             f"(first consumed by {first_by} {time.time() - first_t:.2f} s earlier; {ack})")
                ok_at = self.ack_ok_at.get(mid)
                received = (m.decode_message_timestamp or 0) / 1000.0
                if ok_at is not None and received > ok_at + 0.2:
                    die(f"push: {m.properties.get('key')} (id {mid}) consumed again by {name} (attempt "
                        f"{m.delivery_attempt}), received {received - ok_at:.2f} s after its ack returned OK")
                self.duplicates += 1
                log(f"push: {m.properties.get('key')} consumed again by {name} (attempt {m.delivery_attempt})")
            else:
                self.first[mid] = (name, time.time())
                log(f"push: {name} consumed {m.properties.get('key')} id {mid} attempt {m.delivery_attempt}")
            self.by[name].add(mid)
            self.attempts[m.delivery_attempt] += 1
            self.last_attempt[mid] = m.delivery_attempt

    def on_ack(self, m, ok, err):
        if m.properties.get("run") != self.run:
            return
        with self.lock:
            if ok:
                self.ack_ok_at.setdefault(m.message_id, time.time())
            else:
                self.ack_errors += 1
                self.ack_failed_at[m.message_id] = time.time()
        if not ok:
            log(f"push: ack of {m.properties.get('key')} failed in the client ({short(err)}); it retries")


def assignments_of(c):
    try:
        amap = getattr(c, "_PushConsumer__assignments")
        return {t: str(asg) for t, asg in amap.items()}
    except Exception:
        return {}


def scenario_push(a, dl):
    run = a.run
    topic = a.topic_normal
    group = a.group
    n = a.count or 60
    tr = Tracker(run)
    rec = PushRecord(run)
    cfg = config(a)
    producer = start_client(lambda: Producer(cfg, (topic,)), "producer", dl)

    def make_push(name):
        def make():
            c = PushConsumer(cfg, group, RecordingListener(name, rec), {topic: FilterExpression("*")})
            wrap_acks(c, rec.on_ack)
            return c
        return make

    ca = start_client(make_push("A"), f"push consumer A ({group})", dl)
    cb = start_client(make_push("B"), f"push consumer B ({group})", dl)
    log(f"push consumers fifo={ca.fifo}/{cb.fifo}, long polling {ca.long_polling_timeout}/{cb.long_polling_timeout} s "
        f"(from Settings)")
    t_wait = time.time() + 15
    while time.time() < t_wait and not (assignments_of(ca) and assignments_of(cb)):
        time.sleep(0.2)

    def watch_assignments():
        seen = {}
        while True:
            for name, c in (("A", ca), ("B", cb)):
                now = assignments_of(c).get(topic, "none")
                if seen.get(name) != now:
                    seen[name] = now
                    log(f"assignment of {name} (from QueryAssignment): {now}")
            time.sleep(0.2)

    threading.Thread(target=watch_assignments, daemon=True).start()

    def send_batch(tag, count, kill_at=None):
        keys = []
        for i in range(count):
            key = f"{tag}{i}"
            r, failed, _ = send_retry(producer, lambda key=key: new_message(topic, run, key), dl, key)
            tr.record_send(key, r.message_id, failed)
            keys.append(key)
            if kill_at is not None and i + 1 == kill_at:
                log(f"sent {i + 1}/{count}")
                kill_point()
            time.sleep(0.02)
        log(f"sent {count} messages ({tag}*)")
        return keys

    def wait_all(keys, what):
        ids = [tr.sent[k] for k in keys]
        while True:
            with rec.lock:
                missing = [k for k, mid in zip(keys, ids) if mid not in rec.first]
            if not missing:
                return
            if dl.passed():
                die(f"{what}: {len(missing)} of {len(keys)} message(s) never consumed: {missing[:10]}; "
                    f"A consumed {len(rec.by['A'])}, B {len(rec.by['B'])}; assignments A {assignments_of(ca)}, "
                    f"B {assignments_of(cb)}")
            time.sleep(0.2)

    # Phase 1: both consumers share the group.
    keys1 = send_batch("p", n, kill_at=n // 2)
    wait_all(keys1, "phase 1")
    ids1 = {tr.sent[k] for k in keys1}
    with rec.lock:
        a1, b1 = len(rec.by["A"] & ids1), len(rec.by["B"] & ids1)
    log(f"phase 1: all {n} consumed; A {a1}, B {b1}, duplicates {rec.duplicates}")
    if a1 == 0 or b1 == 0:
        die(f"phase 1: consumer {'A' if a1 == 0 else 'B'} consumed nothing (A {a1}, B {b1}); "
            f"assignments A {assignments_of(ca)}, B {assignments_of(cb)}")
    # let the last acks finish before B goes away
    time.sleep(1.0)
    # Phase 2: B shuts down (NotifyClientTermination); A must get everything.
    t_down = time.time()
    shutdown_clients([cb], timeout=10)
    log(f"consumer B shut down in {time.time() - t_down:.2f} s")
    with rec.lock:
        b_before = set(rec.by["B"])
    t2 = time.time()
    keys2 = send_batch("q", n)
    wait_all(keys2, "phase 2 (after B shut down)")
    ids2 = {tr.sent[k] for k in keys2}
    with rec.lock:
        a2 = len(rec.by["A"] & ids2)
        b2 = len((rec.by["B"] - b_before) & ids2)
        last = max(rec.first[mid][1] for mid in ids2)
        late = sum(1 for mid in ids2 if rec.first[mid][1] - t2 > 15)
        retried2 = sum(1 for mid in ids2 if (rec.last_attempt.get(mid) or 1) > 1)
    if b2:
        die(f"phase 2: consumer B consumed {b2} message(s) after its shutdown")
    if a2 != n:
        die(f"phase 2: A consumed {a2} of {n}")
    log(f"phase 2: A consumed all {n}; last one {last - t2:.2f} s after the first send; {late} took over 15 s; "
        f"{retried2} came with delivery_attempt > 1 (popped for B after it left?)")
    time.sleep(1.0)
    with rec.lock:
        unknown = [mid for mid in set().union(*rec.by.values()) if mid not in tr.key_of]
        extras = [mid for mid in set().union(*rec.by.values()) if mid in tr.failed_ids]
    if unknown:
        die(f"consumed {len(unknown)} id(s) of this run that no send produced: {unknown[:5]}")
    finish(f"phase1: A={a1} B={b1} phase2: A={a2} last_after={last - t2:.2f}s retried={retried2} duplicates={rec.duplicates} "
           f"extras={len(extras)} ack_errors={rec.ack_errors} attempts={dict(rec.attempts)} "
           f"send_retries={tr.send_failures} foreign={rec.foreign}")


# ----------------------------------------------------------------- dlq


def scenario_dlq(a, dl):
    run = a.run
    topic = a.topic_normal
    group = a.dlq_group
    dlq_topic = f"%DLQ%{group}"
    reader_group = a.group
    tr = Tracker(run)
    dtr = Tracker(run)
    cfg = config(a)
    producer = start_client(lambda: Producer(cfg, (topic,)), "producer", dl)
    c1 = start_client(
        lambda: SimpleConsumer(cfg, group, {topic: FilterExpression("*")}, await_duration=a.await_duration),
        f"simple consumer ({group}, never acks)", dl)
    c2 = start_client(
        lambda: SimpleConsumer(cfg, reader_group, {dlq_topic: FilterExpression("*")}, await_duration=a.await_duration),
        f"DLQ reader ({reader_group} on {dlq_topic})", dl)
    deliveries = []  # (t, attempt)
    in_dlq = {}
    body = f"{run}:dlq:D"

    def on_c1(m, poll_start, t):
        if m.properties.get("key") != "D":
            die(f"unexpected message {m.properties.get('key')}")
        if m.message_id != tr.sent.get("D") and m.message_id not in tr.failed_ids:
            die(f"unexpected id {m.message_id} of D")
        tr.on_delivery(m, poll_start, t, 1)
        deliveries.append((t, m.delivery_attempt))
        log(f"{group}: received D (attempt {m.delivery_attempt}); not acking")
        if len(deliveries) == 1:
            kill_point()
        if len(deliveries) > 2 or (m.delivery_attempt or 0) > 2:
            die(f"{group} (max 2 attempts) received D again: delivery #{len(deliveries)}, attempt {m.delivery_attempt}: "
                f"it should be in {dlq_topic}")

    def on_c2(m, poll_start, t):
        if m.properties.get("key") != "D":
            die(f"unexpected message {m.properties.get('key')} in {dlq_topic}")
        dtr.on_delivery(m, poll_start, t, 30)
        if m.message_id != tr.sent.get("D"):
            die(f"{dlq_topic}: message id {m.message_id} != original {tr.sent.get('D')}")
        if m.body.decode() != body:
            die(f"{dlq_topic}: body {m.body!r} != original {body!r}")
        if m.topic != dlq_topic:
            die(f"a message received from {dlq_topic} names topic {m.topic!r}")
        in_dlq.setdefault("t", t)
        in_dlq["topic"] = m.topic
        outcome = ack_retry(c2, m)
        dtr.on_ack(m.message_id, outcome)
        if outcome == "failed":
            die(f"ack of D received from {dlq_topic} refused (the client acks with the message's topic "
                f"{m.topic!r} and the reader's group)")
        log(f"{dlq_topic}: received D (id {m.message_id}, attempt {m.delivery_attempt}, properties "
            f"{sorted(m.properties)}), ack {outcome}")

    r, failed, _ = send_retry(producer, lambda: new_message(topic, run, "D", body=body), dl, "D")
    tr.record_send("D", r.message_id, failed)
    log(f"sent D id {r.message_id}")
    p1 = Poller("dlq-group", c1, tr, 32, 1, on_c1)
    p2 = Poller("dlq-reader", c2, dtr, 32, 30, on_c2)
    p1.start()
    p2.start()
    while True:
        if "t" in in_dlq and len(deliveries) >= 1 and time.time() > max(in_dlq["t"], deliveries[-1][0]) + a.dlq_quiet:
            break
        if dl.passed():
            die(f"timed out: D delivered {len(deliveries)} time(s) to {group} "
                f"(attempts {[d[1] for d in deliveries]}), {'in' if 't' in in_dlq else 'NOT in'} {dlq_topic}")
        time.sleep(0.2)
    p1.halt()
    p2.halt()
    attempts = [d[1] for d in deliveries]
    if attempts != [1, 2]:
        if attempts == [1] and p1.stats.recv_errors > 0:
            log(f"NOTE only attempt 1 seen, with {p1.stats.recv_errors} failed receive(s): attempt 2 may have "
                f"been popped by a receive whose response was lost")
        else:
            die(f"{group} saw D with attempts {attempts}, expected [1, 2]")
    if in_dlq["t"] < deliveries[-1][0]:
        die("D reached the DLQ before its last delivery")
    finish(f"attempts={attempts} gap={deliveries[-1][0] - deliveries[0][0]:.2f}s "
           f"to_dlq_after_last={in_dlq['t'] - deliveries[-1][0]:.2f}s dlq_topic={in_dlq['topic']} "
           f"dlq_redeliveries={dtr.redeliveries} foreign={tr.foreign + dtr.foreign} "
           f"recv_errors={p1.stats.recv_errors + p2.stats.recv_errors}")


# ----------------------------------------------------------------- main

SCENARIOS = {
    "normal": scenario_normal,
    "fifo": scenario_fifo,
    "delay": scenario_delay,
    "transaction": scenario_transaction,
    "orphan": scenario_orphan,
    "orphan-child": scenario_orphan_child,
    "invisible": scenario_invisible,
    "push": scenario_push,
    "dlq": scenario_dlq,
}


def main():
    global SCENARIO
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=[s for s in SCENARIOS if s != "orphan-child"] + ["orphan-child"],
                   metavar="SCENARIO", help="normal | fifo | delay | transaction | orphan | invisible | push | dlq")
    p.add_argument("endpoint", metavar="ENDPOINT", help="one host:port")
    p.add_argument("--topic-normal", default="compat-normal")
    p.add_argument("--topic-fifo", default="compat-fifo")
    p.add_argument("--topic-delay", default="compat-delay")
    p.add_argument("--topic-tx", default="compat-tx")
    p.add_argument("--fifo-group", default="compat-fifo-group", help="a group configured FIFO on the broker")
    p.add_argument("--dlq-group", default="compat-dlq-group", help="a group configured with max 2 delivery attempts")
    p.add_argument("--group", default=None, help="consumer group (default <scenario>-<random>)")
    p.add_argument("--count", type=int, default=0, help="messages (normal 40, fifo 30, push 60 per phase)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds for the whole scenario (successes take 5-60 s)")
    p.add_argument("--await-duration", type=int, default=1,
                   help="SimpleConsumer long-polling seconds (each receive names one random queue; a broker that "
                        "serves only that queue makes every miss cost this much)")
    p.add_argument("--invisible", type=int, default=10, help="invisible duration of normal/fifo receives (s)")
    p.add_argument("--holdback-window", type=float, default=4.0, help="fifo: seconds the held group is watched")
    p.add_argument("--max-lateness", type=float, default=1.5, help="delay: bound before the kill point (s)")
    p.add_argument("--kill-lateness", type=float, default=5.0,
                   help="delay: bound for messages due after the kill point (s)")
    p.add_argument("--strict-lateness", action="store_true",
                   help="delay: bound the raw lateness too, not only the poll-adjusted one (only a broker that "
                        "pops any queue for a receive, like the Java proxy, can meet it with this client)")
    p.add_argument("--clock-tolerance", type=float, default=0.05, help="delay: allowed earliness (s)")
    p.add_argument("--rollback-wait", type=float, default=8.0,
                   help="transaction: seconds after the commit of A during which B must not arrive")
    p.add_argument("--check-within", type=float, default=30.0, help="orphan: seconds for the check-back")
    p.add_argument("--dlq-quiet", type=float, default=6.0,
                   help="dlq: seconds after the DLQ delivery during which no 3rd delivery may come")
    p.add_argument("--run", default=None, help=argparse.SUPPRESS)
    p.add_argument("--skip-holdback", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--trace-receives", action="store_true", help="log every receive call")
    p.add_argument("--strict-pops", action="store_true",
                   help="fail on a redelivery that shows a lost pop (the same delivery_attempt again, or back "
                        "before the invisible duration ran out); by default it is reported (lost_pops=N)")
    a = p.parse_args()
    SCENARIO = a.scenario
    quiet_client_callbacks()
    global STRICT_POPS, TRACE_RECEIVES
    STRICT_POPS = a.strict_pops
    TRACE_RECEIVES = a.trace_receives
    if any(c in a.endpoint for c in ";,") or a.endpoint.count(":") != 1:
        print(f"ENDPOINT must be one host:port, got {a.endpoint!r}", file=sys.stderr)
        sys.exit(2)
    a.run = a.run or f"r{rand_id()}"
    a.group = a.group or f"{a.scenario}-{rand_id()}"
    dl = Deadline(a.timeout)
    if a.scenario != "orphan-child":
        log(f"scenario {a.scenario} against {a.endpoint}: run {a.run}, group {a.group}, timeout {a.timeout:.0f} s")
    try:
        SCENARIOS[a.scenario](a, dl)
    except SystemExit:
        raise
    except BaseException as e:
        import traceback
        traceback.print_exc()
        die(f"unexpected exception: {short(e)}")
    die("scenario returned without a result")


if __name__ == "__main__":
    main()
