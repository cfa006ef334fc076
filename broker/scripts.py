"""The Lua scripts that change a generation atomically.

Most take ``KEYS = (meta, log, text)`` of one generation (one hash tag, so one cluster
slot); the rest (``QUEUE_CREATED``, ``LAPSED``, ``INDEX_LEASE``) take keys of the control
slot only. Refusals are error replies whose first word is a stable code the Python side maps to
an exception: ``NOGEN`` (no meta hash), ``STALE <attempt>`` (the writer was fenced),
``ENDED <status>`` (a terminal event exists), ``SEQ <last_seq>`` (wrong next sequence number),
``REFUSED <why>`` (a claim that would race a sweeper ending the generation, or one on a store
that changed timeline since the generation was last written).

Leases are reckoned on Redis's clock (``TIME``), never on the caller's: a writer and a sweeper
on hosts whose clocks disagree by more than a lease would otherwise see a live lease as lapsed
(and take over a healthy writer) or a dead one as live. Scripts that take an optional ``now``
argument use it only when it is given (tests move time forward that way); processes pass ''.

The *store epoch* (``keys.MetaField.EPOCH``) is the master's replication id, which Redis
replaces whenever history may fork: a replica promoted by a failover, a restart. Readers may
hold events a new master never received (replication is asynchronous), so a generation last
written under another epoch may have a past on a lost timeline, and only a writer whose
append passes the sequence check proves otherwise. Scripts read the epoch themselves, in the
same atomic step as their other checks; a store without ``INFO`` (fakeredis) has none (''),
which turns every epoch check off.
"""

from __future__ import annotations

from broker.keys import EVENT_FIELD

_TERMINAL = """
local function is_terminal(status)
  return status == 'completed' or status == 'failed' or status == 'cancelled'
end
"""

#: ``clock(arg)``: the time in ms, from ``arg`` when it is given, else Redis's own clock.
_CLOCK = """
local function clock(arg)
  if arg ~= nil and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

#: The store epoch and the checks made with it.
#: ``store_epoch()``: the master's replication id ('' when the store cannot tell, as fakeredis).
#: ``on_other_timeline(stored, current)``: the generation was last written under another
#: epoch than the store's now (one never written under an epoch, or a store without epochs,
#: is not).
#: ``mark_lost(meta, first)``: readers may hold event ``first`` and later ones as the store
#: no longer has them; kept as the lowest such id ever recorded.
_EPOCH = """
local function store_epoch()
  local ok, info = pcall(redis.call, 'INFO', 'replication')
  if not ok or type(info) ~= 'string' then return '' end
  return string.match(info, 'master_replid:(%x+)') or ''
end
local function on_other_timeline(stored, current)
  return stored and stored ~= '' and current ~= '' and current ~= stored
end
local function mark_lost(meta, first)
  local known = tonumber(redis.call('HGET', meta, 'lost_from_seq') or '')
  if known == nil or known > first then redis.call('HSET', meta, 'lost_from_seq', first) end
end
"""

#: Take the generation for a new attempt: bump the fencing token, mark it running, hold a lease.
#: ARGV: worker id, now (ms, the writer's clock: ``started_at_ms``), lease (ms), the number of
#: the continuation the job runs (0: the generation's first job; ``HAND_OVER``), and '0' for
#: a claim only to end it (a cancel while no worker has it), which is not counted as a
#: continuation.
#: Returns {attempt, last_seq, cancel_requested (0/1), lease_until (ms, Redis's clock),
#: continuations, the reason the last writer stopped ('' when none did), continuations after
#: a lost worker};
#: REFUSED too while a hand-over is pending, to every job but the continuation it queued
#: (a copy of an older continuation's job, the first job run again by arq), and to a
#: continuation's job when none is pending: so two continuations never both start; and to
#: the first job while a continuation holds a live lease (arq runs a killed worker's job
#: again once its in-progress key expires, maybe while the continuation still writes).
#: Any other claim of a generation an earlier attempt wrote to (``last_seq`` > 0) or handed
#: over is a continuation and is counted as one, also without a hand-over (arq ran the first
#: job again).
#: NOGEN / ENDED as errors, and REFUSED where a sweeper ends the generation: a queued one
#: whose queue deadline passed (its job expired: the sweeper ends it with queue_timeout, and
#: a worker that read the job just before must not start it meanwhile), or one a sweeper
#: holds now (taking it back would fence the sweeper's end and leave nobody to end it).
#: REFUSED too when the generation was last written under another store epoch: it may have
#: events on a lost timeline that readers hold, so no new attempt may write under those ids.
#: Its writer, if alive, may still prove its continuity by appending; otherwise a sweeper
#: ends it (``log_lost``) once its lease lapses, at once for a queued one.
CLAIM = (
    _TERMINAL
    + _CLOCK
    + _EPOCH
    + """
