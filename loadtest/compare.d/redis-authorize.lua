-- One authorization as a Redis script, in the gateway's order (src/authz.rs):
-- deny list, card exists, status, the scenario's function, per-transaction
-- maximum, daily cap; then the idempotency key, the day's spend and the
-- journal entry. A script runs atomically, so nothing else interleaves; with
-- appendfsync always its writes are in the fsync'ed AOF before the reply.
--
-- KEYS[1] card hash        card:<12 digits>  (card number 500118B + last 8)
-- KEYS[2] deny-list set    of card numbers
-- KEYS[3] idempotency key  idem:<terminal>:<event_id>
-- KEYS[4] journal stream
-- ARGV[1] scenario, ARGV[2] amount_fen
-- Returns "decision reason amount_fen".
local card_key, deny_key, idem_key, journal_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local scenario, amount = ARGV[1], tonumber(ARGV[2])
local terminal, event_id = string.match(idem_key, '^idem:([^:]+):(.+)$')
local card_no = '500118B' .. string.sub(card_key, -8)

-- The gateway's built-in scenario rules (config::scenario_default):
-- function bit (0: none needed) and largest single amount; the rest do not
-- charge.
local RULES = {
  transit = { 1, 2000 }, medical = { 2, 500000 }, payment = { 4, 200000 }, culture = { 0, 20000 },
}
-- Idempotency answers are kept as long as the gateway keeps them (72 h).
local IDEMPOTENCY_RETENTION_S = 72 * 3600

local now = tonumber(redis.call('TIME')[1])
local day = math.floor((now + 8 * 3600) / 86400)

local reason, charged, spent_day = 'OK', 0, nil
if redis.call('SISMEMBER', deny_key, card_no) == 1 then
  reason = 'DENYLISTED'
else
  local c = redis.call('HMGET', card_key, 'status', 'functions', 'spent_day', 'spent_fen', 'daily_cap_fen')
  local rule = RULES[scenario]
  if not c[1] then
    reason = 'CARD_NOT_FOUND'
  elseif c[1] ~= 'active' then
    reason = 'CARD_' .. string.upper(c[1])
  elseif rule and rule[1] ~= 0 and bit.band(tonumber(c[2]), rule[1]) == 0 then
    reason = 'FUNCTION_NOT_ENABLED'
  elseif rule and amount > 0 then
    spent_day = tonumber(c[3])
    local spent = 0
    if spent_day == day then spent = tonumber(c[4]) end
    if amount > rule[2] or spent + amount > tonumber(c[5]) then
      reason = 'LIMIT_EXCEEDED'
    else
      charged = amount
    end
  end
end
local decision = 'decline'
if reason == 'OK' then decision = 'approve' end
local answer = decision .. ' ' .. reason .. ' ' .. charged

-- A repeat of an event already answered: the first answer stands and nothing
-- is charged twice.
if not redis.call('SET', idem_key, answer, 'NX', 'EX', IDEMPOTENCY_RETENTION_S) then
  return redis.call('GET', idem_key)
end
if charged > 0 then
  if spent_day == day then
    redis.call('HINCRBY', card_key, 'spent_fen', charged)
  else
    redis.call('HSET', card_key, 'spent_day', day, 'spent_fen', charged)
  end
end
redis.call('XADD', journal_key, '*', 'terminal', terminal, 'event_id', event_id, 'card_no', card_no,
  'decision', decision, 'reason', reason, 'amount_fen', charged, 'at', now)
return answer
