-- wrk-post.lua — POST a JSON webhook-like body (default 500 bytes) with wrk.
-- Copied from the CDC-to-webhooks bench kit (bench-kit/wrk-post.lua) so bench/run is self-contained.
-- Body size from env WH_HTTP_BODY_BYTES (default 500). Prints one machine-readable
-- "WH_RESULT ..." line at the end (requests, rps, errors, latency percentiles in us).
local size = tonumber(os.getenv("WH_HTTP_BODY_BYTES") or "500")
local head = '{"id":"evt_01HZX3KQ9T0000000000000001","type":"user.updated",' ..
             '"created_at":"2024-05-01T12:00:00.000Z","source":"postgres:public.users",' ..
             '"data":{"op":"U","lsn":"0/1A2B3C4D","row":{"id":123456,"org_id":42,' ..
             '"email":"user123456@example.org","status":"active","email_verified":true}},"pad":"'
local tail = '"}'
local pad = size - #head - #tail
if pad < 0 then pad = 0 end
wrk.method = "POST"
wrk.body = head .. string.rep("x", pad) .. tail
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Webhook-Event"] = "user.updated"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WH_RESULT body_bytes=%d requests=%d duration_s=%.3f rps=%.1f connect_err=%d read_err=%d write_err=%d status_err=%d timeout=%d lat_p50_us=%d lat_p99_us=%d lat_max_us=%d\n",
    #wrk.body, summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
