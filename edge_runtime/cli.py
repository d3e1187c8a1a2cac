"""`gkt-edge`: run a device of a GKT federation.

Exit codes: 0 the hub finished the federation (or SIGTERM/SIGINT: state saved),
2 bad arguments, 4 cannot reach the broker.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

EXIT_OK, EXIT_USAGE, EXIT_BROKER = 0, 2, 4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gkt-edge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="join a hub and train rounds until it says stop")
    run.add_argument("--hub", required=True, metavar="URL", help="broker: mqtt://HOST:PORT")
    run.add_argument("--device-id", required=True)
    run.add_argument("--state-dir", default=None,
                     help="model and progress (default: ./gkt-edge-state/DEVICE_ID)")
    run.add_argument("--codec", default="q8", help="feature codec: fp32 | fp16 | q8 | q4")
    run.add_argument("--dataset", default="digits")
    run.add_argument("--data-root", default="data")
    run.add_argument("--image-size", type=int, default=0)
    run.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA")
    run.add_argument("--shard", type=int, default=0, help="this device's part of the partition")
    run.add_argument("--num-shards", type=int, default=1, help="devices in the partition")
    run.add_argument("--seed", type=int, default=0, help="partition seed, same on every device")
    run.add_argument("--model-seed", type=int, default=0,
                     help="initial weights; must be the same on every device")
    run.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    run.add_argument("--batch-size", type=int, default=32)
    run.add_argument("--lr", type=float, default=1e-3)
    run.add_argument("--temperature", type=float, default=3.0)
    run.add_argument("--alpha", type=float, default=1.0)
    run.add_argument("--max-payload", type=int, default=256 * 1024,
                     help="bytes per message; must fit the broker's max_packet_size")
    run.add_argument("--threads", type=int, default=0,
                     help="torch CPU threads (0 = torch's default: one per core)")
    run.add_argument("--extract-backend", default="folded",
                     help="folded | eager | onnxruntime (docs/performance.md)")
    run.add_argument("--no-local-eval", action="store_true",
                     help="do not evaluate the local classifier on the test split")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .agent import AgentConfig, EdgeAgent
    from .data import DataConfig, load_split, make_loader
    from .device import EdgeDevice
    from .partition import partition
    from .topics import validate_device_id
    from .train import EdgeTrainConfig
    from .transport import LinkConfig, MqttLink

    try:
        validate_device_id(args.device_id)
        if not 0 <= args.shard < args.num_shards:
            raise ValueError(f"--shard {args.shard} must be in [0, --num-shards {args.num_shards})")
        data = DataConfig(args.dataset, args.data_root, args.image_size)
        plain = DataConfig(args.dataset, args.data_root, args.image_size, augment=False)
        train, train_eval = load_split(data, True), load_split(plain, True)
        ids = partition(train.targets, args.num_shards, args.partition, args.seed)[args.shard]
        test_loader = None
        if not args.no_local_eval:
            test_loader = make_loader(load_split(plain, False).dataset, 256, shuffle=False)
        cfg = AgentConfig(args.device_id, codec=args.codec,
                          state_dir=args.state_dir or f"gkt-edge-state/{args.device_id}",
                          max_payload=args.max_payload)
        from .codecs import get_codec

        get_codec(cfg.codec)
        edge_cfg = EdgeTrainConfig(args.epochs, args.batch_size, args.lr,
                                   temperature=args.temperature, alpha=args.alpha,
                                   extract_backend=args.extract_backend)
    except (ValueError, FileNotFoundError) as err:
        print(f"gkt-edge: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    device = EdgeDevice(args.device_id, train, train_eval, ids, data.num_classes, edge_cfg,
                        seed=args.seed + args.shard, model_seed=args.model_seed)
    link = MqttLink(LinkConfig(args.hub, client_id=f"gkt-edge-{args.device_id}",
                               max_packet_size=cfg.max_payload + 1024))
    try:
        link.connect()
    except ConnectionError as err:
        print(f"gkt-edge: error: {err}", file=sys.stderr)
        return EXIT_BROKER
    agent = EdgeAgent(link, device, cfg, test_loader)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop())
    try:
        return agent.run()
    finally:
        link.close()


if __name__ == "__main__":
    sys.exit(main())
