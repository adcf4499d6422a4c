-- Vendored verbatim from the shared mcpbench harness: shared/bench/mcp_call.lua
-- (2026-11-24, sha256 4836e0e9bec1893e...). Only this header was added. Used by bench/run.py via loadgen.run_wrk.
-- wrk script: POST MCP JSON-RPC "tools/call" requests with unique ids.
--
-- Environment (all optional):
--   MCP_SESSION_ID     value for the Mcp-Session-Id header (from initialize)
--   MCP_TOOL           tool name (default "echo")
--   MCP_ARG_BYTES      approx. size of the arguments object in bytes (default 1024)
--   MCP_MARKER         string that must appear in a good response body (default mcpbench-marker)
--   MCP_PROTOCOL_VERSION  MCP-Protocol-Version header (default 2025-06-18)
--   MCP_EXTRA_HEADERS  extra headers, "Name: value" lines separated by \n
-- done() prints one line "WRKJSON {...}" with counts and latency in microseconds
-- (wrk's latency histogram, which wrk corrects for coordinated omission).

local session  = os.getenv("MCP_SESSION_ID") or ""
local tool     = os.getenv("MCP_TOOL") or "echo"
local nbytes   = tonumber(os.getenv("MCP_ARG_BYTES") or "1024")
local marker   = os.getenv("MCP_MARKER") or "mcpbench-marker"
local proto    = os.getenv("MCP_PROTOCOL_VERSION") or "2025-06-18"
local extra    = os.getenv("MCP_EXTRA_HEADERS") or ""

local threads = {}
local nthreads = 0

function setup(thread)
   nthreads = nthreads + 1
   thread:set("tid", nthreads)
   table.insert(threads, thread)
end

local path, headers, prefix, suffix

function init(args)
   ok_count, bad_status, bad_body, n, first_bad = 0, 0, 0, 0, ""
   path = wrk.path
   headers = {}
   headers["Content-Type"] = "application/json"
   headers["Accept"] = "application/json, text/event-stream"
   headers["MCP-Protocol-Version"] = proto
   if session ~= "" then headers["Mcp-Session-Id"] = session end
   for line in string.gmatch(extra, "[^\n]+") do
      local k, v = line:match("^%s*([^:]+):%s*(.-)%s*$")
      if k then headers[k] = v end
   end
   -- {"text":"<marker>-xxxx..."} ~ nbytes
   local pad = string.rep("x", math.max(0, nbytes - #marker - 12))
   prefix = '{"jsonrpc":"2.0","id":'
   suffix = ',"method":"tools/call","params":{"name":"' .. tool ..
            '","arguments":{"text":"' .. marker .. '-' .. pad .. '"}}}'
end

function request()
   n = n + 1
   return wrk.format("POST", path, headers, prefix .. (tid * 1000000000 + n) .. suffix)
end

function response(status, hdrs, body)
   if status == 200 and body and string.find(body, marker, 1, true) then
      ok_count = ok_count + 1
   elseif status ~= 200 then
      bad_status = bad_status + 1
      if first_bad == "" then first_bad = "HTTP " .. status .. " " .. string.sub(body or "", 1, 160) end
   else
      bad_body = bad_body + 1
      if first_bad == "" then first_bad = "body " .. string.sub(body or "", 1, 160) end
   end
end

local function jesc(s)
   s = tostring(s or "")
   s = s:gsub('\\', '\\\\'):gsub('"', '\\"'):gsub('[%c]', ' ')
   return s
end

function done(summary, latency, requests)
   local ok, bs, bb, fb = 0, 0, 0, ""
   for _, t in ipairs(threads) do
      ok = ok + (t:get("ok_count") or 0)
      bs = bs + (t:get("bad_status") or 0)
      bb = bb + (t:get("bad_body") or 0)
      local f = t:get("first_bad")
      if fb == "" and f and f ~= "" then fb = f end
   end
   local e = summary.errors
   io.write(string.format(
      'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"ok":%d,"bad_status":%d,"bad_body":%d,' ..
      '"err_connect":%d,"err_read":%d,"err_write":%d,"err_timeout":%d,"err_status":%d,' ..
      '"lat_min_us":%d,"lat_mean_us":%.1f,"lat_p50_us":%d,"lat_p90_us":%d,"lat_p99_us":%d,' ..
      '"lat_p999_us":%d,"lat_max_us":%d,"first_bad":"%s"}\n',
      summary.requests, summary.duration, summary.bytes, ok, bs, bb,
      e.connect, e.read, e.write, e.timeout, e.status,
      latency.min, latency.mean, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency:percentile(99.9), latency.max, jesc(fb)))
end
