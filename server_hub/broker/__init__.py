"""The managed Mosquitto broker and who may reach it: generated config, supervision,
device enrolment (passwords, ACL) and TLS."""
