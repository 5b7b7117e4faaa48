-- wrk script for the plaintext benchmark listener: unique event ids, a
-- terminal id per wrk thread, cards spread over the seeded 500118B00000000..
-- (CARDS of them). Usage: wrk -s scripts/bench/authorize.lua http://127.0.0.1:PORT
local counter = 0
local cards = tonumber(os.getenv("CARDS") or "1000")

function setup(thread)
  thread:set("tid", tostring(math.random(1, 1000000000)) .. "-" .. tostring(os.time()))
end

request = function()
  counter = counter + 1
  local card = string.format("500118B%08d", (counter * 104729) % cards)
  local body = string.format(
    '{"event_id":"w%s-%d","kind":"tap","card_no":"%s","scenario":"transit","amount_fen":1,"site":"bench"}',
    tid, counter, card)
  return wrk.format("POST", "/v1/authorize",
    { ["Content-Type"] = "application/json", ["X-Terminal-Id"] = "wrk-" .. tid }, body)
end