local meta = KEYS[1]
local m = redis.call('HMGET', meta, 'status', 'attempt', 'last_seq', 'cancel_requested',
                     'lease_until_ms', 'worker', 'epoch', 'handover', 'continuations',
                     'handover_reason', 'continuations_lost')
if not m[1] then return redis.error_reply('NOGEN') end
if is_terminal(m[1]) then return redis.error_reply('ENDED ' .. m[1]) end
local number = tonumber(ARGV[4] or '0') or 0
if m[8] and tonumber(m[8]) ~= number then
  return redis.error_reply('REFUSED continuation ' .. m[8] .. ' is pending')
end
if not m[8] and number > 0 then
  return redis.error_reply('REFUSED no continuation is pending')
end
local now = clock('')
local deadline = tonumber(m[5] or '0')
if m[1] == 'queued' and deadline > 0 and deadline <= now then
  return redis.error_reply('REFUSED its queue deadline passed')
end
if m[6] and string.sub(m[6], 1, 8) == 'sweeper:' and deadline > now then
  return redis.error_reply('REFUSED a sweeper is ending it')
end
if number == 0 and tonumber(m[9] or '0') > 0 and m[1] == 'running' and deadline > now then
  return redis.error_reply('REFUSED a continuation is writing it')
end
local epoch = store_epoch()
if on_other_timeline(m[7], epoch) then
  if m[1] == 'queued' or m[8] then redis.call('HSET', meta, 'lease_until_ms', now) end
  return redis.error_reply('REFUSED the store changed timeline since it was last written')
end
local attempt = tonumber(m[2] or '0') + 1
local lease_until = now + tonumber(ARGV[3])
redis.call('HSET', meta, 'attempt', attempt, 'status', 'running', 'worker', ARGV[1],
           'lease_until_ms', lease_until)
if epoch ~= '' then redis.call('HSET', meta, 'epoch', epoch) end
redis.call('HSETNX', meta, 'started_at_ms', ARGV[2])
local continuations = tonumber(m[9] or '0')
local reason = m[10] or ''
local lost = tonumber(m[11] or '0')
if ARGV[5] ~= '0' and (m[8] or tonumber(m[3] or '0') > 0) then
  continuations = continuations + 1
  if not m[8] then reason = 'worker_lost' end
  if reason == 'worker_lost' then lost = lost + 1 end
  redis.call('HSET', meta, 'continuations', continuations, 'continuations_lost', lost,
             'handover_reason', reason)
  redis.call('HDEL', meta, 'handover', 'handover_since_ms', 'handover_queued')
end
local cancel = 0
if m[4] == '1' then cancel = 1 end
return {attempt, tonumber(m[3] or '0'), cancel, lease_until, continuations, reason, lost}
"""
)

#: Append a batch of events, fenced by the attempt and the expected first sequence number.
#: KEYS: meta, log, text, and on a Redis Cluster the generation's pulse channel
#: (``keys.pulse_channel``), on which the new last_seq is published for the reader hubs.
#: ARGV: attempt, first_seq, now (ms, the writer's clock: timestamps), lease (ms), retention (s),
#: final status ('' if the batch has no terminal event), batch token, in doubt ('1': an
#: earlier batch of this writer at first_seq failed with its outcome unknown), n events, then
#: n pairs (msgpack payload, token text), then the remaining ARGV as field/value pairs
#: written to the meta hash with a final status. Returns {last_seq, cancel_requested (0/1)}.
#:
#: Records the store epoch: an append that passed the sequence check continues the log its
#: writer knows, so the generation's history is this timeline's from here on. Except for a
#: batch in doubt: the earlier one may have reached a master the store has since replaced,
#: and readers may hold it; on another epoch, first_seq is recorded as lost in the same step.
#:
#: Idempotent: a batch whose token (attempt, first seq, digest of its payloads) is the last one
#: stored is answered as a success without writing again, so a writer whose reply was lost can
#: retry the same batch safely; a different batch at a taken sequence number is still refused.
APPEND = (
    _TERMINAL
    + _CLOCK
    + _EPOCH
    + """
