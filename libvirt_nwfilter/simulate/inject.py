"""Frame injector for ``simulate --kernel``, run inside the throw-away network namespace.

A standalone script (standard library only, so it runs with any python3 whatever the import
path): ``python3 inject.py`` reads one JSON command per line on stdin and answers one JSON line:

* ``{"cpu": N, "capture": [IFACE, ...], "mark": N}`` pins this process to CPU N (the frames of one run are
  then processed in the order they are sent, which the kernel trace relies on) and starts
  capturing on the interfaces -> ``{"ready": true}``
* ``{"send": [[IFACE, HEX], ...]}`` sends the frames in order -> ``{"sent": COUNT}``; frames
  sent on the bridge (from the host) carry the mark ``{"mark": N}`` of the first command
* ``{"collect": true}`` -> ``{"frames": {IFACE: [HEX, ...]}}`` (every frame captured, in order)
  and exits.
"""

import json
import os
import select
import socket
import sys
import time

ETH_P_ALL = 0x0003
SO_RCVBUFFORCE = 33
PACKET_OUTGOING = 4


def _open(iface: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
    sock.bind((iface, 0))
    sock.setblocking(False)
    return sock


def _drain(captures: dict, frames: dict) -> None:
    for iface, sock in captures.items():
        while True:
            try:
                data, address = sock.recvfrom(65535)
            except BlockingIOError:
                break
            if address[2] != PACKET_OUTGOING:
                frames[iface].append(data.hex())


def main() -> int:
    captures: dict = {}
    senders: dict = {}
    frames: dict = {}
    mark = 0
    for line in sys.stdin:
        command = json.loads(line)
        if "cpu" in command:
            os.sched_setaffinity(0, {command["cpu"]})
            mark = command.get("mark", 0)
            for iface in command["capture"]:
                captures[iface] = _open(iface)
                frames[iface] = []
            answer = {"ready": True}
        elif "send" in command:
            for iface, data in command["send"]:
                if iface not in senders:
                    senders[iface] = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
                    senders[iface].setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
                    senders[iface].bind((iface, 0))
                senders[iface].send(bytes.fromhex(data))
            _drain(captures, frames)
            answer = {"sent": len(command["send"])}
        elif "collect" in command:
            deadline = time.monotonic() + 0.05
            while time.monotonic() < deadline:
                _drain(captures, frames)
                select.select(list(captures.values()), [], [], 0.01)
            _drain(captures, frames)
            print(json.dumps({"frames": frames}), flush=True)
            return 0
        else:
            answer = {"error": f"unknown command {sorted(command)}"}
        print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
