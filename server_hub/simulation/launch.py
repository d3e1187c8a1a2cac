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
from edge_runtime.protocol.codecs import FEATURE_CODEC
from edge_runtime.protocol.limits import DEFAULT_MAX_PAYLOAD, max_packet_size
from edge_runtime.protocol.round_auth import load_or_create_key
from server_hub.assembly.options import HubOptions, ModeOptions, MonitorOptions
from server_hub.monitoring.results import HEADER, RoundRecord, RunResult, format_row
from server_hub.run.plan import RunPlan, dataset_plan
from server_hub.simulation.inproc import RUNNERS, FederationConfig, prepare
from server_hub.simulation.throttled import run_gkt_async_fleet, run_gkt_sync_fleet

log = logging.getLogger(__name__)


def simulate_inproc(cfg: FederationConfig, algorithm: str, show_progress: bool = True,
                    opts: ModeOptions | None = None, plan: RunPlan | None = None,
                    device_data: list[str] | None = None) -> RunResult:
    """All devices and the hub in this process; bytes are what would cross the network.
    With ``device_data`` (one folder per device) and ``plan`` (its spec and --test-data),
    the devices' own images instead of a partition of ``cfg.data``."""
    t0 = time.perf_counter()
    if device_data:
        from server_hub.simulation.own_folders import own_setup

        setup = own_setup(device_data, plan.spec, plan.test,
                          Path(cfg.state_dir) / "baseline-cache" if cfg.state_dir else None)
        size = plan.spec.preprocess["size"]
        what = f"own folders [{', '.join(device_data)}]"
    else:
        setup = prepare(cfg)
        size, what = cfg.data.size, cfg.data.dataset
    sizes = ", ".join(str(len(s)) for s in setup.shards)
    print(f"{algorithm} on {what} ({size}x{size}), "
          f"{cfg.devices} devices [{sizes} samples], partition {cfg.partition}, "
          f"{cfg.rounds} rounds, seed {cfg.seed}")
    bar = tqdm(total=cfg.rounds, desc=algorithm, unit="round",
               disable=None if show_progress else True, leave=False)  # None: a terminal only
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
                   speed: DeviceSpeed | None = None, data: str | None = None,
                   hub_tests: bool = False, key_file: Path | None = None) -> list[str]:
    """The `gkt-edge run` command line of one simulated device: only what stays on a
    device (its data, codec, threads, state); the rest comes with the hub's run spec.
    ``key_file``: the hub's run key, so the device follows only the hub's round
    announcements. ``data``: its own folder (when ``hub_tests``, nothing held out: the
    hub measures)."""
    speed = speed or DeviceSpeed()
    if data is not None:
        where = ["--data", data] + (["--val-fraction", "0"] if hub_tests else [])
    else:
        where = ["--data-root", cfg.data.root, "--partition", cfg.partition,
                 "--shard", str(shard), "--num-shards", str(cfg.devices)]
    return [sys.executable, "-m", "edge_runtime.device.cli", "run", "--hub", url,
            "--device-id", name, "--state-dir", str(state_dir), "--codec", codec, *where,
            "--seed", str(cfg.seed), "--max-payload", str(max_payload),
            # Devices share this machine's cores: more threads than cores makes
            # every process spin and a 0.2 s epoch takes 20 s.
            "--threads", str(max(1, (os.cpu_count() or 1) // cfg.devices)),
            "--mode", mode,  # the refresh policy and logits codec come in the run spec
            "--speed-factor", str(speed.compute), "--bandwidth", str(speed.bandwidth),
            *(["--round-key-file", str(key_file)] if key_file else [])]


def simulate_mqtt(cfg: FederationConfig, codec: str = FEATURE_CODEC,
                  show_progress: bool = True, round_deadline: float = 300.0,
                  opts: ModeOptions | None = None,
                  monitor: MonitorOptions | None = None,
                  deliver_models: bool = True,
                  plan: RunPlan | None = None,
                  device_data: list[str] | None = None) -> RunResult:
    """Broker, hub and one `gkt-edge` process per device on this machine, over real MQTT.
    ``deliver_models``: at the end each device gets its composed model (needs [export]).
    ``plan``: the run spec devices adopt (default: ``cfg.data``'s dataset).
    ``device_data``: one image folder per device, run with `gkt-edge --data`."""
    from server_hub.assembly.hub_run import run_hub
    from server_hub.broker.mosquitto import (
        BrokerConfig,
        ManagedBroker,
        free_port,
        read_sys_counters,
    )
    from server_hub.run.spec_store import settle_run_spec
    from server_hub.service import ServiceConfig

    opts = opts or ModeOptions()
    plan = plan or dataset_plan(cfg, codec, round_deadline)
    fleet = opts.fleet or [DeviceSpeed()] * cfg.devices
    t0 = time.perf_counter()
    # Same layout as the in-process runner: checkpoints/, devices/<id>/, plus broker/, logs/.
    work = Path(cfg.state_dir) if cfg.state_dir else Path(tempfile.mkdtemp(prefix="gkt-sim-"))
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)  # the broker runs as user mosquitto and must reach its folder
    spec = settle_run_spec(work, plan.spec)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    max_payload = DEFAULT_MAX_PAYLOAD
    broker = ManagedBroker(BrokerConfig(str(work / "broker"), port=free_port(),
                                        max_packet_size=max_packet_size(max_payload)),
                           supervise=True)
    broker.start()
    names = [f"dev{i}" for i in range(cfg.devices)]
    size = spec.preprocess["size"]
    data = (f"{cfg.data.dataset}, partition {cfg.partition}" if not device_data else
            f"each device its own folder ({len(spec.classes)} classes)")
    key_file = load_or_create_key(work)  # the hub signs its rounds with it
    print(f"gkt over MQTT ({broker.url}: loopback, no authentication, a local simulation; "
          f"codec {codec}) on {data} ({size}x{size}), {cfg.devices} device processes, "
          f"{cfg.rounds} rounds, seed {cfg.seed}, run {spec.run_id}; state and logs in {work}")
    procs = []
    for i, name in enumerate(names):
        logf = open(work / "logs" / f"{name}.log", "wb")
        cmd = device_command(broker.url, name, i, cfg, codec, work / "devices" / name,
                             max_payload, opts.mode, fleet[i],
                             device_data[i] if device_data else None, plan.test is not None,
                             key_file)
        # own session: a Ctrl-C reaches this process alone, which then stops the devices
        procs.append((subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                       start_new_session=True), logf))
    config = {**asdict(cfg), "fleet": [asdict(s) for s in fleet],
              "async": asdict(opts.acfg) if opts.acfg else None}
    result = RunResult("gkt", spec.dataset or "own", cfg.devices, config, transport="mqtt",
                       mode=opts.mode, run_spec=spec.to_dict())
    hub_opts = HubOptions(
        ServiceConfig(str(work), rounds=cfg.rounds, min_devices=cfg.devices,
                      round_deadline=round_deadline, start_timeout=120,
                      max_payload=max_payload),
        opts, monitor or MonitorOptions(), progress=show_progress, signals=False,
        spill_features=False, deliver_models=deliver_models, plan=plan)
    sys_counters: dict[str, int] = {}
    wait_s = 60.0  # for devices to see the hub's "stop"
    try:
        outcome = run_hub(cfg, hub_opts, broker.url, on_round=result.rounds.append,
                          desc=f"gkt/mqtt/{opts.mode}")
        sys_counters = read_sys_counters(broker.url)
    except BaseException:  # Ctrl-C or a crash: no "stop" will come, so stop the devices
        wait_s = 0.0
        raise
    finally:
        codes = []
        for p, logf in procs:
            try:
                codes.append(p.wait(timeout=wait_s))
            except subprocess.TimeoutExpired:
                p.terminate()  # SIGTERM: a device saves its state and exits 0
                codes.append(p.wait())
            logf.close()
        broker.stop()
    status = outcome.status
    result.codec = codec
    result.class_report = status.class_report if status else None
    result.delivery = status.delivery if status else None
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
    if result.delivery and result.delivery["acked"]:
        d = result.delivery
        print(f"{len(d['acked'])} devices hold their round {d['round']} model "
              f"({sum(d['bytes_on_wire'].values()) / 1e6:.1f} MB sent); classify images with: "
              f"gkt-edge predict --state-dir {work / 'devices' / d['acked'][0]} IMAGES...")
    return result
