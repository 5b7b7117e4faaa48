-- Counts the journal stream's entries and approvals for loadtest/compare's
-- sanity column, 10,000 entries at a time so that memory stays bounded.
-- Usage: EVAL <this> 1 journal   ->  {approvals, entries}
local approvals, entries, from = 0, 0, '-'
while true do
  local batch = redis.call('XRANGE', KEYS[1], from, '+', 'COUNT', 10000)
  if #batch == 0 then break end
  for _, e in ipairs(batch) do
    entries = entries + 1
    -- Fields in XADD order: terminal, event_id, card_no, decision, ...
    if e[2][8] == 'approve' then approvals = approvals + 1 end
  end
  from = '(' .. batch[#batch][1]
end
return { approvals, entries }
