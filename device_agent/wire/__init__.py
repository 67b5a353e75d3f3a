"""The wire layer every side shares: topics, frames, presence, the tensor codec, the transport seam
(paho-mqtt and in-memory), the requester, the fleet view from presence, the clock and event logs.

It depends on numpy and paho-mqtt only, never on the rest of `device_agent` (import-linter checks
that), so the agent, the trial driver, the coordinator, the broker and the benchmarks all speak
through the same code.
"""
