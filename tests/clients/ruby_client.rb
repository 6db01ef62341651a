#!/usr/bin/env ruby
# frozen_string_literal: true

# Ruby's redis gem (Debian's ruby-redis, 4.x) through the client-matrix scenario of
# tests/test_clients.py.
#
# redis-rb 4.x blocks a thread in its subscribe loop and has no SSUBSCRIBE: the shard
# subscription goes through the subscribed client's generic call, and its confirmation and
# smessage pushes reach callbacks registered by name. After a lost connection the loop raises
# and nothing is resubscribed, so this program reconnects and resubscribes itself.
require "redis"

N = 20
$stdout.sync = true

def say(line) = puts(line)

def fail!(why)
  say "FAIL #{why}"
  exit! 1
end

unless (3..4).cover?(ARGV.size) && [nil, "resp2"].include?(ARGV[3])
  fail! "usage: <sub host:port> <pub host:port> <tag> [resp2] (redis-rb 4 speaks RESP2 only)"
end
sub_addr, pub_addr, tag = ARGV
connect = lambda do |addr|
  host, port = addr.split(/:(?=\d+\z)/)
  Redis.new(host: host, port: Integer(port))
end
CH = "t.#{tag}.ch"
PAT = "t.#{tag}.p*"
PX = "t.#{tag}.px"
SH = "{t#{tag}}sh"
WANT = { "message" => [CH, nil, "c"], "pmessage" => [PX, PAT, "p"], "smessage" => [SH, nil, "s"] }.freeze

# Everything the subscriber thread shares with the main thread, under one lock.
State = Struct.new(:lock, :phase, :got, :confirmed, :killed)
st = State.new(Mutex.new, 1, Hash.new { |h, k| h[k] = [] }, 0, false)

received = lambda do |kind, channel, pattern, data|
  st.lock.synchronize do
    ch, pat, prefix = WANT.fetch(kind)
    fail! "#{kind} on #{channel} pattern #{pattern}, expected #{ch} #{pat}" unless [channel, pattern] == [ch, pat]
    got = st.got[kind]
    expected = st.phase == 1 ? "#{prefix}#{got.size + 1}" : nil
    ok = expected ? data == expected : data.start_with?("after")
    fail! "#{kind} #{data} after #{got.last(3)}, expected #{expected || 'after<k>'}" unless ok
    got << data
  end
end

def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)

def wait_until(seconds, what)
  deadline = now + seconds
  until yield
    fail! "#{what} timed out" if now > deadline
    sleep 0.01
  end
end

sub = connect.(sub_addr)
pub = connect.(pub_addr)
fail! "PING" unless sub.ping == "PONG" && pub.ping == "PONG"

subscriber = Thread.new do
  loop do
    sub.subscribe(CH) do |on|
      confirmed = lambda do |*|
        st.lock.synchronize { st.confirmed += 1 }
      end
      # The others are sent from inside the loop, which blocks this thread, one per
      # confirmation: redis-rb drops the connection when a command is written while the
      # reply of another is pending.
      on.subscribe do
        confirmed.()
        sub.psubscribe(PAT)
      end
      on.psubscribe do
        confirmed.()
        sub._client.call([:ssubscribe, SH])
      end
      on.callbacks["ssubscribe"] = confirmed
      on.message { |ch, msg| received.("message", ch, nil, msg) }
      on.pmessage { |pat, ch, msg| received.("pmessage", ch, pat, msg) }
      on.callbacks["smessage"] = ->(ch, msg) { received.("smessage", ch, nil, msg) }
    end
  rescue Redis::BaseConnectionError => e
    fail! "subscriber: #{e.message}" unless st.lock.synchronize { st.killed }
    sleep 0.1 # the server restarts; the next subscribe reconnects
  end
end

wait_until(10, "confirmations") { st.lock.synchronize { st.confirmed == 3 } }
publishes = lambda do |i|
  p = ->(prefix) { st.phase == 1 ? "#{prefix}#{i}" : "after#{i}" }
  [[:publish, CH, p.("c")], [:publish, PX, p.("p")], [:spublish, SH, p.("s")]]
end
(1..N).each do |i|
  publishes.(i).each do |command, channel, payload|
    n = pub.call(command, channel, payload)
    fail! "#{command} #{channel} #{payload} answered #{n}" unless n >= 1
  end
end
wait_until(10, "phase 1") { st.lock.synchronize { WANT.keys.all? { |k| st.got[k].size == N } } }

st.lock.synchronize do
  st.killed = true
  st.confirmed = 0 # counts the resubscriptions from here
end
say "PHASE1 OK"
say "KILL"
fail! "expected `go` on stdin" unless $stdin.gets&.strip == "go"
st.lock.synchronize do
  st.phase = 2
  st.got.clear
end
got_all = -> { st.lock.synchronize { WANT.keys.all? { |key| st.got[key].any? } } }
deadline = now + 30
k = 0
until got_all.()
  fail! "phase 2 timed out" if now > deadline
  k += 1
  begin
    publishes.(k).each { |command, channel, payload| pub.call(command, channel, payload) }
  rescue Redis::BaseConnectionError
    nil # the next round retries
  end
  round_end = now + 0.1
  sleep 0.01 until got_all.() || now > round_end
end
fail! "resubscribed #{st.confirmed} of 3" unless st.confirmed >= 3
say "RECONNECT app"
say "PHASE2 OK"
subscriber.kill
exit! 0
