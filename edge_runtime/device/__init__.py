"""The `gkt-edge` program: the MQTT agent that drives one device through rounds, the
device's learning state, its command line and exit codes, and simulated slow devices."""
