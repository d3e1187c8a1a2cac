"""Light simulated devices for load runs: synthetic features, real protocol, real broker.

A ``LightSender`` trains nothing: it encodes its upload (post-ReLU-like random features,
logits, labels, a real extractor state) before the round opens, then speaks the same
protocol as ``gkt-edge`` (retained hello, acknowledged chunks through ``ReliableSender``,
extractor, upload_done) and counts the logits that come back per sample id, so a run
can check that every sample went up and came back exactly once.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from edge_runtime.learning.models import FeatureExtractor
from edge_runtime.mqtt.link import LinkConfig, MqttLink
from edge_runtime.mqtt.reliable import ReliableSender
from edge_runtime.protocol import topics, wire
from edge_runtime.protocol.messages import (
    FeatureBatch,
    extractor_message,
    feature_chunk,
    parse_logits,
)


@dataclass(frozen=True)
class LoadConfig:
    devices: int = 32
    samples: int = 64  # per device
    size: int = 32  # feature map side: 32 for CIFAR-size images, 8 for digits
    num_classes: int = 10
    codec: str = "q8"
    max_payload: int = 256 * 1024
    window: int = 8
    seed: int = 0


@dataclass
class SenderResult:
    device: str
    sent_ids: list[int]
    logits_per_id: Counter = field(default_factory=Counter)
    bytes_up: int = 0
    upload_s: float = 0.0
    error: str | None = None


class LightSender:
    def __init__(self, url: str, device: str, cfg: LoadConfig, index: int) -> None:
        self.device, self.cfg = device, cfg
        rng = np.random.default_rng(cfg.seed + index)
        n = cfg.samples
        self.ids = torch.arange(n, dtype=torch.int64) + index * 100_000
        feats = np.maximum(rng.standard_normal((n, 16, cfg.size, cfg.size), np.float32), 0)
        batch = FeatureBatch(self.ids, torch.from_numpy(feats),
                             torch.from_numpy(rng.standard_normal((n, cfg.num_classes),
                                                                  np.float32)),
                             torch.from_numpy(rng.integers(0, cfg.num_classes, n)))
        self.messages = self._encode(batch)
        self.result = SenderResult(device, self.ids.tolist())
        self.link = MqttLink(LinkConfig(url, f"load-{device}-{uuid.uuid4().hex[:6]}",
                                        max_packet_size=cfg.max_payload + 1024,
                                        session_expiry=0))
        self._sender: ReliableSender | None = None
        self._open = threading.Event()
        self._all_logits = threading.Event()

    def _encode(self, b: FeatureBatch) -> list[tuple[str, bytes]]:
        raw = 16 * self.cfg.size ** 2 * 4 + self.cfg.num_classes * 4 + 16  # fp32 worst case
        per = wire.chunk_sizes(len(b.ids), raw, self.cfg.max_payload)[0]
        up = f"r0-{uuid.uuid4().hex[:8]}"
        starts = range(0, len(b.ids), per)
        out = []
        for i, s in enumerate(starts):
            part = FeatureBatch(*(getattr(b, f)[s:s + per]
                                  for f in ("ids", "features", "logits", "labels")))
            out.append((f"{up}:{i}", feature_chunk(self.device, 0, f"{up}:{i}", i, len(starts),
                                                   part, self.cfg.codec)))
        state = FeatureExtractor().state_dict()
        out.append((f"{up}:extractor", extractor_message(self.device, 0, f"{up}:extractor",
                                                          state)))
        meta = {"num_samples": len(b.ids), "num_chunks": len(starts), "upload_id": up,
                "edge_accuracy": None}
        out.append((f"{up}:done", wire.encode_message("upload_done", self.device, 0, {},
                                                      msg_id=f"{up}:done", meta=meta)))
        return out

    # -- network thread ------------------------------------------------------------------
    def _on_round(self, topic: str, payload: bytes) -> None:
        if payload:
            msg = wire.decode_message(payload, max_bytes=self.cfg.max_payload * 4)
            state = msg.meta.get("state")  # an async hub announces "async", no rounds
            if msg.kind == "round" and (state == "async" or state == "collect" and msg.round == 0):
                self._open.set()

    def _on_down(self, topic: str, payload: bytes) -> None:
        msg = wire.decode_message(payload, max_bytes=self.cfg.max_payload * 4)
        if msg.kind == "ack" and self._sender is not None:
            for mid in msg.meta.get("msg_ids", []):
                self._sender.ack(str(mid))
        elif msg.kind == "logits":
            self.result.logits_per_id.update(parse_logits(msg).ids.tolist())
            if set(self.result.logits_per_id) >= set(self.result.sent_ids):
                self._all_logits.set()

    # -- caller's thread -----------------------------------------------------------------
    def join(self) -> None:
        """Connect, subscribe and say hello (retained, as gkt-edge does)."""
        self._sender = ReliableSender(self.link, topics.up(self.device),
                                      window=self.cfg.window, ack_timeout=5.0, deadline=600)
        self.link.subscribe(topics.down(self.device), self._on_down)
        self.link.subscribe(topics.ROUND_TOPIC, self._on_round)
        self.link.connect()
        meta = {"num_samples": self.cfg.samples, "num_classes": self.cfg.num_classes,
                "codec": self.cfg.codec, "completed_round": -1}
        hello = wire.encode_message("hello", self.device, 0, {},
                                    msg_id=f"hello-{uuid.uuid4().hex[:8]}", meta=meta)
        self.link.publish(topics.up(self.device), hello, retain=True)

    def run(self, timeout: float = 600.0, wait_logits: bool = True) -> SenderResult:
        """Wait for round 0 (or async mode) to open, upload everything, wait for every
        sample's logits."""
        try:
            if not self._open.wait(timeout):
                raise TimeoutError("round 0 never opened")
            t0 = time.perf_counter()
            assert self._sender is not None
            self._sender.send(self.messages)
            self.result.upload_s = time.perf_counter() - t0
            self.result.bytes_up = sum(len(m) for _, m in self.messages)
            if wait_logits and not self._all_logits.wait(timeout):
                raise TimeoutError("logits did not come back for every sample")
        except (TimeoutError, ConnectionError) as err:
            self.result.error = f"{type(err).__name__}: {err}"
        return self.result

    def close(self) -> None:
        if self.link.connected:
            self.link.publish(topics.up(self.device), b"", retain=True)  # clear the hello
        self.link.close()


def run_senders(url: str, cfg: LoadConfig, timeout: float = 600.0,
                wait_logits: bool = True) -> list[SenderResult]:
    """Every sender joined, then all uploading at once (one thread each)."""
    senders = [LightSender(url, f"load{i:03d}", cfg, i) for i in range(cfg.devices)]
    results: list[SenderResult] = [None] * len(senders)  # type: ignore[list-item]
    try:
        for s in senders:
            s.join()

        def go(i: int) -> None:
            results[i] = senders[i].run(timeout, wait_logits)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(senders))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for s in senders:
            s.close()
    return results
