"""The fleet's MQTT broker: mosquitto as a child process (`process`) with accounts, ACL and TLS files.

Stdlib only, plus `device_agent.wire.protocol` (topics); device ids come from the bundles' manifest.json.
"""
