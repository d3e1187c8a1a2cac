"""`gkt-hub simulate`: run a whole federation on one machine and report it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from edge_runtime.device.throttle import DeviceSpeed
from edge_runtime.protocol.limits import DEFAULT_MAX_PAYLOAD, max_packet_size
from server_hub.assembly.options import HubOptions, ModeOptions, MonitorOptions
from server_hub.monitoring.results import HEADER, RoundRecord, RunResult, format_row
from server_hub.simulation.inproc import RUNNERS, FederationConfig, prepare
from server_hub.simulation.throttled import run_gkt_async_fleet, run_gkt_sync_fleet

log = logging.getLogger(__name__)


def simulate_inproc(cfg: FederationConfig, algorithm: str, show_progress: bool = True,
                    opts: ModeOptions | None = None) -> RunResult:
    """All devices and the hub in this process; bytes are what would cross the network."""
    t0 = time.perf_counter()
    setup = prepare(cfg)
    sizes = ", ".join(str(len(s)) for s in setup.shards)
    print(f"{algorithm} on {cfg.data.dataset} ({cfg.data.size}x{cfg.data.size}), "
          f"{cfg.devices} devices [{sizes} samples], partition {cfg.partition}, "
          f"{cfg.rounds} rounds, seed {cfg.seed}")
    bar = tqdm(total=cfg.rounds, desc=algorithm, unit="round", disable=not show_progress,
               leave=False)
    bar.write(HEADER)

    def on_round(rec: RoundRecord) -> None:
        bar.write(format_row(rec))
        bar.set_postfix(acc=f"{rec.test_accuracy:.3f}")
        bar.update(1)

    opts = opts or ModeOptions()
    if algorithm == "gkt" and opts.mode == "async":
        bar.reset(total=None)
        fleet = opts.fleet or [DeviceSpeed()] * cfg.devices
        result = run_gkt_async_fleet(cfg, setup, fleet, opts.acfg, on_round)
    elif algorithm == "gkt" and opts.fleet:  # devices in parallel threads, as in async
        result = run_gkt_sync_fleet(cfg, setup, opts.fleet, on_round)
    else:
        result = RUNNERS[algorithm](cfg, setup, on_round)
    bar.close()
    final = result.final()
    print(f"final test accuracy {final['test_accuracy']:.4f} after {cfg.rounds} rounds; "
          f"{final['seconds']:.1f} s of rounds, {time.perf_counter() - t0:.1f} s in all")
    return result


def device_command(url: str, name: str, shard: int, cfg: FederationConfig, codec: str,
                   state_dir: Path, max_payload: int, mode: str = "sync",
                   speed: DeviceSpeed | None = None) -> list[str]:
    """The `gkt-edge run` command line of one simulated device."""
    d = cfg.data
    speed = speed or DeviceSpeed()
    return [sys.executable, "-m", "edge_runtime.device.cli", "run", "--hub", url,
            "--device-id", name,
            "--state-dir", str(state_dir), "--codec", codec, "--dataset", d.dataset,
            "--data-root", d.root, "--image-size", str(d.image_size),
            "--partition", cfg.partition, "--shard", str(shard), "--num-shards", str(cfg.devices),
            "--seed", str(cfg.seed), "--model-seed", str(cfg.seed),
            "--edge-epochs", str(cfg.edge.epochs), "--batch-size", str(cfg.edge.batch_size),
            "--edge-lr", str(cfg.edge.lr), "--temperature", str(cfg.edge.temperature),
            "--alpha", str(cfg.edge.alpha), "--max-payload", str(max_payload),
            # Devices share this machine's cores: more threads than cores makes
            # every process spin and a 0.2 s epoch takes 20 s.
            "--threads", str(max(1, (os.cpu_count() or 1) // cfg.devices)),
            "--mode", mode, "--refresh", cfg.refresh, "--logits-codec", cfg.logits_codec,
            "--speed-factor", str(speed.compute),
            "--bandwidth", str(speed.bandwidth)]


def simulate_mqtt(cfg: FederationConfig, codec: str = "q8",
                  show_progress: bool = True, round_deadline: float = 300.0,
                  opts: ModeOptions | None = None,
                  monitor: MonitorOptions | None = None) -> RunResult:
    """Broker, hub and one `gkt-edge` process per device on this machine, over real MQTT."""
    from server_hub.assembly.hub_run import run_hub
    from server_hub.broker.mosquitto import (
        BrokerConfig,
        ManagedBroker,
        free_port,
        read_sys_counters,
    )
    from server_hub.service import ServiceConfig

    opts = opts or ModeOptions()
    fleet = opts.fleet or [DeviceSpeed()] * cfg.devices
    t0 = time.perf_counter()
    # Same layout as the in-process runner: checkpoints/, devices/<id>/, plus broker/, logs/.
    work = Path(cfg.state_dir) if cfg.state_dir else Path(tempfile.mkdtemp(prefix="gkt-sim-"))
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)  # the broker runs as user mosquitto and must reach its folder
    (work / "logs").mkdir(parents=True, exist_ok=True)
    max_payload = DEFAULT_MAX_PAYLOAD
    broker = ManagedBroker(BrokerConfig(str(work / "broker"), port=free_port(),
                                        max_packet_size=max_packet_size(max_payload)),
                           supervise=True)
    broker.start()
    names = [f"dev{i}" for i in range(cfg.devices)]
    print(f"gkt over MQTT ({broker.url}: loopback, no authentication, a local simulation; "
          f"codec {codec}) on {cfg.data.dataset} "
          f"({cfg.data.size}x{cfg.data.size}), {cfg.devices} device processes, partition "
          f"{cfg.partition}, {cfg.rounds} rounds, seed {cfg.seed}; state and logs in {work}")
    procs = []
    for i, name in enumerate(names):
        logf = open(work / "logs" / f"{name}.log", "wb")
        cmd = device_command(broker.url, name, i, cfg, codec, work / "devices" / name,
                             max_payload, opts.mode, fleet[i])
        procs.append((subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT), logf))
    config = {**asdict(cfg), "fleet": [asdict(s) for s in fleet],
              "async": asdict(opts.acfg) if opts.acfg else None}
    result = RunResult("gkt", cfg.data.dataset, cfg.devices, config, transport="mqtt",
                       mode=opts.mode)
    hub_opts = HubOptions(
        ServiceConfig(str(work), rounds=cfg.rounds, min_devices=cfg.devices,
                      round_deadline=round_deadline, start_timeout=120,
                      max_payload=max_payload),
        opts, monitor or MonitorOptions(), progress=show_progress, signals=False,
        spill_features=False)
    sys_counters: dict[str, int] = {}
    try:
        outcome = run_hub(cfg, hub_opts, broker.url, on_round=result.rounds.append,
                          desc=f"gkt/mqtt/{opts.mode}")
        sys_counters = read_sys_counters(broker.url)
    finally:
        codes = []
        for p, logf in procs:
            try:
                codes.append(p.wait(timeout=60))
            except subprocess.TimeoutExpired:
                p.terminate()
                codes.append(p.wait())
            logf.close()
        broker.stop()
    status = outcome.status
    result.codec = codec
    result.broker_bytes = {
        "hub_received": status.bytes_received if status else 0,
        "hub_sent": status.bytes_sent if status else 0,
        "broker": sys_counters,
        "rejected": status.rejected if status else {}, "device_exit_codes": codes,
    }
    if outcome.code != 0:
        raise RuntimeError(f"hub exited with code {outcome.code}; see the logs in {work}")
    final = result.final()
    print(f"final test accuracy {final['test_accuracy']:.4f} after {cfg.rounds} rounds; "
          f"{final['upload_bytes'] / 1e6:.2f} MB up, {final['download_bytes'] / 1e6:.2f} MB down; "
          f"{time.perf_counter() - t0:.1f} s in all")
    return result
