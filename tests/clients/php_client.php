<?php
// phpredis (Debian's php-redis, 5.x) through the client-matrix scenario of tests/test_clients.py.
//
// phpredis 5's subscribe() blocks in a loop that understands only message and pmessage, hands
// no control back after the confirmations, and it has no SSUBSCRIBE. So the subscriber uses
// rawCommand, which sends one command and reads one reply with phpredis' parser: each
// (P|S)SUBSCRIBE reads its own confirmation, and afterwards rawCommand('PING') reads the next
// frame of the stream, a message that was waiting or else the pong (an array in subscribed
// RESP2 mode), so it never blocks for long. phpredis does not resubscribe after a lost
// connection: this program reconnects and resubscribes itself.

const N = 20;

function say(string $line): void
{
    echo $line, "\n";
    fflush(STDOUT);
}

function fail(string $why): never
{
    say("FAIL $why");
    exit(1);
}

if ($argc < 4 || $argc > 5 || ($argc === 5 && $argv[4] !== 'resp2')) {
    fail('usage: <sub host:port> <pub host:port> <tag> [resp2] (phpredis 5 speaks RESP2 only)');
}
[, $subAddr, $pubAddr, $tag] = $argv;
$ch = "t.$tag.ch";
$pat = "t.$tag.p*";
$px = "t.$tag.px";
$sh = "{t$tag}sh";
// kind => [channel, pattern, payload prefix of phase 1]
$want = ['message' => [$ch, null, 'c'], 'pmessage' => [$px, $pat, 'p'], 'smessage' => [$sh, null, 's']];
$got = ['message' => [], 'pmessage' => [], 'smessage' => []];
$phase = 1;

function connect(string $addr): Redis
{
    $i = strrpos($addr, ':');
    $r = new Redis();
    $r->connect(substr($addr, 0, $i), (int) substr($addr, $i + 1));
    return $r;
}

// phpredis throws on some lost connections and returns false (with a notice) on others.
function raw(Redis $r, string ...$args): mixed
{
    $reply = $r->rawCommand(...$args);
    if ($reply === false) {
        throw new RedisException("{$args[0]}: connection lost");
    }
    return $reply;
}

function subscribeAll(Redis $sub, array $commands): void
{
    foreach ($commands as [$command, $name]) {
        $reply = raw($sub, $command, $name);
        if (!is_array($reply) || $reply[0] !== strtolower($command) || $reply[1] !== $name) {
            fail("$command $name answered " . json_encode($reply));
        }
    }
}

// Reads one frame and checks it if it is a message; false when it was a pong.
function readFrame(Redis $sub): bool
{
    global $want, $got, $phase;
    $f = raw($sub, 'PING');
    if (is_array($f) && $f[0] === 'pong') {
        return false;
    }
    if (!is_array($f) || !isset($want[$f[0]])) {
        fail('unexpected ' . json_encode($f));
    }
    $kind = $f[0];
    [$channel, $pattern, $data] = $kind === 'pmessage' ? [$f[2], $f[1], $f[3]] : [$f[1], null, $f[2]];
    [$wch, $wpat, $prefix] = $want[$kind];
    if ($channel !== $wch || $pattern !== $wpat) {
        fail("$kind on $channel pattern $pattern, expected $wch $wpat");
    }
    $expected = $phase === 1 ? $prefix . (count($got[$kind]) + 1) : null;
    if ($expected !== null ? $data !== $expected : !str_starts_with($data, 'after')) {
        fail("$kind $data after " . json_encode(array_slice($got[$kind], -3)) . ', expected ' . ($expected ?? 'after<k>'));
    }
    $got[$kind][] = $data;
    return true;
}

function publishes(int $i): array
{
    global $ch, $px, $sh, $phase;
    $p = fn ($prefix) => $phase === 1 ? "$prefix$i" : "after$i";
    return [['PUBLISH', $ch, $p('c')], ['PUBLISH', $px, $p('p')], ['SPUBLISH', $sh, $p('s')]];
}

$subscriptions = [['SUBSCRIBE', $ch], ['PSUBSCRIBE', $pat], ['SSUBSCRIBE', $sh]];
$sub = connect($subAddr);
$pub = connect($pubAddr);
if ($sub->ping() !== true || $pub->ping() !== true) {
    fail('PING');
}
subscribeAll($sub, $subscriptions);

for ($i = 1; $i <= N; $i++) {
    foreach (publishes($i) as [$command, $channel, $payload]) {
        $n = raw($pub, $command, $channel, $payload);
        if (!is_int($n) || $n < 1) {
            fail("$command $channel $payload answered " . json_encode($n));
        }
    }
}
$deadline = microtime(true) + 10;
while (min(array_map('count', $got)) < N) {
    if (microtime(true) > $deadline) {
        fail('phase 1 timed out, got ' . json_encode(array_map('count', $got)));
    }
    if (!readFrame($sub)) {
        usleep(10000); // nothing waiting: do not spin on PINGs
    }
}

say('PHASE1 OK');
say('KILL');
if (trim((string) fgets(STDIN)) !== 'go') {
    fail('expected `go` on stdin');
}
$phase = 2;
$got = ['message' => [], 'pmessage' => [], 'smessage' => []];
$deadline = microtime(true) + 30;
$k = 0;
$nextRound = 0.0;
$reconnected = false;
while (min(array_map('count', $got)) < 1) {
    $now = microtime(true);
    if ($now > $deadline) {
        fail('phase 2 timed out, got ' . json_encode(array_map('count', $got)));
    }
    if ($now >= $nextRound) {
        $k++;
        $nextRound = $now + 0.1;
        try {
            foreach (publishes($k) as [$command, $channel, $payload]) {
                raw($pub, $command, $channel, $payload);
            }
        } catch (RedisException $e) {
            try {
                $pub = connect($pubAddr); // the next round retries
            } catch (RedisException $e) {
            }
        }
    }
    try {
        if (!readFrame($sub)) {
            usleep(10000);
        }
    } catch (RedisException $e) {
        try {
            $sub = connect($subAddr);
            subscribeAll($sub, $subscriptions);
            $reconnected = true;
        } catch (RedisException $e) {
            usleep(100000); // still restarting
        }
    }
}
if (!$reconnected) {
    fail('the subscriber never lost its connection');
}
say('RECONNECT app');
say('PHASE2 OK');
