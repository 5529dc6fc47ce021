#!/usr/bin/python3
"""Two Kafka requests for the tansu stand-in's copies of apache/kafka's scripts:

    kafka_probe.py api-versions HOST:PORT   ApiVersions v0; exit 0 if the broker answers with no error
    kafka_probe.py topics HOST:PORT         Metadata v0; prints the topic names, one per line
"""

import socket
import struct
import sys


def request(address: str, api_key: int, body: bytes) -> bytes:
    host, _, port = address.rpartition(":")
    client = b"kafka-probe"
    header = struct.pack(">hhih", api_key, 0, 1, len(client)) + client
    with socket.create_connection((host, int(port)), timeout=8) as s:
        s.settimeout(8)
        s.sendall(struct.pack(">i", len(header) + len(body)) + header + body)
        size = struct.unpack(">i", recv(s, 4))[0]
        reply = recv(s, size)
    if struct.unpack(">i", reply[:4])[0] != 1:
        raise SystemExit("reply to another request")
    return reply[4:]


def recv(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise SystemExit("connection closed")
        out += chunk
    return out


def string(data: bytes, pos: int) -> tuple[str, int]:
    n = struct.unpack(">h", data[pos:pos + 2])[0]
    return data[pos + 2:pos + 2 + max(n, 0)].decode(), pos + 2 + max(n, 0)


def main(what: str, address: str) -> int:
    if what == "api-versions":
        error = struct.unpack(">h", request(address, 18, b"")[:2])[0]
        print(f"{address}: ApiVersions error code {error}")
        return 0 if error == 0 else 1
    data = request(address, 3, struct.pack(">i", 0))  # Metadata v0, every topic
    pos = 0
    (brokers,) = struct.unpack(">i", data[pos:pos + 4])
    pos += 4
    for _ in range(brokers):
        _, pos = string(data, pos + 4)
        pos += 4
    (topics,) = struct.unpack(">i", data[pos:pos + 4])
    pos += 4
    for _ in range(topics):
        name, pos = string(data, pos + 2)
        (parts,) = struct.unpack(">i", data[pos:pos + 4])
        pos += 4
        for _ in range(parts):
            pos += 10
            for _ in range(2):  # replicas, isr
                (k,) = struct.unpack(">i", data[pos:pos + 4])
                pos += 4 + 4 * k
        print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