local meta, log, text = KEYS[1], KEYS[2], KEYS[3]
local m = redis.call('HMGET', meta, 'status', 'attempt', 'last_seq', 'cancel_requested',
                     'last_batch', 'epoch')
if not m[1] then return redis.error_reply('NOGEN') end
if m[2] ~= ARGV[1] then return redis.error_reply('STALE ' .. (m[2] or '0')) end
local last = tonumber(m[3] or '0')
local cancel = 0
if m[4] == '1' then cancel = 1 end
if m[5] == ARGV[7] then return {last, cancel} end
if is_terminal(m[1]) then return redis.error_reply('ENDED ' .. m[1]) end
local seq = tonumber(ARGV[2])
if seq ~= last + 1 then return redis.error_reply('SEQ ' .. last) end
local epoch = store_epoch()
if ARGV[8] == '1' and on_other_timeline(m[6], epoch) then mark_lost(meta, seq) end
local now, lease, ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local final = ARGV[6]
local n = tonumber(ARGV[9])
local wrote_text = false
for i = 0, n - 1 do
  local payload, delta = ARGV[10 + 2 * i], ARGV[11 + 2 * i]
  redis.call('XADD', log, '0-' .. (seq + i), '"""
    + EVENT_FIELD
    + """', payload)
  if delta ~= '' then
    redis.call('APPEND', text, delta)
    wrote_text = true
  end
end
last = seq + n - 1
redis.call('HSET', meta, 'last_seq', last, 'lease_until_ms', clock('') + lease,
           'last_batch', ARGV[7])
if epoch ~= '' then redis.call('HSET', meta, 'epoch', epoch) end
if wrote_text then redis.call('HSETNX', meta, 'first_token_at_ms', now) end
if final ~= '' then
  redis.call('HSET', meta, 'status', final, 'finished_at_ms', now)
  redis.call('HDEL', meta, 'handover', 'handover_since_ms', 'handover_queued')
  for i = 10 + 2 * n, #ARGV, 2 do
    redis.call('HSET', meta, ARGV[i], ARGV[i + 1])
  end
end
redis.call('EXPIRE', meta, ttl)
redis.call('EXPIRE', log, ttl)
redis.call('EXPIRE', text, ttl)
if KEYS[4] then redis.call('SPUBLISH', KEYS[4], last) end
return {last, cancel}
"""
)

#: Renew the writer's lease and read the cancel flag, fenced like an append: a job calls it
#: between batches, so a stalled provider keeps its lease and a fenced writer learns it early.
#: ARGV: attempt, lease (ms). Returns {cancel_requested (0/1), lease_until (ms, Redis's clock)}.
RENEW = (
    _TERMINAL
    + _CLOCK
    + """
local m = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'cancel_requested')
if not m[1] then return redis.error_reply('NOGEN') end
if m[2] ~= ARGV[1] then return redis.error_reply('STALE ' .. (m[2] or '0')) end
if is_terminal(m[1]) then return redis.error_reply('ENDED ' .. m[1]) end
local lease_until = clock('') + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'lease_until_ms', lease_until)
local cancel = 0
if m[3] == '1' then cancel = 1 end
return {cancel, lease_until}
"""
)

