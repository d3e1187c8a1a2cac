"""TOML config files + environment for the command lines: precedence, errors, round trip."""

from __future__ import annotations

import argparse

import pytest
import tomllib

from edge_runtime.device import cli as edge_cli
from edge_runtime.ops.config_file import (
    ConfigError,
    add_config_args,
    parse_args,
    subparser,
    to_toml,
)
from server_hub.cli import main as hub_cli


def tiny_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--hub", required=True)
    run.add_argument("--rounds", type=int, default=10)
    run.add_argument("--round-deadline", type=float, default=300.0)
    run.add_argument("--codec", choices=("fp32", "q8"), default="q8")
    run.add_argument("--no-progress", action="store_true")
    add_config_args(run, "T_")
    return p


def write(tmp_path, text: str, name: str = "c.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path):
    cfg = write(tmp_path, 'hub = "mqtt://file:1883"\nrounds = 5\nround_deadline = 7\n'
                          'no-progress = true\n')
    env = {"T_ROUNDS": "6", "T_CODEC": "fp32"}
    a = parse_args(tiny_parser(), ["run", "--config", cfg], "T_", env)
    # file (dashes or underscores), env over file, defaults where neither says
    assert (a.hub, a.rounds, a.round_deadline, a.codec, a.no_progress) == \
        ("mqtt://file:1883", 6, 7.0, "fp32", True)
    a = parse_args(tiny_parser(), ["run", "--config", cfg, "--rounds", "9"], "T_", env)
    assert a.rounds == 9 and a.codec == "fp32"
    a = parse_args(tiny_parser(), ["run", "--hub", "h"], "T_", {})
    assert (a.rounds, a.round_deadline, a.codec, a.no_progress) == (10, 300.0, "q8", False)


@pytest.mark.parametrize("text, words", [
    ("rounds = 'ten'\n", ["'rounds'", "integer", "c.toml"]),
    ("rounds = 2.5\n", ["'rounds'", "integer"]),
    ("rounds = true\n", ["'rounds'"]),
    ("codec = 'q3'\n", ["'codec'", "fp32, q8", "q3"]),
    ("no_progress = 'maybe'\n", ["'no-progress'", "true or false"]),
    ("roundz = 3\n", ["unknown key 'roundz'", "c.toml", "round-deadline"]),
    ("rounds = [\n", ["not valid TOML", "c.toml"]),
])
def test_bad_file_values_name_the_key_and_the_file(tmp_path, text, words):
    cfg = write(tmp_path, 'hub = "h"\n' + text)
    with pytest.raises(ConfigError) as err:
        parse_args(tiny_parser(), ["run", "--config", cfg], "T_", {})
    for w in words:
        assert w in str(err.value)


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match="T_ROUND_DEADLINE.*'round-deadline' must be a number"):
        parse_args(tiny_parser(), ["run", "--hub", "h"], "T_", {"T_ROUND_DEADLINE": "soon"})
    with pytest.raises(ConfigError, match="cannot read config file"):
        parse_args(tiny_parser(), ["run", "--config", "/nonexistent.toml"], "T_", {})


def test_print_config_round_trips(tmp_path, capsys):
    cfg = write(tmp_path, 'hub = "mqtt://h:1"\nrounds = 3\n')
    with pytest.raises(SystemExit) as done:
        parse_args(tiny_parser(), ["run", "--config", cfg, "--print-config", "--codec", "fp32"],
                   "T_", {})
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert tomllib.loads(printed) == {"hub": "mqtt://h:1", "rounds": 3, "round-deadline": 300.0,
                                      "codec": "fp32", "no-progress": False}
    again = parse_args(tiny_parser(), ["run", "--config", write(tmp_path, printed)], "T_", {})
    assert (again.hub, again.rounds, again.codec) == ("mqtt://h:1", 3, "fp32")


