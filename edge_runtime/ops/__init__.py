"""Operating either program: TOML config files and environment variables, log set-up,
systemd units."""
