"""Redis Streams: command bus, consumer-group runtime, shards and leases, event
append and the fan-out readers. Every key name comes from `streams.keys`.
"""