def test_edge_cli_reads_its_file_and_environment(tmp_path, monkeypatch):
    # training settings come with the hub's run spec; a device's file holds its own
    cfg = write(tmp_path, 'hub = "mqtt://10.0.0.5:1883"\ndevice-id = "pi-1"\n'
                          'val_fraction = 0.2\nno-local-eval = true\ndata = "/srv/cam"\n')
    monkeypatch.setenv("GKT_EDGE_THREADS", "3")
    monkeypatch.setenv("GKT_EDGE_CODEC", "q4")
    a = parse_args(edge_cli.build_parser(), ["run", "--config", cfg, "--codec", "fp16"],
                   edge_cli.ENV_PREFIX)
    assert (a.hub, a.device_id, a.val_fraction, a.no_local_eval, a.data, a.threads,
            a.codec) == ("mqtt://10.0.0.5:1883", "pi-1", 0.2, True, "/srv/cam", 3, "fp16")
    sub = subparser(edge_cli.build_parser(), ["run"])
    assert tomllib.loads(to_toml(sub, a))["val-fraction"] == 0.2


def test_edge_cli_exits_2_naming_the_bad_key(tmp_path, capsys):
    cfg = write(tmp_path, 'hub = "mqtt://h:1"\ndevice-id = "a"\nthreads = "many"\n')
    assert edge_cli.main(["run", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "'threads' must be an integer" in err and cfg in err
    cfg = write(tmp_path, 'hub = "mqtt://h:1"\ndevice-id = "a"\nepochs = 3\n')
    assert edge_cli.main(["run", "--config", cfg]) == 2  # the run spec's, not the device's
    assert "unknown key 'epochs'" in capsys.readouterr().err


def test_hub_print_config(tmp_path, monkeypatch, capsys):
    cfg = write(tmp_path, 'state-dir = "/var/lib/gkt"\nrounds = 50\nmetrics_port = 9100\n')
    monkeypatch.setenv("GKT_HUB_MIN_DEVICES", "4")
    with pytest.raises(SystemExit) as done:
        hub_cli.main(["serve", "--config", cfg, "--print-config", "--server-epochs", "7"])
    assert done.value.code == 0
    got = tomllib.loads(capsys.readouterr().out)
    assert (got["state-dir"], got["rounds"], got["metrics-port"], got["min-devices"],
            got["server-epochs"], got["status-host"]) == ("/var/lib/gkt", 50, 9100, 4, 7,
                                                          "127.0.0.1")
    monkeypatch.setenv("GKT_HUB_ROUNDS", "-")
    assert hub_cli.main(["serve", "--config", cfg]) == 2
    assert "GKT_HUB_ROUNDS" in capsys.readouterr().err


def test_repeatable_options_take_a_toml_array(tmp_path, capsys):
    p = argparse.ArgumentParser(prog="t")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--tls-host", action="append", default=[])
    run.add_argument("--size", type=int, nargs="+", default=[1])
    add_config_args(run, "T_")
    cfg = write(tmp_path, 'tls-host = ["hub.local", "10.0.0.2"]\nsize = [3, 4]\n')
    a = parse_args(p, ["run", "--config", cfg], "T_", {})
    assert a.tls_host == ["hub.local", "10.0.0.2"] and a.size == [3, 4]
    with pytest.raises(ConfigError, match="'size' must be an integer"):
        parse_args(p, ["run", "--config", write(tmp_path, "size = [3, 'x']\n", "bad.toml")],
                   "T_", {})
    with pytest.raises(SystemExit):
        parse_args(p, ["run", "--config", cfg, "--print-config"], "T_", {})
    assert tomllib.loads(capsys.readouterr().out)["tls-host"] == ["hub.local", "10.0.0.2"]


def test_secrets_are_not_printed():
    p = argparse.ArgumentParser()
    p.add_argument("--password")
    p.add_argument("--user")
    out = to_toml(p, p.parse_args(["--password", "hunter2", "--user", "u"]))
    assert "hunter2" not in out and 'user = "u"' in out
    assert hub_cli.ENV_PREFIX == "GKT_HUB_" and edge_cli.ENV_PREFIX == "GKT_EDGE_"
