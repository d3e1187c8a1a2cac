"""MQTT transport: our uploader against mosquitto_pub/sub, and request/reply latency.

Through one managed Mosquitto on loopback, in one run:
- throughput of N x 1 MB QoS 1 messages: mosquitto_pub -l -> mosquitto_sub (native),
  our MqttLink publish -> MqttLink subscriber, and our ReliableSender (application acks,
  window 8) as the devices use it;
- round trip of a 64 KB request and its 64 KB reply at QoS 1, with TCP_NODELAY on the
  broker's and our sockets, and with it off on both.
Usage: python bench/bench_transport.py [--messages 200] [--trips 200] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from edge_runtime.transport import LinkConfig, MqttLink, ReliableSender
from server_hub.broker import BrokerConfig, ManagedBroker, free_port

MB = 1024 * 1024
LIMIT = 4 * MB


def native(url_host: str, port: int, n: int, size: int) -> float:
    line = b"a" * (size - 1) + b"\n"
    sub = subprocess.Popen(["mosquitto_sub", "-h", url_host, "-p", str(port), "-t", "b/native",
                            "-q", "1", "-C", str(n)], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    t0 = time.perf_counter()
    pub = subprocess.Popen(["mosquitto_pub", "-h", url_host, "-p", str(port), "-t", "b/native",
                            "-q", "1", "-l"], stdin=subprocess.PIPE)
    pub.stdin.write(line * n)
    pub.stdin.close()
    sub.wait(timeout=300)
    dt = time.perf_counter() - t0
    pub.wait(timeout=30)
    return dt


def ours(url: str, n: int, size: int, reliable: bool) -> float:
    a = MqttLink(LinkConfig(url, f"bench-pub-{reliable}", max_packet_size=LIMIT))
    b = MqttLink(LinkConfig(url, f"bench-sub-{reliable}", max_packet_size=LIMIT))
    a.connect()
    b.connect()
    done = threading.Event()
    count = [0]
    sender = ReliableSender(a, "b/ours", window=8, ack_timeout=5.0) if reliable else None

    def on(topic, payload):
        count[0] += 1
        if sender is not None:
            sender.ack(payload[:16].decode().strip())
        if count[0] == n:
            done.set()

    b.subscribe("b/ours", on)
    time.sleep(0.5)
    body = b"a" * (size - 16)
    t0 = time.perf_counter()
    if sender is not None:
        sender.send((str(i), f"{i:<16}".encode() + body) for i in range(n))
    else:
        for i in range(n):
            a.publish("b/ours", f"{i:<16}".encode() + body, wait=False)
    done.wait(300)
    dt = time.perf_counter() - t0
    a.close()
    b.close()
    return dt


def round_trips(url: str, trips: int, size: int, nodelay: bool) -> list[float]:
    req = MqttLink(LinkConfig(url, f"rtt-req-{nodelay}"), nodelay=nodelay)
    rep = MqttLink(LinkConfig(url, f"rtt-rep-{nodelay}"), nodelay=nodelay)
    req.connect()
    rep.connect()
    got = threading.Event()
    rep.subscribe("b/req", lambda t, p: rep.publish("b/rep", p, wait=False))
    req.subscribe("b/rep", lambda t, p: got.set())
    time.sleep(0.5)
    payload = b"r" * size
    times = []
    for _ in range(trips):
        got.clear()
        t0 = time.perf_counter()
        req.publish("b/req", payload, wait=False)
        got.wait(10)
        times.append(time.perf_counter() - t0)
    req.close()
    rep.close()
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--messages", type=int, default=200)
    p.add_argument("--size", type=int, default=MB)
    p.add_argument("--trips", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default="bench/results/transport.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = BrokerConfig(tmp, port=free_port(), max_packet_size=LIMIT,
                           max_queued_bytes=512 * MB)
        with ManagedBroker(cfg) as broker:
            runs = {"mosquitto_pub/sub": [], "MqttLink": [], "ReliableSender": []}
            for _ in range(args.repeats):  # interleaved, so load drift hits all alike
                runs["mosquitto_pub/sub"].append(native(cfg.host, cfg.port, args.messages,
                                                        args.size))
                runs["MqttLink"].append(ours(broker.url, args.messages, args.size, False))
                runs["ReliableSender"].append(ours(broker.url, args.messages, args.size, True))
            rtt = {True: round_trips(broker.url, args.trips, 64 * 1024, True)}
        slow = BrokerConfig(tmp + "/slow", port=free_port(), tcp_nodelay=False)
        with ManagedBroker(slow) as broker:  # Nagle on both the broker's and our sockets
            rtt[False] = round_trips(broker.url, args.trips, 64 * 1024, False)
    total_mb = args.messages * args.size / MB
    thr = {k: total_mb / statistics.median(v) for k, v in runs.items()}
    native_mbs = thr["mosquitto_pub/sub"]
    print(f"throughput, {args.messages} x {args.size / MB:.0f} MB at QoS 1 (median of "
          f"{args.repeats}):")
    for k, v in thr.items():
        print(f"  {k:18} {v:8.1f} MB/s  {v / native_mbs:6.0%} of native")
    out_rtt = {}
    print(f"64 KB request + 64 KB reply at QoS 1, {args.trips} trips:")
    for nd, times in rtt.items():
        q = statistics.quantiles(times, n=10)
        out_rtt["nodelay" if nd else "no_nodelay"] = {
            "p50_ms": statistics.median(times) * 1e3, "p90_ms": q[8] * 1e3}
        print(f"  TCP_NODELAY {'on ' if nd else 'off'}  p50 {statistics.median(times) * 1e3:6.2f} "
              f"ms  p90 {q[8] * 1e3:6.2f} ms")
    out = {"machine": platform.machine(), "messages": args.messages, "size": args.size,
           "throughput_mb_s": thr, "ratio_vs_native": {k: v / native_mbs for k, v in thr.items()},
           "seconds": runs, "round_trip_64kb": out_rtt}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
