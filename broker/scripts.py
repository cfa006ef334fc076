"""The Lua scripts that change a generation atomically.

All take ``KEYS = (meta, log, text)`` of one generation (one hash tag, so one cluster
slot). Refusals are error replies whose first word is a stable code the Python side maps to
an exception: ``NOGEN`` (no meta hash), ``STALE <attempt>`` (the writer was fenced),
``ENDED <status>`` (a terminal event exists), ``SEQ <last_seq>`` (wrong next sequence number).
"""

from __future__ import annotations

from broker.keys import EVENT_FIELD

_TERMINAL = """
local function is_terminal(status)
  return status == 'completed' or status == 'failed' or status == 'cancelled'
end
"""

#: Take the generation for a new attempt: bump the fencing token, mark it running, hold a lease.
#: ARGV: worker id, now (ms), lease (ms).
#: Returns {attempt, last_seq, cancel_requested (0/1)}; NOGEN / ENDED as errors.
CLAIM = (
    _TERMINAL
    + """
local meta = KEYS[1]
local m = redis.call('HMGET', meta, 'status', 'attempt', 'last_seq', 'cancel_requested')
if not m[1] then return redis.error_reply('NOGEN') end
if is_terminal(m[1]) then return redis.error_reply('ENDED ' .. m[1]) end
local attempt = tonumber(m[2] or '0') + 1
local now = tonumber(ARGV[2])
redis.call('HSET', meta, 'attempt', attempt, 'status', 'running', 'worker', ARGV[1],
           'lease_until_ms', now + tonumber(ARGV[3]))
redis.call('HSETNX', meta, 'started_at_ms', now)
local cancel = 0
if m[4] == '1' then cancel = 1 end
return {attempt, tonumber(m[3] or '0'), cancel}
"""
)

#: Append a batch of events, fenced by the attempt and the expected first sequence number.
#: ARGV: attempt, first_seq, now (ms), lease (ms), retention (s), final status ('' if the
#: batch has no terminal event), batch token, n events, then n pairs (msgpack payload, token
#: text), then the remaining ARGV as field/value pairs written to the meta hash with a final
#: status. Returns {last_seq, cancel_requested (0/1)}.
#:
#: Idempotent: a batch whose token (attempt, first seq, digest of its payloads) is the last one
#: stored is answered as a success without writing again, so a writer whose reply was lost can
#: retry the same batch safely; a different batch at a taken sequence number is still refused.
APPEND = (
    _TERMINAL
    + """
local meta, log, text = KEYS[1], KEYS[2], KEYS[3]
local m = redis.call('HMGET', meta, 'status', 'attempt', 'last_seq', 'cancel_requested',
                     'last_batch')
if not m[1] then return redis.error_reply('NOGEN') end
if m[2] ~= ARGV[1] then return redis.error_reply('STALE ' .. (m[2] or '0')) end
local last = tonumber(m[3] or '0')
local cancel = 0
if m[4] == '1' then cancel = 1 end
if m[5] == ARGV[7] then return {last, cancel} end
if is_terminal(m[1]) then return redis.error_reply('ENDED ' .. m[1]) end
local seq = tonumber(ARGV[2])
if seq ~= last + 1 then return redis.error_reply('SEQ ' .. last) end
local now, lease, ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local final = ARGV[6]
local n = tonumber(ARGV[8])
local wrote_text = false
for i = 0, n - 1 do
  local payload, delta = ARGV[9 + 2 * i], ARGV[10 + 2 * i]
  redis.call('XADD', log, '0-' .. (seq + i), '"""
    + EVENT_FIELD
    + """', payload)
  if delta ~= '' then
    redis.call('APPEND', text, delta)
    wrote_text = true
  end
end
last = seq + n - 1
redis.call('HSET', meta, 'last_seq', last, 'lease_until_ms', now + lease, 'last_batch', ARGV[7])
if wrote_text then redis.call('HSETNX', meta, 'first_token_at_ms', now) end
if final ~= '' then
  redis.call('HSET', meta, 'status', final, 'finished_at_ms', now)
  for i = 9 + 2 * n, #ARGV, 2 do
    redis.call('HSET', meta, ARGV[i], ARGV[i + 1])
  end
end
redis.call('EXPIRE', meta, ttl)
redis.call('EXPIRE', log, ttl)
redis.call('EXPIRE', text, ttl)
return {last, cancel}
"""
)

#: Renew the writer's lease and read the cancel flag, fenced like an append: a job calls it
#: between batches, so a stalled provider keeps its lease and a fenced writer learns it early.
#: ARGV: attempt, now (ms), lease (ms). Returns cancel_requested (0/1).
RENEW = (
    _TERMINAL
    + """
local m = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'cancel_requested')
if not m[1] then return redis.error_reply('NOGEN') end
if m[2] ~= ARGV[1] then return redis.error_reply('STALE ' .. (m[2] or '0')) end
if is_terminal(m[1]) then return redis.error_reply('ENDED ' .. m[1]) end
redis.call('HSET', KEYS[1], 'lease_until_ms', tonumber(ARGV[2]) + tonumber(ARGV[3]))
if m[3] == '1' then return 1 end
return 0
"""
)

#: Take a generation over from a writer whose lease lapsed (the lease sweeper): fence the
#: writer by bumping the attempt, and hold a short lease while the sweeper ends the stream.
#: ARGV: sweeper id, now (ms), lease (ms).
#: Returns {'gone'}, {'ended'} (not running: ended, or never claimed), {'live', lease_until}
#: (the lease holds), or {'taken', attempt, last_seq, cancel_requested (0/1)}.
TAKE_OVER = """
local m = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'last_seq', 'lease_until_ms',
                     'cancel_requested')
if not m[1] then return {'gone'} end
if m[1] ~= 'running' then return {'ended'} end
local now = tonumber(ARGV[2])
local lease_until = tonumber(m[4] or '0')
if lease_until > now then return {'live', lease_until} end
local attempt = tonumber(m[2] or '0') + 1
redis.call('HSET', KEYS[1], 'attempt', attempt, 'worker', ARGV[1],
           'lease_until_ms', now + tonumber(ARGV[3]))
local cancel = 0
if m[5] == '1' then cancel = 1 end
return {'taken', attempt, tonumber(m[3] or '0'), cancel}
"""

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
