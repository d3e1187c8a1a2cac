"""MQTT for both sides: a thin paho-mqtt link, acknowledged windowed sending, and the
paho decoder patch that the link installs."""
