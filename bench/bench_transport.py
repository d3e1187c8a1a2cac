"""MQTT transport: our links against mosquitto_pub/sub, and request/reply latency.

Through one managed Mosquitto on loopback, in one run:
- throughput of N x 1 MB QoS 1 messages from one process to a subscriber in another:
  mosquitto_pub -l -> mosquitto_sub -C N (native, C), MqttLink -> MqttLink, and
  ReliableSender (window 8, application acks over MQTT, as devices upload) -> MqttLink;
- round trip of a 64 KB request and its 64 KB reply (and 1 KB) at QoS 1 between two
  MqttLinks (a responder echoes), with TCP_NODELAY on the broker's and our sockets, and
  off on all of them (a second broker, since it is a broker setting too).
Throughput variants are interleaved and repeated; the table reports medians.
Usage: python bench/bench_transport.py [--messages 200] [--repeats 5] [--trips 200]
       [--rtt-sizes 65536 1024] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import version
from pathlib import Path

from results_file import write_results  # noqa: E402

from edge_runtime.mqtt.link import LinkConfig, MqttLink
from edge_runtime.mqtt.reliable import ReliableSender
from server_hub.broker.mosquitto import BrokerConfig, ManagedBroker, free_port

MB = 1024 * 1024
LIMIT = 2 * MB  # packet limit for the throughput runs (1 MB messages)


def reap(proc: subprocess.Popen) -> float:
    """Wait for a child; its CPU seconds (user + system)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


def native(host: str, port: int, n: int, size: int) -> tuple[float, float]:
    """Seconds for mosquitto_pub -l to move n lines of `size` bytes to mosquitto_sub, and
    the CPU seconds both used."""
    common = ["-h", host, "-p", str(port), "-t", "b/native", "-q", "1", "-V", "mqttv5"]
    sub = subprocess.Popen(["mosquitto_sub", *common, "-C", str(n)], stdout=subprocess.DEVNULL)
    time.sleep(0.5)  # subscribed
    line = b"a" * (size - 1) + b"\n"  # the newline is not part of the message
    t0 = time.perf_counter()
    pub = subprocess.Popen(["mosquitto_pub", *common, "-l"], stdin=subprocess.PIPE)
    assert pub.stdin is not None
    for _ in range(n):
        pub.stdin.write(line)
    pub.stdin.close()
    cpu = reap(sub)
    dt = time.perf_counter() - t0
    return dt, cpu + reap(pub)


def receiver(url: str, n: int, tag: str, ack: bool) -> None:
    """Child process: our subscriber. Prints 'ready', then 'done' once n distinct messages
    arrived; with ``ack`` it acknowledges each over MQTT, as the hub does."""
    sub = MqttLink(LinkConfig(url, f"bench-sub-{tag}", max_packet_size=LIMIT,
                              session_expiry=0))
    seen: set[bytes] = set()
    done = threading.Event()

    def on(topic: str, payload: bytes) -> None:
        msg_id = payload[:16]
        seen.add(msg_id)
        if ack:
            sub.publish(f"b/{tag}/ack", msg_id, wait=False)
        if len(seen) == n:
            done.set()

    sub.subscribe(f"b/{tag}/data", on)
    sub.connect()
    print("ready", flush=True)
    if not done.wait(600):
        raise SystemExit(f"only {len(seen)} of {n} messages arrived")
    print("done", flush=True)
    sys.stdin.read()  # until the parent is finished with us
    sub.close()