#: Hand a generation over to a continuation, from the attempt that holds it: a worker that is
#: stopping, or a sweeper that took it over from a lost one (``TAKE_OVER``). Fenced like an
#: append, and fencing in turn: the attempt goes up, so the hander can append nothing more
#: (whatever becomes of it after this step, the continuation is the generation's writer).
#: Records the pending continuation's number (``continuations`` + 1), which only a job queued
#: for it may claim (``CLAIM``), why the writer stopped, and a deadline by which a worker must
#: have claimed it: past it, a sweeper hands it over again under the same number, and its job
#: is queued anew under a fresh id (``queued``, the times it was queued, is part of the id: an
#: id arq still holds would never run). So a crash between this step and the queueing, or a
#: job that was lost, costs a delay, never a second continuation; until ``give up`` after the
#: first hand-over, when the sweeper ends it. Only continuations after a lost worker count
#: against the limit: a graceful stop (a deploy) says nothing about the request.
#: ARGV: attempt, reason, most continuations after lost workers, pickup deadline (ms from
#: now), give up (ms).
#: Returns {'queued', number, pickup deadline (ms, Redis's clock), times queued, reason,
#: new (1: the first hand-over of this number)}, {'cancel'} (a client asked to cancel: end it
#: so), {'limit', continuations after lost workers} (it may not be continued again),
#: {'expired', number} (no worker claimed it in time); NOGEN / STALE / ENDED as errors.
HAND_OVER = (
    _TERMINAL
    + _CLOCK
    + """
local meta = KEYS[1]
local m = redis.call('HMGET', meta, 'status', 'attempt', 'cancel_requested',
                     'continuations', 'handover', 'handover_since_ms', 'continuations_lost',
                     'handover_reason')
if not m[1] then return redis.error_reply('NOGEN') end
if m[2] ~= ARGV[1] then return redis.error_reply('STALE ' .. (m[2] or '0')) end
if is_terminal(m[1]) then return redis.error_reply('ENDED ' .. m[1]) end
if m[3] == '1' then return {'cancel'} end
local now = clock('')
local number = tonumber(m[5] or '')
local reason = m[8] or ARGV[2]
local new = 0
if number then
  if now - tonumber(m[6] or '0') > tonumber(ARGV[5]) then return {'expired', number} end
else
  local lost = tonumber(m[7] or '0')
  if ARGV[2] == 'worker_lost' and lost >= tonumber(ARGV[3]) then return {'limit', lost} end
  number = tonumber(m[4] or '0') + 1
  reason = ARGV[2]
  new = 1
  redis.call('HSET', meta, 'handover', number, 'handover_reason', reason,
             'handover_since_ms', now, 'handover_queued', 0)
end
local queued = redis.call('HINCRBY', meta, 'handover_queued', 1)
local deadline = now + tonumber(ARGV[4])
redis.call('HSET', meta, 'attempt', tonumber(m[2]) + 1, 'worker', 'handover',
           'lease_until_ms', deadline)
return {'queued', number, deadline, queued, reason, new}
"""
)

#: Take a generation over whose deadline passed (the lease sweeper): a running one whose writer
#: stopped renewing its lease, or a queued one no worker started before its job expired. Fences
#: any writer by bumping the attempt, and holds a short lease while the sweeper ends the stream.
#: A generation last written under another store epoch may have had events past ``last_seq``
#: on a lost timeline, which readers may hold: ``last_seq + 1`` is recorded as lost in the
#: same step, so that whatever the sweeper appends there, no reader takes it for its own.
#: ARGV: sweeper id, now (ms; '' = Redis's clock), lease (ms).
#: Returns {'gone'}, {'ended'} (already ended), {'live', lease_until} (the deadline holds),
#: or {'taken', attempt, last_seq, cancel_requested (0/1), status before, on another
#: timeline (0/1)}.
TAKE_OVER = (
    _CLOCK
    + _EPOCH
    + """
local m = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'last_seq', 'lease_until_ms',
                     'cancel_requested', 'epoch')
if not m[1] then return {'gone'} end
if m[1] ~= 'running' and m[1] ~= 'queued' then return {'ended'} end
local now = clock(ARGV[2])
local lease_until = tonumber(m[4] or '0')
if lease_until > now then return {'live', lease_until} end
local attempt = tonumber(m[2] or '0') + 1
redis.call('HSET', KEYS[1], 'attempt', attempt, 'worker', ARGV[1],
           'lease_until_ms', now + tonumber(ARGV[3]))
local cancel = 0
if m[5] == '1' then cancel = 1 end
local forked = 0
if on_other_timeline(m[6], store_epoch()) then
  forked = 1
  mark_lost(KEYS[1], tonumber(m[3] or '0') + 1)
end
return {'taken', attempt, tonumber(m[3] or '0'), cancel, m[1], forked}
"""
)

