"""The membership core: SWIM + Lifeguard, sans-IO.

API SKETCH (to be implemented): the shape is aioquic's / foca's.

    m = Membership(name, addr, config, rng, now, keyring=kr, incarnation=0, meta=b"")
    m.join(seeds, now)              # -> push-pull stream requests to the seeds
    m.receive(data, src, now)       # one encrypted datagram from the network
    reply = m.handle_stream(data, src, now)  # one encrypted stream frame (push-pull
                                    # request) -> encrypted reply frame or None
    m.receive_stream_reply(data, src, now)   # the reply to a request we sent
    m.stream_failed(dst, now)       # our stream request to dst could not connect
    m.handle_timeout(now)           # run every timer due at or before now
    m.leave(now); m.set_meta(meta, now); m.set_state(key, value, now)
    m.delete_state(key, now); m.broadcast(payload, now)
    m.datagrams_to_send() -> list[(addr, bytes)]   # drained; each <= max_datagram_bytes
    m.streams_to_send()   -> list[(addr, bytes)]   # drained; each expects one reply
    m.next_event() -> Event | None
    m.get_timer() -> float | None   # earliest deadline
    m.members(), m.member(name), m.health_score, m.incarnation, m.stats

The core never reads a clock, never touches a socket, never uses global random:
time comes in as ``now`` and randomness from the injected ``random.Random``.
"""