def ours(url: str, n: int, size: int, reliable: bool, tag: str) -> tuple[float, float]:
    """Seconds for n messages of `size` bytes from our MqttLink (directly, or through a
    ReliableSender with window 8) to our subscriber in another process, and the CPU
    seconds both used."""
    child = subprocess.Popen([sys.executable, __file__, "--receiver", url, "--messages", str(n),
                              "--tag", tag, *(["--ack"] if reliable else [])],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdin is not None
    if child.stdout.readline().strip() != "ready":
        raise RuntimeError("the receiver did not start")
    pub = MqttLink(LinkConfig(url, f"bench-pub-{tag}", max_packet_size=LIMIT,
                              session_expiry=0))
    sender = (ReliableSender(pub, f"b/{tag}/data", window=8, ack_timeout=10.0)
              if reliable else None)
    if sender is not None:
        pub.subscribe(f"b/{tag}/ack", lambda t, p: sender.ack(p.decode()))
    pub.connect()
    body = b"a" * (size - 16)
    messages = ((f"{i:<16}", f"{i:<16}".encode() + body) for i in range(n))
    t0, cpu0 = time.perf_counter(), time.process_time()
    if sender is not None:
        sender.send(messages)
    else:
        for _, payload in messages:
            pub.publish(f"b/{tag}/data", payload, wait=False)
    if child.stdout.readline().strip() != "done":
        raise RuntimeError("the receiver failed")
    dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    child.stdin.close()
    cpu += reap(child)  # from its start: connecting is a negligible share
    pub.close()
    return dt, cpu


def round_trips(url: str, trips: int, size: int, nodelay: bool) -> list[float]:
    """Seconds per request/reply of `size` bytes each way, QoS 1 both ways."""
    tag = f"{size}-{nodelay}-{time.monotonic_ns()}"
    cfg = {"tcp_nodelay": nodelay, "session_expiry": 0}
    req = MqttLink(LinkConfig(url, f"rtt-req-{tag}", **cfg))
    rep = MqttLink(LinkConfig(url, f"rtt-rep-{tag}", **cfg))
    replies: dict[int, threading.Event] = {}
    rep.subscribe(f"b/{tag}/req", lambda t, p: rep.publish(f"b/{tag}/rep", p, wait=False))
    req.subscribe(f"b/{tag}/rep", lambda t, p: replies[int.from_bytes(p[:8], "big")].set())
    rep.connect()
    req.connect()
    body = b"r" * (size - 8)
    times = []
    for i in range(trips + 20):  # the first 20 warm up
        replies[i] = got = threading.Event()
        t0 = time.perf_counter()
        req.publish(f"b/{tag}/req", i.to_bytes(8, "big") + body, wait=False)
        if not got.wait(10):
            raise RuntimeError("no reply within 10 s")
        if i >= 20:
            times.append(time.perf_counter() - t0)
    req.close()
    rep.close()
    return times


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--messages", type=int, default=200)
    p.add_argument("--size", type=int, default=MB)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--trips", type=int, default=200)
    p.add_argument("--rtt-sizes", type=int, nargs="+", default=[64 * 1024, 1024])
    p.add_argument("--json", default="bench/results/transport.json")
    p.add_argument("--receiver", metavar="URL", help=argparse.SUPPRESS)  # child process role
    p.add_argument("--tag", help=argparse.SUPPRESS)
    p.add_argument("--ack", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.receiver:
        receiver(args.receiver, args.messages, args.tag, args.ack)
        return
    runs: dict[str, list[tuple[float, float]]] = {"mosquitto_pub/sub": [], "MqttLink": [],
                                                  "ReliableSender": []}
    rtt: dict[tuple[int, bool], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp).chmod(0o755)  # as root, mosquitto's own user saves its persistence here
        fast = BrokerConfig(f"{tmp}/fast", port=free_port(), max_packet_size=LIMIT,
                            max_queued_bytes=512 * MB)
        slow = BrokerConfig(f"{tmp}/slow", port=free_port(), tcp_nodelay=False)
        with ManagedBroker(fast) as broker, ManagedBroker(slow) as nagle:
            for r in range(args.repeats):  # interleaved, so load drift hits all alike
                runs["mosquitto_pub/sub"].append(native(fast.host, fast.port, args.messages,
                                                        args.size))
                runs["MqttLink"].append(ours(broker.url, args.messages, args.size, False,
                                             f"plain{r}"))
                runs["ReliableSender"].append(ours(broker.url, args.messages, args.size, True,
                                                   f"reliable{r}"))
            for size in args.rtt_sizes:
                rtt[size, True] = round_trips(broker.url, args.trips, size, True)
                rtt[size, False] = round_trips(nagle.url, args.trips, size, False)
    total_mb = args.messages * args.size / MB
    thr = {k: total_mb / statistics.median(t for t, _ in v) for k, v in runs.items()}
    cpu = {k: statistics.median(c for _, c in v) / total_mb * 1e3 for k, v in runs.items()}
    base = thr["mosquitto_pub/sub"]
    print(f"throughput: {args.messages} x {args.size / MB:g} MB at QoS 1 through Mosquitto on "
          f"loopback, median of {args.repeats}; CPU = sender + receiver processes")
    print(f"  {'sender -> receiver':20} {'MB/s':>7} {'vs native':>10} {'CPU ms/MB':>10}")
    for k, v in thr.items():
        print(f"  {k:20} {v:7.1f} {v / base:10.0%} {cpu[k]:10.2f}")
    lat = [{"bytes": size, "tcp_nodelay": nd, "p50_ms": pct(v, 50) * 1e3,
            "p90_ms": pct(v, 90) * 1e3, "p99_ms": pct(v, 99) * 1e3, "trips": len(v)}
           for (size, nd), v in rtt.items()]
    print(f"round trip: request + reply of the same size at QoS 1 through Mosquitto, "
          f"{args.trips} trips; TCP_NODELAY on or off on the broker's and both clients' sockets")
    print(f"  {'size':>8} {'TCP_NODELAY':>12} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
    for row in lat:
        print(f"  {row['bytes']:8} {'on' if row['tcp_nodelay'] else 'off':>12} "
              f"{row['p50_ms']:8.2f} {row['p90_ms']:8.2f} {row['p99_ms']:8.2f}")
    out = {"machine": platform.machine(), "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
           "python": platform.python_version(), "paho_mqtt": version("paho-mqtt"),
           "messages": args.messages, "size": args.size, "throughput_mb_s": thr,
           "ratio_vs_native": {k: v / base for k, v in thr.items()},
           "client_cpu_ms_per_mb": cpu, "seconds_and_cpu_seconds": runs, "round_trip": lat}
    write_results(args.json, out)


if __name__ == "__main__":
    main()