#: Write a new generation's meta hash, with its lifetime and the store epoch, in one step: a
#: record is never left without its expiry, nor without the epoch that lets ``CLAIM`` refuse
#: a queued generation whose job may have run on a timeline the store then lost. Never over
#: a record that exists (a retried create that completes a half-done one may race another).
#: KEYS: the meta hash; on a single Redis, also the create's idempotency key, which must
#: still name this generation (``QUEUE_CREATED`` runs in the same transaction and may have
#: found an earlier create's). ARGV: retention (s), the idempotency value expected (or ''),
#: then field, value, field, value…
#: Returns the epoch ('' when the store has none), or false when nothing was written.
CREATE = (
    _EPOCH
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
if #KEYS > 1 and redis.call('GET', KEYS[2]) ~= ARGV[2] then return false end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[1])
local epoch = store_epoch()
if epoch ~= '' then redis.call('HSET', KEYS[1], 'epoch', epoch) end
return epoch
"""
)

#: A create's control-slot writes, in one step: its lease entry (due at the queue deadline,
#: so a generation no worker ever claims is still ended), its listing index entries (and
#: the index trimmed to the retention), its arq job (record and queue entry, in arq's
#: format: ``broker.jobs``), and, given an idempotency key, the key naming it. A key that
#: already names another create's generation wins: nothing is written, and its value is
#: returned.
#: KEYS: leases, arq's queue, the job's record, the index keys (ARGV[1] of them), then the
#: idempotency key if any. ARGV: the number of index keys, stream id, job id, job record,
#: job lifetime (ms), created at (ms), queue deadline (ms), index horizon (ms), the
#: idempotency value, its lifetime (s).
#: Returns false when the writes were made, else the value the idempotency key holds.
QUEUE_CREATED = """
local indexes = tonumber(ARGV[1])
if #KEYS > 3 + indexes then
  local existing = redis.call('GET', KEYS[#KEYS])
  if existing then return existing end
  redis.call('SET', KEYS[#KEYS], ARGV[9], 'EX', ARGV[10])
end
redis.call('ZADD', KEYS[1], ARGV[7], ARGV[2])
for i = 4, 3 + indexes do
  redis.call('ZADD', KEYS[i], ARGV[6], ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[8])
end
redis.call('PSETEX', KEYS[3], ARGV[5], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[3])
return false
"""

#: Record that the store lost events from ARGV[1] on after they were appended (and maybe
#: read); kept as the lowest such id ever recorded. KEYS: the meta hash.
MARK_LOST = (
    _EPOCH
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
mark_lost(KEYS[1], tonumber(ARGV[1]))
return 1
"""
)

#: The generations whose lease (or queue deadline) lapsed, longest lapsed first.
#: KEYS: the lease index. ARGV: now (ms; '' = Redis's clock), most to return.
LAPSED = (
    _CLOCK
    + """
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', clock(ARGV[1]), 'LIMIT', 0, ARGV[2])
"""
)

#: Put a generation in the lease index, due a lease from now on Redis's clock: before a claim,
#: so that a claim whose reply is lost (or that lands while this process dies) is still swept.
#: KEYS: the lease index. ARGV: stream id, lease (ms). Returns the deadline.
INDEX_LEASE = (
    _CLOCK
    + """
local due = clock('') + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], due, ARGV[1])
return due
"""
)

#: Read a generation for a client that opens its events, and count the connection (and the
#: resume, when it comes back with a resume point) in the same step: operators see viewers
#: and reconnects without a second round trip per connection.
#: ARGV: resumed (0/1), tenant ('' = any). Returns {meta as a flat HGETALL list, text}, or
#: false when missing or another tenant's (nothing is counted then).
OPEN_WATCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[2] then return false end
redis.call('HINCRBY', KEYS[1], 'connections', 1)
if ARGV[1] == '1' then redis.call('HINCRBY', KEYS[1], 'resumes', 1) end
return {redis.call('HGETALL', KEYS[1]), redis.call('GET', KEYS[3]) or ''}
"""

#: A generation's meta hash and text as of one moment (a state read). KEYS: meta, log, text.
#: Returns {meta as a flat HGETALL list, text or false}.
READ_STATE = """
return {redis.call('HGETALL', KEYS[1]), redis.call('GET', KEYS[3])}
"""

#: Ask the running job to stop. ARGV: none. Returns the status; NOGEN as an error.
#: A generation that already ended keeps its result (the flag is not set).
REQUEST_CANCEL = (
    _TERMINAL
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return redis.error_reply('NOGEN') end
if not is_terminal(status) then redis.call('HSET', KEYS[1], 'cancel_requested', '1') end
return status
"""
)

#: Put an imported generation in place (``broker.archive``): rename its staged log and text to
#: the generation's own, write its meta hash, give all three the retention. One step in the
#: generation's slot, so readers see the whole stream or nothing, and of two imports of one
#: id only one lands; the listing indexes (the control slot) are the caller's, around it.
#: Leaves a mark for the staging lifetime: a commit sent again because its reply was lost
#: (the cluster client re-sends a command whose connection broke) answers 1 again.
#: KEYS: meta, log, text, staged log, staged text, done mark (``keys.import_keys``).
#: ARGV: retention (s), events staged, staging lifetime (s), then field, value… of the meta
#: hash. Returns 1; as errors, changing nothing: EXISTS (the id is taken: its meta hash or
#: its log exists), EXPIRED (the staged log lacks events or the staged text is gone: they
#: expired, or Redis evicted them).
COMMIT_IMPORT = """
local meta, log, text, staged_log, staged_text = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
if redis.call('EXISTS', KEYS[6]) == 1 then return 1 end
if redis.call('EXISTS', meta) == 1 or redis.call('EXISTS', log) == 1 then
  return redis.error_reply('EXISTS')
end
if redis.call('XLEN', staged_log) ~= tonumber(ARGV[2])
    or redis.call('EXISTS', staged_text) == 0 then
  return redis.error_reply('EXPIRED')
end
redis.call('RENAME', staged_log, log)
redis.call('RENAME', staged_text, text)
redis.call('HSET', meta, unpack(ARGV, 4))
redis.call('SET', KEYS[6], '1', 'EX', ARGV[3])
redis.call('EXPIRE', meta, ARGV[1])
redis.call('EXPIRE', log, ARGV[1])
redis.call('EXPIRE', text, ARGV[1])
return 1
"""

#: Take up to ARGV[2] generations due for the archiver (``keys.ARCHIVE_DUE_KEY``) by ARGV[1]
#: (ms; '' = Redis's clock), and push each one's due time ARGV[3] ms on: the taker's claim on
#: it. Two archivers never take one at once; one that dies mid-copy leaves it due again then.
TAKE_ARCHIVE_DUE = (
    _CLOCK
    + """
local now = clock(ARGV[1])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), id) end
return ids
"""
)

#: Record that a generation's archive copy was committed. KEYS: meta. ARGV: now (ms).
#: Returns 1, or 0 when it no longer exists or has not ended (nothing is written then).
MARK_ARCHIVED = (
    _TERMINAL
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or not is_terminal(status) then return 0 end
redis.call('HSET', KEYS[1], 'archived_at_ms', ARGV[1])
return 1
"""
)

#: Delete an archived generation's keys, if nothing changed since the archive last copied
#: its meta hash. KEYS: meta, log, text. ARGV: last_seq, connections, resumes as copied.
#: Returns 'dropped', 'gone', 'unarchived' (no archive copy recorded) or 'changed'.
DROP_ARCHIVED = """
local m = redis.call('HMGET', KEYS[1], 'archived_at_ms', 'last_seq', 'connections', 'resumes')
if redis.call('EXISTS', KEYS[1]) == 0 then return 'gone' end
if not m[1] then return 'unarchived' end
if (m[2] or '0') ~= ARGV[1] or (m[3] or '0') ~= ARGV[2] or (m[4] or '0') ~= ARGV[3] then
  return 'changed'
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return 'dropped'
"""

#: A generation has ended: take it out of the lease index (nothing left for a sweeper) and,
#: when ARGV[2] is '1' (an archive is configured), put it in the archiver's due set, due at
#: once (an entry already there keeps its time), and in the set of those not copied yet. One
#: step in the control slot: an end is never out of the one without being in the others.
#: KEYS: lease index, archive due set, archive pending set. ARGV: stream id, archiving (0/1),
#: delay (ms: due that much later; an import, put there just before its commit).
ENDED = (
    _CLOCK
    + """
redis.call('ZREM', KEYS[1], ARGV[1])
if ARGV[2] == '1' then
  local now = clock('')
  redis.call('ZADD', KEYS[2], 'NX', now + tonumber(ARGV[3] or '0'), ARGV[1])
  redis.call('ZADD', KEYS[3], 'NX', now, ARGV[1])
end
return 1
"""
)
